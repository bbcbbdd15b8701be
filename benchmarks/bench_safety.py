"""Safety benchmarks: writes benchmarks/results/safety.json.

- content filter throughput: `ContentFilter.apply` over the standard library's source, cut into
  20-line pieces (about a reply's worth), in lines/s and MB/s, against the anonymiser alone (the
  clean stage's cost for the same text): the ratio is what the classifier and the shell patterns add;
- stream guard overhead: an `OutputGuard` fed a 40-line reply token by token (8 characters a piece),
  against one `apply` of the whole reply: what checking every line as it completes costs;
- watermark overhead in `generate`: batch-1 sampling of 256 tokens with and without the
  watermark, alternating rounds, on models/model when it exists (else a random model of its shape).

Run from the repository root: python benchmarks/bench_safety.py
"""

from __future__ import annotations

import platform
import statistics
import sysconfig
import time
from pathlib import Path

import torch

from tisslm.core.config import AnonymizeParams, ContentFilterParams, ModelConfig, WatermarkParams, load_params
from tisslm.core.generate import generate
from tisslm.core.io import atomic_write_json
from tisslm.core.model import TissLM
from tisslm.data.anonymize import anonymize
from tisslm.safety.filters import ContentFilter, OutputGuard
from tisslm.safety.watermark import Watermark

OUT = Path(__file__).parent / "results" / "safety.json"
MODEL_DIR = Path("models/model")
PIECE_LINES = 20
GUARD_LINES = 40
TOKENS = 256
ROUNDS = 5


def stdlib_pieces(limit_bytes: int = 2_000_000) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    pieces, size = [], 0
    for path in sorted(root.glob("*.py")):
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
        for start in range(0, len(lines), PIECE_LINES):
            piece = "".join(lines[start : start + PIECE_LINES])
            pieces.append(piece)
            size += len(piece.encode())
        if size >= limit_bytes:
            break
    return pieces


def best_seconds(work, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def filter_throughput(pieces: list[str]) -> dict:
    content_filter = ContentFilter(ContentFilterParams())
    content_filter.apply("warm up: 4111 1111 1111 1111, DE89 3704 0044 0532 0130 00, you idiot")
    params = AnonymizeParams()
    lines = sum(piece.count("\n") for piece in pieces)
    megabytes = sum(len(piece.encode()) for piece in pieces) / 1e6
    filtered = best_seconds(lambda: [content_filter.apply(piece) for piece in pieces])
    anonymized = best_seconds(lambda: [anonymize(piece, params) for piece in pieces])
    return {
        "pieces": len(pieces),
        "lines": lines,
        "megabytes": round(megabytes, 3),
        "filter_lines_per_s": lines / filtered,
        "filter_mb_per_s": megabytes / filtered,
        "anonymizer_lines_per_s": lines / anonymized,
        "filter_over_anonymizer_time": filtered / anonymized,
    }


def guard_overhead(pieces: list[str]) -> dict:
    content_filter = ContentFilter(ContentFilterParams())
    reply = "".join(pieces[: GUARD_LINES // PIECE_LINES])

    def streamed() -> None:
        guard = OutputGuard(content_filter)
        for start in range(0, len(reply), 8):
            guard.add(reply[start : start + 8])
        guard.finish()

    stream_s = best_seconds(streamed)
    whole_s = best_seconds(lambda: content_filter.apply(reply))
    return {
        "reply_lines": reply.count("\n"),
        "guarded_stream_ms": stream_s * 1000,
        "one_apply_ms": whole_s * 1000,
        "ratio": stream_s / whole_s,
        "per_line_ms": stream_s * 1000 / max(reply.count("\n"), 1),
    }


def watermark_overhead() -> dict:
    if (MODEL_DIR / "config.json").is_file():
        model, source = TissLM.from_pretrained(MODEL_DIR).eval(), str(MODEL_DIR)
    else:
        model, source = TissLM(load_params(None).model).eval(), "random weights, params.yaml's shape"
    config: ModelConfig = model.config
    mark = Watermark("benchmark-key", WatermarkParams(), config.vocab_size)
    prompt = [[1, 2, 3, 4]]
    draw = {"temperature": 0.8, "top_k": 50, "top_p": 0.95, "seed": 0}
    generate(model, prompt, 16, **draw)  # warm up
    plain, marked = [], []
    for _ in range(ROUNDS):  # alternating, so that drift on a noisy machine hits both alike
        started = time.perf_counter()
        generate(model, prompt, TOKENS, **draw)
        plain.append(time.perf_counter() - started)
        started = time.perf_counter()
        generate(model, prompt, TOKENS, logits_processor=mark, **draw)
        marked.append(time.perf_counter() - started)
    plain_s, marked_s = statistics.median(plain), statistics.median(marked)
    return {
        "model": source,
        "tokens": TOKENS,
        "rounds": ROUNDS,
        "plain_tokens_per_s": TOKENS / plain_s,
        "watermarked_tokens_per_s": TOKENS / marked_s,
        "slowdown": marked_s / plain_s,
    }


def main() -> None:
    torch.manual_seed(0)
    pieces = stdlib_pieces()
    results = {
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "filter": filter_throughput(pieces),
        "guard": guard_overhead(pieces),
        "watermark": watermark_overhead(),
    }
    atomic_write_json(OUT, results)
    f, g, w = results["filter"], results["guard"], results["watermark"]
    print(f"filter: {f['filter_lines_per_s']:,.0f} lines/s ({f['filter_mb_per_s']:.2f} MB/s), "
          f"{f['filter_over_anonymizer_time']:.2f}x the anonymiser's time")  # fmt: skip
    print(f"guard: {g['per_line_ms']:.2f} ms per line streamed, {g['ratio']:.1f}x one apply of the reply")
    print(f"watermark: {w['slowdown']:.3f}x the time of plain sampling ({w['watermarked_tokens_per_s']:.0f} tokens/s)")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
