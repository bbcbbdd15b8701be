"""The decode engine: a model, a KV cache of `slots` sequences, and one step that advances them all.

Every place the model speaks decodes through a `DecodeEngine`: `generate` (its slots are the
batch's rows), the server's continuous batching (its slots are the server's), and through them
chat, TissLang, evaluate and the MLflow pyfunc. TissLM's own is `Decoder`, below; llama.cpp's,
behind the same interface, is `tisslm.release.llamacpp.LlamaCppDecoder`.

A prompt enters a slot by `prefill` (any length, eager). Then `step` feeds one token to each
active slot and returns each one's next-token logits. Compiled, the step feeds the first n slots
(n from `step_buckets`, the fewest that hold the active ones) and attends over the first L
positions of the preallocated buffer under a mask (`KVCache.static`; L from `length_buckets`,
the shortest past every active slot's position), so its shapes never change for a given (n, L):
one graph per pair of buckets. On a CPU that graph is Inductor's C++ (the Python and dispatch overhead of
~150 small ops per token is what eager decoding pays at this size); on a GPU it is captured in a
CUDA graph and replayed, one launch per token instead of hundreds. Compilation is a first-call
cost (seconds on a CPU, cached on disk in TORCHINDUCTOR_CACHE_DIR), so it is an option, worth it
for a server or a long generation; the eager step is the tested reference.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from tisslm.core.cache import KVCache
from tisslm.core.config import Precision
from tisslm.core.errors import TissLMError
from tisslm.core.model import TissLM

PRECISIONS: dict[Precision, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def for_decoding(model: TissLM, precision: str) -> TissLM:
    """`model` in eval mode with its weights (and so its activations and KV cache) in `precision`
    (fp32 | bf16). bf16 halves the bytes a step reads and, compiled, runs on the CPU's bf16
    instructions (AVX512-BF16, AMX) or a GPU's tensor cores; fp32 stays the reference."""
    if precision not in PRECISIONS:
        raise TissLMError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    return model.to(PRECISIONS[precision]).eval()


def native_bf16(device_type: str) -> bool:
    """Whether bf16 matmuls run natively on this kind of device (a CPU: as oneDNN says; CUDA: the GPU's)."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()


def compile_settings(device_type: str) -> dict:
    """torch.compile's arguments for the decode step on a device: CUDA graphs on a GPU (the step is
    launch-bound there); on a CPU, Inductor's C++ wrapper, which calls the kernels without Python."""
    settings: dict = {"fullgraph": True, "dynamic": False}
    if device_type == "cuda":
        return settings | {"mode": "reduce-overhead"}
    return settings | {"options": {"cpp_wrapper": True}}


