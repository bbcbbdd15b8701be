"""What the safety stage measures: the filter on the labelled set, the watermark on generated
and human-written code (repetitive samples apart), and whether the goals of params.yaml's
`safety.goals` are reached. The red-team run, which needs a server, is `tisslm.safety.red_team`.
"""

from __future__ import annotations

import importlib.util
import io
import itertools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from tisslm.core.config import ContentFilterParams, SafetyGoals, SafetyParams
from tisslm.core.errors import TissLMError
from tisslm.core.generate import generate
from tisslm.core.io import atomic_write_bytes, read_jsonl
from tisslm.core.model import TissLM
from tisslm.core.sampling import SamplingParams
from tisslm.safety.filters import CATEGORIES, ContentFilter, flag_everything
from tisslm.safety.watermark import Detection, Watermark, token_entropies

GROUPS = ("benign_alarming", "benign", "harmful")


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    labels: frozenset[str]
    group: str


def read_labelled(path: str | Path) -> list[Example]:
    """The labelled set (src/tisslm/safety/labelled.jsonl); a bad line is an error naming it."""
    examples = []
    for where, row in read_jsonl(path):
        try:
            example = Example(row["id"], row["text"], frozenset(row["labels"]), row["group"])
        except (KeyError, TypeError) as err:
            raise TissLMError(f"{where}: not a labelled example ({err})") from None
        unknown = example.labels - set(CATEGORIES)
        if unknown or example.group not in GROUPS:
            raise TissLMError(f"{where}: unknown label {sorted(unknown)} or group {example.group!r}")
        examples.append(example)
    return examples


def _scores(true_positives: int, false_positives: int, false_negatives: int) -> dict[str, float | None]:
    precision = true_positives / (true_positives + false_positives) if true_positives + false_positives else None
    recall = true_positives / (true_positives + false_negatives) if true_positives + false_negatives else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def filter_metrics(examples: list[Example], params: ContentFilterParams) -> dict:
    """Precision, recall and F1 per category and overall (harmful vs not), and the false-positive
    rate of each benign group: the share of its examples in which the filter found anything.

    Every category is scanned whatever the policy says (the policy decides what is done with a
    finding, not whether the detector works): this measures the detectors at the params' threshold.
    """
    detector = flag_everything(params)
    found = {example.id: frozenset(f.category for f in detector.scan(example.text)) for example in examples}
    per_category = {}
    for category in CATEGORIES:
        tp = sum(category in found[e.id] and category in e.labels for e in examples)
        fp = sum(category in found[e.id] and category not in e.labels for e in examples)
        fn = sum(category not in found[e.id] and category in e.labels for e in examples)
        per_category[category] = _scores(tp, fp, fn) | {"support": tp + fn}
    harmful = [bool(e.labels) for e in examples]
    flagged = [bool(found[e.id]) for e in examples]
    pairs = list(zip(flagged, harmful, strict=True))
    overall = _scores(pairs.count((True, True)), pairs.count((True, False)), pairs.count((False, True)))
    false_positive_rate = {}
    for group in ("benign_alarming", "benign"):
        members = [e for e in examples if e.group == group]
        false_positive_rate[group] = sum(bool(found[e.id]) for e in members) / len(members) if members else None
    missed = [e.id for e in examples if e.labels - found[e.id]]
    sweep = toxicity_sweep(examples, detector)
    false_alarms = [e.id for e in examples if found[e.id] - e.labels]
    return {
        "examples": len(examples),
        "groups": {group: sum(e.group == group for e in examples) for group in GROUPS},
        "toxicity_threshold": params.toxicity_threshold,
        "overall": overall,
        "categories": per_category,
        "false_positive_rate": false_positive_rate,
        "toxicity_thresholds": sweep,
        "missed": missed,
        "false_alarms": false_alarms,
    }


TOXICITY_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def toxicity_sweep(examples: list[Example], detector: ContentFilter) -> list[dict]:
    """Toxicity's precision, recall and benign false-positive rate at other thresholds: an
    example's score is its most toxic line's, so one classifier pass serves every threshold."""
    top = {e.id: max((f.score for f in detector.toxic_lines(e.text, threshold=0.0)), default=0.0) for e in examples}
    rows = []
    for threshold in TOXICITY_THRESHOLDS:
        flagged = {e.id for e in examples if top[e.id] >= threshold}
        tp = sum(e.id in flagged and "toxicity" in e.labels for e in examples)
        fp = sum(e.id in flagged and "toxicity" not in e.labels for e in examples)
        fn = sum(e.id not in flagged and "toxicity" in e.labels for e in examples)
        alarming = [e for e in examples if e.group == "benign_alarming"]
        fpr = sum(e.id in flagged for e in alarming) / len(alarming) if alarming else None
        rows.append({"threshold": threshold, **_scores(tp, fp, fn), "false_positive_rate": fpr})
    return rows


