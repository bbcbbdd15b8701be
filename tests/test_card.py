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
    "Evaluation", "Quantization and Export", "Knowledge Base", "Safety", "Environmental Impact", "How to Get Started",
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


@pytest.fixture(scope="module")
def metrics() -> dict[str, dict]:
    """The metrics files the pipeline committed: real stage outputs."""
    recipe = json.loads((REPO / "benchmarks" / "results" / "recipe_ablation.json").read_text())
    return {"recipe": recipe, **{name: json.loads((REPO / "metrics" / f"{name}.json").read_text()) for name in SOURCES}}


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
    parsed = ModelCard(text).data  # the YAML block is valid Hugging Face card metadata
    assert parsed.license == "mit" and parsed.pipeline_tag == "text-generation"
    assert parsed.eval_results[0].metric_value == round(val["bits_per_byte"], 4)


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