def _step(model: TissLM, cache: KVCache, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Logits (n, vocab) of the token after `tokens` (n,) in the first n slots, attending over the first
    `length` positions of the buffer: the static decode step (`length` a constant: one graph per value)."""
    return model(tokens[:, None], cache=cache.static(tokens.size(0), length))[:, -1]  # (n, vocab)


def step_buckets(slots: int) -> list[int]:
    """How many slots a compiled step may run: powers of two up to `slots`, and `slots` itself. A step
    runs the smallest that holds every active slot (slots are handed out lowest first), so one request
    does not pay for a server's 32 slots, and there are only a few graphs to compile."""
    return sorted({min(2**i, slots) for i in range(slots.bit_length() + 1)})


def length_buckets(max_len: int, shortest: int = 128) -> list[int]:
    """How many key positions a compiled step may attend over: powers of two from `shortest` below
    `max_len`, and `max_len` itself. Attention over the whole buffer costs a short sequence as much as
    a full one; a few lengths keep that cost near the filled part with only a few graphs."""
    buckets, size = [], shortest
    while size < max_len:
        buckets.append(size)
        size *= 2
    return [*buckets, max_len]


def attended_length(position: int, max_len: int) -> int:
    """The bucket a step attends over when its furthest new token sits at `position` (0-based): the
    shortest of `length_buckets(max_len)` that holds keys 0..position, or max_len past the buffer."""
    return next((b for b in length_buckets(max_len) if b > position), max_len)


class DecodeEngine(ABC):
    """What the decoding loops (`generate`, the server's batcher) ask of an engine: `slots`
    sequences, each at its own length, fed a prompt, one token per step, or a speculative draft.
    Logits come back as float tensors on `device`, one row per token asked for."""

    slots: int
    device: torch.device

    @abstractmethod
    def prefill(self, slot: int, tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        """Start `slot` on a prompt; the logits (T, vocab) after each token, or (1, vocab) after the last."""

    @abstractmethod
    def extend(self, slot: int, tokens: list[int]) -> torch.Tensor:
        """Feed `tokens` after what `slot` holds; the logits (T, vocab) after each of them."""

    @abstractmethod
    def step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Feed one token to each of `slots`; the logits (len(slots), vocab) of each one's next token."""

    @abstractmethod
    def length(self, slot: int) -> int:
        """Positions `slot` holds."""

    @abstractmethod
    def rewind(self, slot: int, length: int) -> None:
        """Keep only the first `length` positions of `slot`."""

    def warm_up(self) -> None:  # noqa: B027 - a hook, empty for engines with no first-call cost
        """Pay any first-call cost (compilation) now."""

    def verify_draft(
        self, slot: int, token: int, draft: list[int], vocab_limit: int | None = None
    ) -> tuple[list[int], torch.Tensor]:
        """Speculative decoding's check: feed `token` and the drafted tokens after it in one forward,
        keep the longest prefix of the draft that greedy decoding would have produced, and forget the
        rest. Returns the accepted tokens and the logits (1, vocab) of the token that follows them."""
        kept = self.length(slot)
        logits = self.extend(slot, [token, *draft])  # (1 + drafted, vocab): each one's successor
        if vocab_limit is not None:
            logits[:, vocab_limit:] = float("-inf")
        predicted = logits.argmax(dim=-1).tolist()
        accepted = 0
        while accepted < len(draft) and draft[accepted] == predicted[accepted]:
            accepted += 1
        self.rewind(slot, kept + 1 + accepted)  # the token and the accepted drafts stay in the cache
        return draft[:accepted], logits[accepted : accepted + 1]


class Decoder(DecodeEngine):
    """TissLM's own engine: the model in PyTorch over a `KVCache`, its step static and optionally compiled."""

    def __init__(self, model: TissLM, slots: int, compile: bool = False):
        self.model = model.eval()
        parameter = next(model.parameters())
        self.device = parameter.device
        self.slots = slots
        # Buffers of max_seq_len positions whatever the prompts; a compiled step attends over a length bucket of them.
        self.cache = KVCache.for_model(model.config, slots, dtype=parameter.dtype, device=parameter.device)
        self.compiled = compile
        self._step = None
        if compile:
            # One graph per (step bucket, length bucket), per model: 16 for 8 slots over 1024 positions, more
            # than dynamo's default of 8, and a process (tests, a benchmark) may compile several models.
            graphs = len(step_buckets(slots)) * len(length_buckets(self.cache.max_len))
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64, 4 * graphs)
            self._step = torch.compile(_step, **compile_settings(self.device.type))

    def prefill(self, slot: int, tokens: list[int], all_logits: bool = False) -> torch.Tensor:
        self.cache.reset(slot)
        hidden = self._hidden(slot, tokens)  # (T, d_model)
        return self.model.lm_head(hidden if all_logits else hidden[-1:])  # only the rows asked for pay the head

    def extend(self, slot: int, tokens: list[int]) -> torch.Tensor:
        return self.model.lm_head(self._hidden(slot, tokens))

    def _hidden(self, slot: int, tokens: list[int]) -> torch.Tensor:
        idx = torch.tensor([tokens], dtype=torch.long, device=self.device)  # (1, T)
        return self.model.hidden_states(idx, cache=self.cache.rows([slot]))[0]  # (T, d_model)

    def length(self, slot: int) -> int:
        return self.cache.host_lengths[slot]

    def rewind(self, slot: int, length: int) -> None:
        self.cache.reset(slot, length)

    def step(self, slots: list[int], tokens: list[int]) -> torch.Tensor:
        """Compiled: the first n slots step (n the smallest bucket holding `slots`) over the first L
        positions (L the shortest length bucket past the furthest of `slots`): the static shape. The
        others among the n are fed a 0 and their outputs dropped (one may sit past L: it attends to
        garbage, harmlessly). Eager: the given slots step, over the keys up to the longest of them."""
        if not self.compiled:
            idx = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]  # (B, 1)
            return self.model(idx, cache=self.cache.rows(slots))[:, -1]  # (B, vocab)
        n = next(b for b in step_buckets(self.slots) if b > max(slots))
        length = attended_length(max(self.cache.host_lengths[slot] for slot in slots), self.cache.max_len)
        fed = [0] * n
        for slot, token in zip(slots, tokens, strict=True):
            fed[slot] = token
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be overwritten
        fed_tensor = torch.tensor(fed, dtype=torch.long, device=self.device)
        logits = self._step(self.model, self.cache, fed_tensor, length)
        for slot in range(n):  # the step counted on the device only
            self.cache.host_lengths[slot] += 1
        return logits[slots] if slots != list(range(n)) else logits.clone()  # never the graph's own buffer

    def warm_up(self) -> None:
        """Compile the step for every pair of buckets now, not on the request that first needs it."""
        if self.compiled:
            for length in length_buckets(self.cache.max_len):
                for n in step_buckets(self.slots):
                    for slot in range(n):
                        self.cache.reset(slot, length - 1)  # the furthest position this length holds
                    self.step(list(range(n)), [0] * n)
            for slot in range(self.slots):
                self.cache.reset(slot)


def draft_by_lookup(tokens: list[int], count: int, max_ngram: int = 3) -> list[int]:
    """Prompt-lookup drafting (Saxena, 2023): up to `count` tokens that followed the latest earlier
    occurrence of the last n tokens of `tokens`, trying n = max_ngram down to 1; [] when none did.
    Code repeats itself (names, calls, whole lines), so this cheap guess is often right."""
    if count <= 0:
        return []
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        tail = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == tail:
                return tokens[start + n : start + n + count]
    return []
