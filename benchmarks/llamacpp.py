"""llama.cpp's greedy decode of several sequences at once, for the benchmarks.

llama-cpp-python's `Llama` decodes one sequence at a time, so llama.cpp could only stand beside
TissLM's engine at batch 1. This module drives llama.cpp's low-level API instead, as llama.cpp's
own batched example does: every prompt is its own sequence id in one KV cache, and each step
decodes one token of every sequence in a single `llama_decode` call. The next token is the argmax
of each row's logits in numpy (no sampler chain), which is what greedy decoding in TissLM does.

`LlamaCppBatch` loads the model and context once, so that timing `greedy` leaves loading out.

Self-check: `python benchmarks/llamacpp.py` exports a randomly initialised TissLM to GGUF, checks
the tokens against `Llama.generate` (greedy) and batch 8 against each row decoded alone, and
prints tokens/s at batch 1 and 8 (both KV layouts) with 1 and 2 threads.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from types import TracebackType

import llama_cpp
import numpy as np


class LlamaCppBatch:
    """A GGUF model with a context for `n_seq` sequences of up to `n_ctx` tokens each (prompt and
    new tokens). Free it with `close()` or use it as a context manager.

    kv_unified=False (llama.cpp's default) gives every sequence a KV stream of its own, attended
    over alone; True puts all sequences' cells in one stream, each token attending over all of
    them behind a mask. On the benchmark's small model at batch 8 x 272 tokens with one thread the
    unified cache decoded ~35% faster, with two threads slower; at batch 16 the two were level.
    Neither layout is the faster everywhere, so the benchmarks should measure both."""

    def __init__(
        self,
        model_path: str | Path,
        n_seq: int,
        n_ctx: int,
        threads: int,
        n_batch: int = 512,
        kv_unified: bool = False,
    ) -> None:
        if n_batch < n_seq:
            raise ValueError(f"n_batch={n_batch} must hold one token of each of the n_seq={n_seq} sequences")
        self.n_seq, self.n_batch = n_seq, n_batch
        self._model = self._ctx = self._batch = None
        # As Llama(verbose=False) does; else llama-cpp-python prints every llama.cpp log line.
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0  # CPU, as Llama's default
        self._model = llama_cpp.llama_model_load_from_file(str(model_path).encode(), model_params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = n_seq
        params.kv_unified = kv_unified
        # n_ctx counts the cells of all sequences. llama.cpp pads each sequence's stream to a
        # multiple of 256 cells (and warns when n_ctx does not divide so); padding here keeps it quiet.
        params.n_ctx = n_seq * -(-n_ctx // 256) * 256
        params.n_batch = params.n_ubatch = n_batch
        # llama.cpp runs any batch of more than one token, a batched decode step included, on n_threads_batch.
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # Llama's default, so that figures compare
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            self.close()
            raise RuntimeError(f"llama.cpp could not create a context for {n_seq} x {n_ctx} tokens")
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def greedy(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """`new_tokens` greedy tokens after each prompt; no stop token ends a sequence early."""
        if not 0 < len(prompts) <= self.n_seq or not all(prompts) or new_tokens < 1:
            raise ValueError(f"greedy takes 1 to {self.n_seq} non-empty prompts and new_tokens >= 1")
        # Resetting the cells is enough: cells no sequence holds are masked out, never read.
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), False)
        out: list[list[int]] = [[] for _ in prompts]
        # Prefill: all prompts packed into batches of n_batch tokens, logits for each one's last token only.
        tokens = [(seq, pos, token) for seq, prompt in enumerate(prompts) for pos, token in enumerate(prompt)]
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start : start + self.n_batch]
            last = [pos == len(prompts[seq]) - 1 for seq, pos, _ in chunk]
            for i, ((seq, pos, token), logits) in enumerate(zip(chunk, last, strict=True)):
                self._set(i, token, pos, seq, logits)
            self._decode(len(chunk))
            for i, ((seq, _, _), logits) in enumerate(zip(chunk, last, strict=True)):
                if logits:
                    out[seq].append(self._argmax(i))
        # Decode: one token of every sequence per llama_decode call, row i being sequence i.
        for _ in range(new_tokens - 1):
            for seq, (prompt, generated) in enumerate(zip(prompts, out, strict=True)):
                self._set(seq, generated[-1], len(prompt) + len(generated) - 1, seq, True)
            self._decode(len(out))
            for seq, generated in enumerate(out):
                generated.append(self._argmax(seq))
        return out

    def _set(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self._batch
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq

    def _decode(self, n_tokens: int) -> None:
        self._batch.n_tokens = n_tokens
        if (rc := llama_cpp.llama_decode(self._ctx, self._batch)) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, i: int) -> int:
        """The argmax of batch row i's logits; numpy returns the first of tied maxima, as llama.cpp's greedy sampler."""
        logits = llama_cpp.llama_get_logits_ith(self._ctx, i)
        return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
        if self._model:
            llama_cpp.llama_model_free(self._model)
        self._model = self._ctx = self._batch = None

    def __enter__(self) -> LlamaCppBatch:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()


def batched_greedy(model_path: str | Path, prompts: list[list[int]], new_tokens: int, threads: int) -> list[list[int]]:
    """`new_tokens` greedy tokens after each prompt, all prompts decoded together; loads the model each call."""
    with LlamaCppBatch(model_path, len(prompts), max(map(len, prompts)) + new_tokens, threads) as llm:
        return llm.greedy(prompts, new_tokens)


def _reference(path: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """Llama.generate's greedy tokens; its generator never stops by itself, end of text included."""
    llm = llama_cpp.Llama(str(path), n_ctx=len(prompt) + new_tokens, n_threads=1, n_batch=64, verbose=False)
    tokens: list[int] = []
    for token in llm.generate(prompt, top_k=1, temp=0.0):
        tokens.append(token)
        if len(tokens) == new_tokens:
            return tokens
    raise AssertionError("unreachable: generate yields until stopped")


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


def _self_check(directory: Path, new_tokens: int = 256, repeats: int = 3) -> None:
    import torch

    from tisslm.core.config import TokenizerParams
    from tisslm.core.model import ModelConfig, TissLM
    from tisslm.core.tokenizer import train_bpe
    from tisslm.release.export import GGUF_TYPES, export_gguf

    sources = sorted((Path(__file__).parents[1] / "src").rglob("*.py"))
    tokenizer = train_bpe((p.read_text() for p in sources), TokenizerParams(vocab_size=8192), False)
    config = ModelConfig(vocab_size=tokenizer.get_vocab_size(), d_model=256, n_layers=6, n_heads=8, n_kv_heads=2,
                         d_ff=704, max_seq_len=1024)  # fmt: skip
    torch.manual_seed(0)
    model = TissLM(config).eval()
    prompts = [[1 + (7 * i + j) % 200 for j in range(16)] for i in range(8)]
    n_ctx = len(prompts[0]) + new_tokens
    cases = {"batch 1": (1, False), "batch 8": (8, False), "batch 8 unified KV": (8, True)}
    ok = True
    for tensor_type in GGUF_TYPES:
        path = export_gguf(model, tokenizer, directory / f"tisslm-{tensor_type}.gguf", tensor_type)
        reference = [_reference(path, prompt, new_tokens) for prompt in prompts]
        for threads in (1, 2):
            for name, (batch, kv_unified) in cases.items():
                # Every prompt, `batch` at a time, row by row against Llama.generate on that prompt alone.
                with LlamaCppBatch(path, batch, n_ctx, threads, kv_unified=kv_unified) as llm:
                    rows = [
                        row
                        for i in range(0, len(prompts), batch)
                        for row in llm.greedy(prompts[i : i + batch], new_tokens)
                    ]
                diffs = {i: d for i, (row, ref) in enumerate(zip(rows, reference, strict=True))
                         if (d := _first_difference(row, ref)) is not None}  # fmt: skip
                ok &= not diffs
                verdict = "equal" if not diffs else f"DIFFER (row: first differing token) {diffs}"
                print(f"{tensor_type} {threads} threads {name} vs Llama.generate: {verdict}", flush=True)
        for threads in (1, 2):
            for name, (batch, kv_unified) in cases.items():
                with LlamaCppBatch(path, batch, n_ctx, threads, kv_unified=kv_unified) as llm:
                    llm.greedy(prompts[:batch], 8)  # warm-up: first-call allocations
                    seconds = []
                    for _ in range(repeats):
                        start = time.perf_counter()
                        llm.greedy(prompts[:batch], new_tokens)
                        seconds.append(time.perf_counter() - start)
                tokens_per_s = batch * new_tokens / statistics.median(seconds)
                print(f"{tensor_type} {threads} threads {name}: {tokens_per_s:,.0f} tokens/s", flush=True)
    if not ok:
        raise SystemExit("llama.cpp batched greedy tokens differ from Llama.generate")


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _self_check(Path(tmp))
