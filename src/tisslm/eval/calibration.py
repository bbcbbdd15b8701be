"""Calibration of next-token predictions: when the model's top-1 probability is 0.8, is it right 80% of the time?

Bits per byte scores the whole distribution but cannot say whether a probability can be taken at its
word, which is what a caller needs who thresholds on confidence or shows it to a user. For every scored
token this keeps the top-1 probability (the confidence) and whether the top-1 token was the target,
sorted into `bins` equal-width confidence bins, and reports

    ECE   = sum_b n_b / N * |acc_b - conf_b|   expected calibration error (Guo et al. 2017, "On Calibration
                                               of Modern Neural Networks", section 2)
    MCE   = max_b |acc_b - conf_b|             maximum calibration error, over the non-empty bins
    Brier = 1/N sum_t sum_k (p_k - y_k)^2      multi-class Brier score (Brier 1950)

ECE and MCE judge the top-1 only and depend on the bin count, hence the count is reported with them;
the Brier score is a proper scoring rule over the whole distribution, so it cannot be gamed by hedging.
Only per-bin sums are kept, so any number of batches costs O(bins) memory.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch

from tisslm.core.io import atomic_write_bytes, atomic_write_text

CSV_COLUMNS = ("bin_lower", "bin_upper", "count", "confidence", "accuracy")


class Calibration:
    """Streaming per-bin sums of top-1 confidence and correctness, plus the summed Brier score.

    Bin b holds the confidences in (b/bins, (b+1)/bins], Guo et al.'s I_m; feed it batches with
    `update` (the `on_logits` hook of `tisslm.eval.evaluate.evaluate_texts` takes it as is).
    """

    def __init__(self, bins: int = 15) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"calibration bins must be a positive integer, got {bins!r}")
        self.bins = bins
        self.count = torch.zeros(bins, dtype=torch.float64)  # (bins,) tokens per bin
        self.confidence = torch.zeros(bins, dtype=torch.float64)  # (bins,) summed top-1 probabilities
        self.correct = torch.zeros(bins, dtype=torch.float64)  # (bins,) tokens whose top-1 was the target
        self.brier = 0.0  # summed over tokens

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the tokens of one batch: `logits` (tokens, vocab) of their next-token distributions, and
        `targets` (tokens,) the ids that came."""
        if logits.dim() != 2 or targets.shape != logits.shape[:1]:
            raise ValueError(
                f"expected logits (tokens, vocab) and targets (tokens,), got {logits.shape}, {targets.shape}"
            )
        # float64: sum_k p_k^2 over a large vocabulary then stays exact far beyond the figures' precision.
        probs = logits.softmax(-1, dtype=torch.float64)  # (N, V)
        confidence, top1 = probs.max(-1)  # (N,), (N,)
        correct = (top1 == targets).double()  # (N,)
        p_target = probs.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
        brier = 1 - 2 * p_target + probs.square().sum(-1)  # (N,) sum_k (p_k - y_k)^2 with no one-hot y
        index = (confidence * self.bins).ceil().long().clamp(1, self.bins) - 1  # (N,) bin of each token
        self.count += torch.bincount(index, minlength=self.bins).cpu()
        self.confidence += torch.bincount(index, weights=confidence, minlength=self.bins).cpu()
        self.correct += torch.bincount(index, weights=correct, minlength=self.bins).cpu()
        self.brier += brier.sum().item()

    @property
    def tokens(self) -> int:
        return int(self.count.sum().item())

    def table(self) -> list[dict]:
        """Per bin: its edges, token count, mean confidence and accuracy (None for an empty bin): the
        reliability diagram's data."""
        rows = []
        for b in range(self.bins):
            n = int(self.count[b].item())
            rows.append(
                {
                    "bin_lower": b / self.bins,
                    "bin_upper": (b + 1) / self.bins,
                    "count": n,
                    "confidence": self.confidence[b].item() / n if n else None,
                    "accuracy": self.correct[b].item() / n if n else None,
                }
            )
        return rows

    def metrics(self) -> dict:
        """ece, mce, brier, accuracy, mean_confidence over every token added, with the bin and token counts."""
        n = self.tokens
        if n == 0:
            raise ValueError("no tokens were added: calibration is undefined")
        filled = self.count > 0  # (bins,)
        gap = (self.correct - self.confidence).abs()  # (bins,) n_b * |acc_b - conf_b|, 0 for an empty bin
        return {
            "ece": gap.sum().item() / n,
            "mce": (gap[filled] / self.count[filled]).max().item(),
            "brier": self.brier / n,
            "accuracy": self.correct.sum().item() / n,
            "mean_confidence": self.confidence.sum().item() / n,
            "bins": self.bins,
            "tokens": n,
        }


def write_reliability_csv(calibration: Calibration, path: Path) -> None:
    """The non-empty bins as DVC plot data (x: confidence, y: accuracy); an empty bin has no point to draw."""
    lines = [",".join(CSV_COLUMNS)]
    lines += [
        ",".join(f"{row[c]}" if c == "count" else f"{row[c]:.6f}" for c in CSV_COLUMNS)
        for row in calibration.table()
        if row["count"]
    ]
    atomic_write_text(path, "\n".join(lines) + "\n")


def write_reliability_png(calibration: Calibration, path: Path) -> None:
    """Guo et al.'s reliability diagram: accuracy per bin against the diagonal of perfect calibration, the
    gap to each bin's mean confidence shaded, and below it each bin's share of tokens (its ECE weight)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    metrics, table = calibration.metrics(), calibration.table()
    filled = [row for row in table if row["count"]]
    lowers = [row["bin_lower"] for row in filled]
    accuracy = [row["accuracy"] for row in filled]
    width = 1 / calibration.bins
    figure, (top, bottom) = plt.subplots(
        2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": (3, 1)}, constrained_layout=True
    )
    top.bar(lowers, accuracy, width=width, align="edge", color="tab:blue", edgecolor="black", label="accuracy")
    gaps = [row["confidence"] - row["accuracy"] for row in filled]
    top.bar(lowers, gaps, width=width, bottom=accuracy, align="edge", color="tab:red", alpha=0.3, hatch="//",
            edgecolor="tab:red", label="gap to mean confidence")  # fmt: skip
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy (top-1 token was the target)")
    top.set_title(
        f"Next-token reliability: ECE {metrics['ece']:.4f} ({calibration.bins} bins), "
        f"MCE {metrics['mce']:.3f}\nBrier {metrics['brier']:.4f}, accuracy {metrics['accuracy']:.3f}, "
        f"{metrics['tokens']:,} tokens"
    )
    top.legend(loc="upper left")
    bottom.bar([row["bin_lower"] for row in table], [row["count"] / metrics["tokens"] for row in table],
               width=width, align="edge", color="tab:gray", edgecolor="black")  # fmt: skip
    bottom.set(xlabel="confidence (top-1 probability)", ylabel="share of tokens")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
