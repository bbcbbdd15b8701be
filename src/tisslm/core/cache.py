"""KV caches: what the model's one forward pass needs to continue sequences it has already read.

The forward asks a cache three things (see `Cache`): the rotary positions of the new tokens, the
attention mask of the new queries over every key the cache returns, and, per layer, to store the
new keys and values and return all of them. Each cache answers in its own way:

- `KVCache` keeps `slots` independent sequences in buffers preallocated to `max_len` positions,
  each slot at its own length. A forward runs either on a chosen set of slots, reading keys up
  to the longest of them (`rows`: prefill, and the eager reference decode), or on the first n
  slots at once over the first L positions of the buffer (`static`): then a decode step has the
  same shapes every time for a given (n, L), so it compiles once per pair, and on a GPU replays as
  one CUDA graph (the gpt-fast pattern).
- `release.export`'s ONNX decoder keeps past keys and values as graph inputs and concatenates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from tisslm.core.errors import TissLMError


class Cache(Protocol):
    """What `TissLM.hidden_states` asks of a cache."""

    def positions(self, new_tokens: int) -> torch.Tensor:
        """Rotary positions (B, T) of the next `new_tokens` tokens of each row."""
        ...

    def mask(self) -> torch.Tensor:
        """Which keys each new query may attend to: bool (B, 1, T, S), S the keys `update` returns."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values (B, n_kv_heads, T, head_dim); return all of them (B, n_kv_heads, S, head_dim)."""
        ...

    def advance(self, new_tokens: int) -> None:
        """The forward is done: the new tokens are now part of each row's sequence."""
        ...


class KVCache:
    """Keys and values of `slots` sequences, preallocated to `max_len` positions, each slot at its own length.

    A slot is reused after `reset` without clearing: no query ever attends past its slot's length,
    so what an earlier sequence left there is never read.
    """

    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        slots: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.slots, self.max_len = slots, max_len
        # One buffer per layer, not one stacked tensor: a write into a layer's view of a stacked
        # buffer makes the compiler copy the whole buffer each step; into its own tensor, it writes in place.
        shape = (slots, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # (slots,) positions filled per slot
        # The same lengths on the host, so that the eager path checks bounds without a device sync.
        self.host_lengths = [0] * slots
        if self.lengths.is_cuda:  # CUDA graphs replay on fixed addresses: the buffers are never copied in
            for buffer in (*self.keys, *self.values, self.lengths):
                torch._dynamo.mark_static_address(buffer)

    @classmethod
    def for_model(cls, config, slots: int, max_len: int | None = None, dtype=torch.float32, device="cpu") -> KVCache:
        """A cache for a model of `config` (a ModelConfig); max_len defaults to its max_seq_len."""
        c = config
        return cls(c.n_layers, c.n_kv_heads, c.head_dim, slots, max_len or c.max_seq_len, dtype, device)

    def reset(self, slot: int, length: int = 0) -> None:
        """Start `slot` over, keeping its first `length` positions (0: a new sequence; more: speculative
        decoding rolls back the drafts it did not accept)."""
        self.lengths[slot] = length
        self.host_lengths[slot] = length

    def rows(self, slots: Sequence[int]) -> SlotRows:
        """The cache for a forward over `slots` (batch row i continues slot slots[i])."""
        return SlotRows(self, list(slots))

    def static(self, slots: int | None = None, length: int | None = None) -> StaticSlots:
        """The cache for a forward of one new token in each of the first `slots` slots (all by
        default), over the first `length` positions of the buffer (all by default): fixed shapes for
        a given number of slots and length."""
        return StaticSlots(self, slots or self.slots, length or self.max_len)


class SlotRows:
    """A forward over some slots of a `KVCache`, reading keys up to the longest of them (shorter slots mask the rest)."""

    def __init__(self, cache: KVCache, slots: list[int]):
        if not slots:
            raise ValueError("select at least one slot")
        self.cache, self.slots = cache, slots
        device = cache.lengths.device
        self._ids = torch.tensor(slots, dtype=torch.long, device=device)  # (B,)
        first = slots[0]
        contiguous = slots == list(range(first, first + len(slots)))
        self._rows = slice(first, first + len(slots)) if contiguous else self._ids  # a slice reads without a copy
        self._positions: torch.Tensor | None = None
        self._read_len = 0

    def positions(self, new_tokens: int) -> torch.Tensor:
        host = self.cache.host_lengths
        self._read_len = max(host[s] for s in self.slots) + new_tokens
        if self._read_len > self.cache.max_len:
            raise TissLMError(f"KV cache holds {self.cache.max_len} positions, {self._read_len} requested")
        offsets = torch.arange(new_tokens, device=self._ids.device)  # (T,)
        self._positions = self.cache.lengths[self._ids][:, None] + offsets  # (B, T)
        return self._positions

    def mask(self) -> torch.Tensor:
        key_pos = torch.arange(self._read_len, device=self._ids.device)  # (S,)
        return (key_pos[None, None, :] <= self._positions[:, :, None]).unsqueeze(1)  # (B, 1, T, S)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._ids[:, None]  # (B, 1), broadcast against positions (B, T)
        self.cache.keys[layer][rows, :, self._positions] = k.transpose(1, 2)  # indexed as (B, T, n_kv_heads, head_dim)
        self.cache.values[layer][rows, :, self._positions] = v.transpose(1, 2)
        end = self._read_len
        return self.cache.keys[layer][self._rows, :, :end], self.cache.values[layer][self._rows, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.cache.lengths[self._ids] += new_tokens
        for slot in self.slots:
            self.cache.host_lengths[slot] += new_tokens


class StaticSlots:
    """One new token in each of the first `slots` slots, attending over the first `length` positions of the
    buffer under a mask: the same shapes at every step and no host state read, so the step compiles to one
    graph per (slots, length). The caller picks a `length` past every position that matters (see
    `tisslm.core.decode.attended_length`); keys and values are still written in place into the whole buffer.
    A slot past the end of the buffer (a free slot that keeps stepping) writes to the last position instead
    of out of bounds, and a slot at or past `length` attends to all `length` keys; nothing reads either's output."""

    def __init__(self, cache: KVCache, slots: int, length: int):
        if not 0 < length <= cache.max_len:
            raise ValueError(f"attended length {length} outside 1..{cache.max_len}")
        self.cache, self.slots, self.length = cache, slots, length
        self._positions = cache.lengths[:slots].clamp(max=cache.max_len - 1)[:, None]  # (slots, 1)

    def positions(self, new_tokens: int) -> torch.Tensor:
        if new_tokens != 1:
            raise ValueError("a static step decodes one token per slot")
        return self._positions

    def mask(self) -> torch.Tensor:
        key_pos = torch.arange(self.length, device=self._positions.device)  # (L,)
        return (key_pos[None, :] <= self._positions)[:, None, None, :]  # (slots, 1, 1, L)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.arange(self.slots, device=k.device)  # (slots,)
        position = self._positions[:, 0]  # (slots,)
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[rows, :, position] = k[:, :, 0]  # (slots, n_kv_heads, head_dim), in place in the layer's buffer
        values[rows, :, position] = v[:, :, 0]
        end = self.length
        return keys[: self.slots, :, :end], values[: self.slots, :, :end]  # (slots, n_kv_heads, L, head_dim)

    def advance(self, new_tokens: int) -> None:
        # The device's lengths only: a compiled step must not touch host state, so its caller
        # (`Decoder.step`) counts the host's side.
        self.cache.lengths[: self.slots] += new_tokens