# Installed packages whose source is human-written Python that neither this project nor the
# training corpus (the standard library) contains.
FOREIGN_PACKAGES = ("click", "rich", "pydantic", "httpx", "yaml", "typer", "lark", "tqdm", "jinja2", "packaging")
PROMPT_TOKENS = 32  # of a val document, the prompt each watermarked and plain sample continues


def foreign_code(per_package: int = 12, min_chars: int = 2000) -> list[str]:
    """Source files of installed packages (found offline in the running environment), a few per package."""
    texts = []
    for package in FOREIGN_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        files = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.rglob("*.py"))]
        texts += [text for text in files if len(text) >= min_chars][:per_package]
    return texts


REPETITIVE_SHARE = 0.5  # a sample whose distinct (previous, token) pairs are fewer than this share loops


def _detect(
    mark: Watermark, model: TissLM, ids: list[int], vocab_size: int, count_repeats: bool = False
) -> Detection | None:
    """The detector's verdict on token ids, as `tisslm watermark detect` reaches it; None when
    nothing in them can be scored."""
    entropies = token_entropies(model, ids, vocab_size) if mark.entropy_threshold > 0 else None
    try:
        return mark.detect(ids, entropies, count_repeats=count_repeats)
    except TissLMError:
        return None


def repetition_report(found: list[Detection | None], recounted: list[Detection | None]) -> dict:
    """Detection on repetitive samples (distinct pairs under REPETITIVE_SHARE of those scored) and
    on the others, and what scoring every pair, repeats included, would have said instead."""
    rows = [(d, r) for d, r in zip(found, recounted, strict=True) if d is not None and r is not None]
    looping = [(d, r) for d, r in rows if d.distinct_share < REPETITIVE_SHARE]
    others = [(d, r) for d, r in rows if d.distinct_share >= REPETITIVE_SHARE]

    def part(group: list[tuple[Detection, Detection]]) -> dict:
        return {
            "samples": len(group),
            "detected": sum(d.watermarked for d, _ in group) / len(group) if group else None,
            "mean_z": statistics.fmean(d.z for d, _ in group) if group else None,
            "mean_z_counting_repeats": statistics.fmean(r.z for _, r in group) if group else None,
            "mean_distinct_pairs": statistics.fmean(d.tokens_scored for d, _ in group) if group else None,
        }

    return {
        "distinct_share_below": REPETITIVE_SHARE,
        "mean_distinct_share": statistics.fmean(d.distinct_share for d, _ in rows) if rows else None,
        "repetitive": part(looping),
        "others": part(others),
    }


@torch.no_grad()
def continuation_bits_per_byte(
    model: TissLM, tokenizer: Tokenizer, prompts: list[list[int]], outputs: list[list[int]]
) -> float:
    """Bits per byte of the generated tokens under the (unwatermarked) model, given their prompts:
    what the watermark costs in the model's own judgement of the text."""
    nats, text_bytes = 0.0, 0
    for prompt, output in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt + output])  # (1, T)
        logits = model(ids)[0, len(prompt) - 1 : -1].float()  # (len(output), V): each output token's prediction
        nats -= logits.log_softmax(-1).gather(-1, torch.tensor(output)[:, None]).sum().item()
        text_bytes += len(tokenizer.decode(output).encode("utf-8"))
    return nats / math.log(2) / max(text_bytes, 1)


