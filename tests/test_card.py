"""The model card and datasheet: every section present, every number from a metrics file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from tisslm.core.config import load_params
from tisslm.release.card import datasheet, model_card

REPO = Path(__file__).resolve().parents[1]
CARD_SECTIONS = [
    "Model Details", "Uses", "Out-of-Scope Use", "Bias, Risks, and Limitations", "Training Details",
    "Evaluation", "Can it code?", "Quantization and Export", "Knowledge Base", "Safety", "Environmental Impact",
    "How to Get Started",
]  # fmt: skip
DATASHEET_SECTIONS = [
    "Motivation",
    "Composition",
    "Collection Process",
    "Preprocessing",
    "Uses",
    "Distribution",
    "Maintenance",
]
SOURCES = ("ingest", "clean", "tokenizer", "train", "eval", "bias", "kb", "quantize", "export", "safety")
# The evaluate stage's coding figures, as it writes them, for metrics/eval.json files from before it did.
CODING = {
    "humaneval": {"problems": 164, "pass@1": 0.0183, "greedy_outcomes": {"error": 150, "failed": 11, "passed": 3},
                  "samples": 10, "pass@1_sampled": 0.0122, "pass@10": 0.0671, "temperature": 0.8, "top_p": 0.95,
                  "top_k": 50, "max_new_tokens": 128, "prompts_truncated": 1, "executor": "bubblewrap",
                  "limits": {"timeout_s": 10.0, "memory_mb": 2048}, "seconds": 151.2},
    "sft_heldout": {"examples": 54, "parse_rate": 0.463, "doctest_examples": 2, "doctest_pass@1": 0.5,
                    "doctest_references_failing": 1, "executor": "bubblewrap", "seconds": 9.8},
}  # fmt: skip


@pytest.fixture(scope="module")
def metrics() -> dict[str, dict]:
    """The metrics files the pipeline committed: real stage outputs."""
    recipe = json.loads((REPO / "benchmarks" / "results" / "recipe_ablation.json").read_text())
    found = {name: json.loads((REPO / "metrics" / f"{name}.json").read_text()) for name in SOURCES}
    found["eval"] = CODING | found["eval"]
    return {"recipe": recipe, **found}


def test_model_card_has_every_section_and_the_metrics_numbers(metrics):
    card = model_card(load_params(REPO / "params.yaml"), metrics)
    text = str(card)
    headers = [line[3:] for line in text.splitlines() if line.startswith("## ")]
    assert headers == CARD_SECTIONS
    val, bias = metrics["eval"]["val"], metrics["bias"]["tisslm_pairs"]
    assert f"bits per byte {val['bits_per_byte']:.3f}" in text
    assert f"| overall | {bias['overall']['pct_stereotype']:.1f} |" in text
    for category, values in bias["per_category"].items():
        assert f"| {category} | {values['pct_stereotype']:.1f} |" in text
    for name, value in metrics["eval"]["baselines_bits_per_byte"].items():
        assert f"| {name} | {value:.3f} |" in text
    ratio = metrics["quantize"]["int8_weight_only"]["linear_weight_size_ratio"]
    assert f"| int8_weight_only | {ratio:.2f}x |" in text
    assert f"{metrics['train']['train_seconds'] / 60:.1f} minutes" in text
    fused = metrics["kb"]["retrieval"]["results"]["fused"]["file"]
    assert f"| fused | {fused['recall@5']:.3f} | {fused['mrr@10']:.3f} | {fused['ndcg@10']:.3f} |" in text
    safety = metrics["safety"]
    assert f"F1 {safety['filter']['overall']['f1']:.3f}" in text
    for category, values in safety["filter"]["categories"].items():
        assert f"| {category} | " in text and f" | {values['f1']:.3f} | {values['support']} |" in text
    for length, rate in safety["watermark"]["detection_rate"].items():
        assert f"{rate:.1%} at {length} tokens" in text
    for goal, counts in safety["red_team"]["goals"].items():
        assert f"| {goal} | {counts['prompts']} |" in text
    for name, row in metrics["recipe"]["recipes"].items():  # the ablation the recipe was chosen by
        gain = metrics["recipe"]["gain_over_previous"][name]
        assert f"| {name} | {row['val_bits_per_byte']:.3f} | {gain:+.1%} |" in text
    humaneval, heldout = metrics["eval"]["humaneval"], metrics["eval"]["sft_heldout"]
    assert f"| HumanEval | pass@1 (greedy) | {humaneval['pass@1']:.1%} |" in text
    assert f"| HumanEval | pass@10 (sampled) | {humaneval['pass@10']:.1%} |" in text
    assert f"HumanEval ({humaneval['problems']} problems" in text and humaneval["executor"] in text
    assert f"| held-out functions | answers that parse | {heldout['parse_rate']:.1%} |" in text
    doctests = heldout["doctest_pass@1"]  # None when no held-out function has a runnable doctest
    assert (
        f"(greedy, {heldout['doctest_examples']} with doctests) | {'n/a' if doctests is None else f'{doctests:.1%}'} |"
        in text
    )
    parsed = ModelCard(text).data  # the YAML block is valid Hugging Face card metadata
    assert parsed.license == "mit" and parsed.pipeline_tag == "text-generation"
    assert parsed.eval_results[0].metric_value == round(val["bits_per_byte"], 4)
    assert parsed.eval_results[2].metric_value == round(humaneval["pass@1"], 4)
    assert "Supervised fine-tuning" not in text and "DPO" not in text  # not given: no section


def test_datasheet_has_gebru_sections_and_corpus_figures(metrics):
    text = datasheet(metrics)
    assert [line[3:] for line in text.splitlines() if line.startswith("## ")] == DATASHEET_SECTIONS
    assert f"{metrics['ingest']['seen']} documents seen, {metrics['ingest']['kept']} kept" in text
    assert f"{metrics['clean']['docs_out']} documents" in text


def test_the_card_states_the_sources_and_hardware_it_reads(metrics):
    """Nothing about the data or the machine is written in: a CUDA run from a hub dataset says so."""
    ingest = {
        **metrics["ingest"],
        "by_source": {"hf:org/code": {"description": "the dataset org/code", "seen": 5, "kept": 4, "skipped": 1}},
    }
    train = {**metrics["train"], "device": "NVIDIA H200", "processes": 8, "micro_batch": 2, "precision": "bf16"}
    text = str(model_card(load_params(REPO / "params.yaml"), {**metrics, "ingest": ingest, "train": train}))
    assert "the dataset org/code: 4 kept" in text and "standard library" not in text
    assert "8 process(es) on NVIDIA H200, 2 sequences per forward in each, bf16" in text
    assert "no accelerator" not in text


def test_the_card_shows_the_fine_tuning_figures_it_is_given(metrics):
    """metrics/sft.json and metrics/dpo.json: every numeric figure in a table, whatever its name; the
    coding figures as the run says, sampling off included."""
    sft = {"steps": 40, "train_loss": 1.23456, "val_loss": 1.5, "note": "text is left out", "resumed": False}
    dpo = {"reward_accuracy_before": 0.5, "reward_accuracy_after": 0.625, "reward_margin_after": 0.0123}
    humaneval = {k: v for k, v in CODING["humaneval"].items() if k not in ("pass@1_sampled", "pass@10")}
    heldout = CODING["sft_heldout"] | {"examples": 0, "parse_rate": None, "doctest_examples": 0, "doctest_pass@1": None}
    evaluated = {**metrics["eval"], "humaneval": {**humaneval, "samples": 0}, "sft_heldout": heldout}
    text = str(model_card(load_params(REPO / "params.yaml"), {**metrics, "sft": sft, "dpo": dpo, "eval": evaluated}))
    assert "### Supervised fine-tuning (metrics/sft.json)" in text and "### Preference tuning, DPO" in text
    assert "| train_loss | 1.235 |" in text and "| steps | 40 |" in text and "| val_loss | 1.5 |" in text
    assert "note" not in text and "resumed" not in text
    assert "| reward_margin_after | 0.0123 |" in text and "| reward_accuracy_after | 0.625 |" in text
    assert "No sampled completions: pass@1 only." in text and "(sampled)" not in text
    assert "| held-out functions | answers that parse | n/a |" in text
