"""How the next token is drawn from a row of logits: greedy, temperature, top-k and nucleus.

`SamplingParams` states the settings and their bounds once; params.yaml's `generate` section,
the server's requests and `generate()` all validate through it. `PenalizedSampling` adds OpenAI's
frequency and presence penalties, which the server applies (`apply_penalties`) to each row that
asks for them, over the tokens that row has generated so far.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field

from tisslm.core.config import SamplingParams  # with the rest of params.yaml's schema: reading params skips torch

MAX_PENALTY = 2.0  # OpenAI's bounds for frequency_penalty and presence_penalty: -2 to 2


class PenalizedSampling(SamplingParams):
    """SamplingParams with OpenAI's repetition penalties (what the server's requests may ask).

    A token already generated `c` times has its logit lowered by
    `c * frequency_penalty + (c > 0) * presence_penalty` before temperature, top-k and top-p;
    negative values favour repeats. 0 and 0 (the defaults) change nothing.
    """

    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)

    @property
    def penalized(self) -> bool:
        return self.frequency_penalty != 0 or self.presence_penalty != 0


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, frequency_penalty: float, presence_penalty: float
) -> torch.Tensor:
    """logits (..., V) less counts (..., V) * frequency_penalty and (counts > 0) * presence_penalty.

    `counts[t]` is how many times token t was generated so far (OpenAI's definition: the prompt
    is not counted); returns a new tensor in the logits' dtype.
    """
    counts = counts.to(logits.dtype)
    return logits - counts * frequency_penalty - (counts > 0).to(logits.dtype) * presence_penalty


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the nucleus of mass top_p.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to at least
    top_p (Holtzman et al., 2019); the most likely token is always kept.
    """
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V); temperature 0 means greedy.

    With top_k, the nucleus and the draw work on the k best logits only, not on all V with the
    rest at -inf: the same distribution, for a fraction of the sorting and random numbers when
    k is much smaller than V (the difference shows when a server samples many rows per step).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        best, ids = torch.topk(logits, top_k, dim=-1)  # (B, k) each, best first
        probs = filter_logits(best, top_p=top_p).softmax(dim=-1)
        choice = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1), an index into the k best
        return ids.gather(-1, choice).squeeze(-1)
    probs = filter_logits(logits, top_p=top_p).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# Changes a batch's next-token logits before sampling (a watermark's green-list bias, say):
# (logits (B, V), each row's previous token (B,)) -> logits (B, V). It sees the logits after the
# vocab limit and before temperature, as Hugging Face's LogitsProcessor does.
LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
