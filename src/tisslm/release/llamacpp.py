"""llama.cpp as a decode engine: the model's own GGUF export, decoded by llama.cpp on a CPU.

On a CPU, at this project's model sizes, a decode step is bound by reading the weights and by
per-operation overhead; llama.cpp pays neither (half-precision or int8 weights, a C++ graph
with no dispatcher), and `benchmarks/bench_model.py` measures it about 3x ahead of TissLM's own
compiled step at batch 1 and 1.8x at batch 8. So this engine puts it behind the same interface (`DecodeEngine`): `generate`,
the server's continuous batching (`serve.backend: llama.cpp`) and everything above them decode
through it unchanged, sampling, logprobs, watermarking and speculative decoding included, since
those work on the logits it returns.

It drives llama.cpp's low-level API as its batched example does: each slot is a sequence id in
one KV cache, a prompt is decoded into its slot, and a step is one `llama_decode` of one token per
active slot. Needs the `llama` extra (llama-cpp-python, compiled at install).
"""

from __future__ import annotations

import logging
import tempfile
import weakref
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from tisslm.core.decode import DecodeEngine
from tisslm.core.errors import TissLMError
from tisslm.core.model import TissLM


class LlamaCppDecoder(DecodeEngine):
    """A GGUF model with a KV cache of `slots` sequences of up to `max_len` positions each."""

    device = torch.device("cpu")

    def __init__(self, gguf_path: str | Path, slots: int, max_len: int, threads: int | None = None, n_batch: int = 512):
        try:
            import llama_cpp
        except ImportError:
            raise TissLMError("the llama.cpp backend needs the `llama` extra: pip install 'tisslm[llama]'") from None
        self._llama = llama_cpp
        self.slots, self.max_len, self.n_batch = slots, max_len, max(n_batch, slots)
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # as Llama(verbose=False)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self._model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not self._model:
            raise TissLMError(f"{gguf_path}: llama.cpp could not load it")
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = slots
        # n_ctx counts the cells of all sequences; llama.cpp rounds each sequence's share up to 256.
        params.n_ctx = slots * -(-max_len // 256) * 256
        params.n_batch = params.n_ubatch = self.n_batch
        # A batched step is "a batch" to llama.cpp, run on n_threads_batch: both get the same threads.
        params.n_threads = params.n_threads_batch = threads or torch.get_num_threads()
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # measured slower here
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise TissLMError(f"llama.cpp could not create a context of {slots} x {max_len} positions")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._free = weakref.finalize(self, _free, llama_cpp, self._model, self._ctx, self._batch)
        self._lengths = [0] * slots

    @classmethod
    def for_model(cls, model: TissLM, tokenizer: Tokenizer, slots: int, tensor_type: str = "F16", **options):
        """Export `model` to GGUF (`tensor_type`: F16 or Q8_0) in a temporary file and load it."""
        from tisslm.release.export import export_gguf

        with tempfile.TemporaryDirectory(prefix="tisslm-gguf-") as tmp:
            path = export_gguf(model, tokenizer, Path(tmp) / f"model-{tensor_type}.gguf", tensor_type)
            return cls(path, slots, model.config.max_seq_len, **options)  # llama.cpp has read the file

    def prefill(self, slot: int, tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        self.rewind(slot, 0)
        return self._feed([(slot, token, all_logits or i == len(tokens) - 1) for i, token in enumerate(tokens)])

    def extend(self, slot: int, tokens: list[int]) -> torch.Tensor:
        return self._feed([(slot, token, True) for token in tokens])

    def step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        return self._feed([(slot, token, True) for slot, token in zip(slots, tokens, strict=True)])

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def rewind(self, slot: int, length: int) -> None:
        self._llama.llama_memory_seq_rm(self._memory, slot, length, -1)  # positions [length, end) of the slot
        self._lengths[slot] = length

    def _feed(self, entries: list[tuple[int, int, bool]]) -> torch.Tensor:
        """Decode (slot, token, wants_logits) entries in order, each at its slot's next position, in
        batches of n_batch; the logits (rows wanted, vocab) in the order asked."""
        for slot, count in Counter(slot for slot, _, _ in entries).items():
            if self._lengths[slot] + count > self.max_len:
                raise TissLMError(f"KV cache holds {self.max_len} positions per slot; slot {slot} would exceed it")
        rows: list[np.ndarray] = []
        batch = self._batch
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start : start + self.n_batch]
            for i, (slot, token, wanted) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, self._lengths[slot], 1, wanted
                batch.seq_id[i][0] = slot
                self._lengths[slot] += 1
            batch.n_tokens = len(chunk)
            if (rc := self._llama.llama_decode(self._ctx, batch)) != 0:
                raise TissLMError(f"llama_decode failed ({rc})")
            wanted_rows = sum(1 for _, _, wanted in chunk if wanted)
            if wanted_rows:
                logits = self._llama.llama_get_logits(self._ctx)  # (wanted rows, vocab), in batch order
                rows.append(np.ctypeslib.as_array(logits, shape=(wanted_rows, self.n_vocab)).copy())
        return torch.from_numpy(np.concatenate(rows)) if rows else torch.empty(0, self.n_vocab)

    def close(self) -> None:
        """Free llama.cpp's model, context and batch now (else when the decoder is collected)."""
        self._free()


def _free(llama_cpp, model, ctx, batch) -> None:
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)


def decode_engine(backend: str, model: TissLM, tokenizer: Tokenizer, slots: int) -> DecodeEngine | None:
    """The engine `backend` names for `model` (serve.backend, `tisslm generate --backend`); None
    for TissLM's own, which its users build with their own options."""
    if backend == "llama.cpp":
        return LlamaCppDecoder.for_model(model, tokenizer, slots)
    if backend != "torch":
        raise TissLMError(f"backend {backend!r}: one of torch, llama.cpp")
    return None