def watermark_metrics(
    model: TissLM,
    tokenizer: Tokenizer,
    safety: SafetyParams,
    key: str,
    sampling: SamplingParams,
    human: dict[str, list[str]],
    plot: Path,
) -> dict:
    """Detection rate of watermarked samples at each length, false positives on plain samples and
    on each set of human-written texts (`human["val"]` also gives the prompts), the quality cost,
    and a histogram of the z-scores (`plot`).

    Samples are decoded to text and encoded again before detection, as a detector meets them.
    """
    params, vocab_size = safety.watermark, tokenizer.get_vocab_size()
    mark = Watermark(key, params, vocab_size)
    longest = max(safety.watermark_lengths)
    encoded = (tokenizer.encode(text).ids for text in human["val"])
    starts = [ids[:PROMPT_TOKENS] for ids in encoded if len(ids) >= PROMPT_TOKENS]
    if not starts:
        raise TissLMError(f"no val document has {PROMPT_TOKENS} tokens to prompt the watermark samples with")
    prompts = list(itertools.islice(itertools.cycle(starts), safety.watermark_samples))
    draw = {
        "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
        "seed": 0 if sampling.seed is None else sampling.seed, "vocab_limit": vocab_size,
    }  # fmt: skip
    marked = generate(model, prompts, longest, logits_processor=mark, **draw)
    plain = generate(model, prompts, longest, **draw)

    def verdicts(samples: list[list[int]], length: int, count_repeats: bool = False) -> list[Detection | None]:
        return [
            _detect(mark, model, tokenizer.encode(tokenizer.decode(s[:length])).ids, vocab_size, count_repeats)
            for s in samples
        ]

    def rate(found: list[Detection | None]) -> float:
        return sum(d is not None and d.watermarked for d in found) / len(found)

    detection = {str(n): verdicts(marked, n) for n in sorted(safety.watermark_lengths)}
    negatives = {"plain_samples": verdicts(plain, longest)}
    recounted = {"plain_samples": verdicts(plain, longest, count_repeats=True)}
    for name, texts in human.items():
        negatives[name] = [_detect(mark, model, tokenizer.encode(t).ids[:longest], vocab_size) for t in texts]
        recounted[name] = [_detect(mark, model, tokenizer.encode(t).ids[:longest], vocab_size, True) for t in texts]
    zs = {
        name: [d.z for d in found if d is not None]
        for name, found in {"watermarked": detection[str(longest)], **negatives}.items()
    }
    _plot_z(zs, params.z_threshold, longest, plot)
    plain_bpb = continuation_bits_per_byte(model, tokenizer, prompts, plain)
    marked_bpb = continuation_bits_per_byte(model, tokenizer, prompts, marked)
    return {
        "gamma": params.gamma,
        "delta": params.delta,
        "entropy_threshold": params.entropy_threshold,
        "z_threshold": params.z_threshold,
        "samples": len(prompts),
        "sampling": {k: v for k, v in draw.items() if k != "vocab_limit"},
        "detection_rate": {n: rate(found) for n, found in detection.items()},
        "mean_z": {n: statistics.fmean(d.z for d in found if d is not None) for n, found in detection.items()},
        "false_positive_rate": {name: rate(found) for name, found in negatives.items()},
        "human_documents": {name: len(found) for name, found in negatives.items()},
        "max_z": {name: max(z, default=None) for name, z in zs.items() if name != "watermarked"},
        # Each (previous, token) pair scored once (the detector) against every pair scored: what repeats do.
        "repetition": repetition_report(detection[str(longest)], verdicts(marked, longest, count_repeats=True)),
        "max_z_counting_repeats": {
            name: max((d.z for d in found if d is not None), default=None) for name, found in recounted.items()
        },
        "false_positive_rate_counting_repeats": {name: rate(found) for name, found in recounted.items()},
        "quality": {
            "bits_per_byte_plain": plain_bpb,
            "bits_per_byte_watermarked": marked_bpb,
            "relative_increase": marked_bpb / plain_bpb - 1,
        },
    }


def _plot_z(zs: dict[str, list[float]], threshold: float, length: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    for name, values in zs.items():
        axes.hist(values, bins=30, alpha=0.5, label=f"{name} ({len(values)})")
    axes.axvline(threshold, color="black", linestyle="--", label=f"threshold z = {threshold:g}")
    axes.set_xlabel(f"z-score of the first {length} tokens")
    axes.set_ylabel("texts")
    axes.set_title("Watermark z-scores: watermarked samples, plain samples, human code")
    axes.legend()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def goals_reached(filtered: dict, marked: dict, goals: SafetyGoals) -> dict[str, bool]:
    """Whether `filter_metrics` and `watermark_metrics` reach params.yaml's safety.goals; watermark
    detection is judged at the longest length measured, false positives on the worst negative set."""
    longest = max(marked["detection_rate"], key=int)
    return {
        "filter_f1": filtered["overall"]["f1"] >= goals.filter_f1,
        "filter_false_positive_rate": filtered["false_positive_rate"]["benign_alarming"]
        <= goals.filter_false_positive_rate,
        "watermark_detection": marked["detection_rate"][longest] >= goals.watermark_detection,
        "watermark_false_positive_rate": max(marked["false_positive_rate"].values())
        <= goals.watermark_false_positive_rate,
    }
