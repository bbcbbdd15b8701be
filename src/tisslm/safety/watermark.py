"""A statistical watermark on generated text: Kirchenbauer et al. (2023), "A Watermark for Large
Language Models", with SWEET's entropy gate (Lee et al. 2023, "Who Wrote this Code?").

At each step a secret key and the previous token pick a "green" share gamma of the vocabulary,
and delta is added to the green logits before sampling. Text the model wrote then holds more
green tokens than chance; anyone holding the key counts them and runs a one-proportion z-test.
No model is needed to detect, unless the entropy gate is on.

    wm = Watermark(watermark_key(params.safety.watermark), params.safety.watermark, tokenizer.get_vocab_size())
    generate(model, prompts, 200, logits_processor=wm)
    wm.detect(token_ids)                                   # Detection(z=..., watermarked=...)
    wm.detect(token_ids, token_entropies(model, token_ids, vocab_size))   # with entropy_threshold > 0

The green list depends on the previous token only (context width 1, "LeftHash"): the paper's main
setting and the most robust to edits, since changing a token re-keys only the next one's list. The
price is lists that an attacker with many samples can estimate; wider contexts make that harder
(Kirchenbauer et al. 2023b, "On the Reliability of Watermarks for Large Language Models"). With
one previous token the same lists come back again and again, so they are cached.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from tisslm.core.config import Params, WatermarkParams
from tisslm.core.errors import TissLMError
from tisslm.core.model import TissLM

KEY_ENV = "TISSLM_WATERMARK_KEY"
# Green lists kept per Watermark: a (V,) bool mask each, 8 MB at V=8192; previous tokens follow
# Zipf's law, so the most frequent few thousand cover almost every step.
GREEN_CACHE_SIZE = 1024


def watermark_key(params: WatermarkParams) -> str:
    """The key: TISSLM_WATERMARK_KEY when set (so a deployment's secret stays out of params.yaml and
    git), else params.key, a public demo key that anyone reading the repo can detect and forge with."""
    key = os.environ.get(KEY_ENV)
    return params.key if key is None else key


@dataclass(frozen=True)
class Detection:
    """The z-test of one text: under "not watermarked" each scored token is green with probability
    gamma, independently, so green ~ Binomial(tokens_scored, gamma)."""

    tokens_scored: int  # distinct (previous, token) pairs above the entropy threshold
    green: int  # of those, tokens in their green list
    z: float  # (green - gamma T) / sqrt(T gamma (1 - gamma))
    p_value: float  # P(Z >= z) under the null, normal approximation
    watermarked: bool  # z >= z_threshold
    repeated: int = 0  # pairs not scored because they repeat an earlier (previous, token) pair

    @property
    def distinct_share(self) -> float:
        """Of the pairs above the entropy threshold, the share scored: low for a degenerate, looping text."""
        return self.tokens_scored / max(1, self.tokens_scored + self.repeated)

    def to_json(self) -> dict:
        return asdict(self)


class Watermark:
    """A keyed green-list watermark; call it as generate()'s `logits_processor`, test text with `detect`.

    `vocab_size` is the tokenizer's: the model's embedding may have more rows, and ids at or past
    it (never sampled) are never green. The key is kept only inside an HMAC state and is never part
    of repr() or any message, so logging a Watermark cannot leak it.
    """

    def __init__(self, key: str, params: WatermarkParams, vocab_size: int):
        if not key:
            raise TissLMError(f"the watermark key is empty: set {KEY_ENV} or safety.watermark.key")
        if vocab_size < 2:
            raise TissLMError(f"a watermark needs a vocabulary of at least 2 tokens, not {vocab_size}")
        # The settings one by one, not `params`: its repr would show params.key.
        self.delta = params.delta
        self.entropy_threshold = params.entropy_threshold
        self.z_threshold = params.z_threshold
        self.vocab_size = vocab_size
        self.green_size = round(params.gamma * vocab_size)
        if not 0 < self.green_size < vocab_size:
            raise TissLMError(f"safety.watermark.gamma={params.gamma} leaves no green or no red token of {vocab_size}")
        # The null's green probability is the list's true share, not the nominal gamma it was rounded from.
        self.gamma = self.green_size / vocab_size
        self._hmac = hmac.new(key.encode(), digestmod=hashlib.sha256)
        self._green_mask = functools.lru_cache(maxsize=GREEN_CACHE_SIZE)(self._draw_green_mask)

    @classmethod
    def from_params(cls, params: Params, vocab_size: int, enabled: bool | None = None) -> Watermark | None:
        """The watermark of safety.watermark (its key: TISSLM_WATERMARK_KEY, else the params'), or None
        when it is off; `enabled` (a --watermark/--no-watermark flag) overrides safety.watermark.enabled."""
        marks = params.safety.watermark
        if not (marks.enabled if enabled is None else enabled):
            return None
        return cls(watermark_key(marks), marks, vocab_size)

    def __repr__(self) -> str:
        return (
            f"Watermark(vocab_size={self.vocab_size}, gamma={self.gamma:.4f}, delta={self.delta}, "
            f"entropy_threshold={self.entropy_threshold}, z_threshold={self.z_threshold})"
        )

    def _seed(self, previous: int) -> int:
        # HMAC-SHA256, not hash(): Python salts str hashes per process, so detection in another
        # process would draw other lists; and a keyed PRF's outputs (the green lists anyone can
        # estimate from watermarked text) say nothing about the key or about the other lists.
        mac = self._hmac.copy()
        mac.update(previous.to_bytes(8, "big", signed=True))
        return int.from_bytes(mac.digest()[:8], "big") >> 1  # 63 bits: any manual_seed accepts it

    def _draw_green_mask(self, previous: int) -> torch.Tensor:
        # Always a CPU generator: CUDA's randperm draws a different permutation from the same seed,
        # and detection must find the lists generation used on any device.
        generator = torch.Generator().manual_seed(self._seed(previous))
        green = torch.randperm(self.vocab_size, generator=generator)[: self.green_size]  # (gamma V,)
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)  # (V,)
        mask[green] = True
        return mask

    def green_list(self, previous: int) -> list[int]:
        """The sorted green token ids that follow token `previous`."""
        return self._green_mask(previous).nonzero().squeeze(-1).tolist()

    def __call__(self, logits: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        """Logits (B, W) with delta added to each row's green ids, W >= vocab_size; `previous` (B,)."""
        batch, width = logits.shape
        if width < self.vocab_size:
            raise TissLMError(f"logits of width {width} do not cover the watermark's vocabulary of {self.vocab_size}")
        green = torch.stack([self._green_mask(t) for t in previous.tolist()]).to(logits.device)  # (B, V)
        bias = torch.zeros(batch, width, dtype=logits.dtype, device=logits.device)  # (B, W)
        bias[:, : self.vocab_size].masked_fill_(green, self.delta)
        if self.entropy_threshold > 0:
            # SWEET: a nearly determined token (a closing bracket, the rest of a name) cannot turn
            # green without changing what the text says, so such steps keep their logits.
            biased = entropy(logits) >= self.entropy_threshold  # (B,)
            bias *= biased[:, None]
        return logits + bias

    def detect(
        self, token_ids: Sequence[int], entropies: Sequence[float] | None = None, count_repeats: bool = False
    ) -> Detection:
        """Score a text's token ids: each token after the first, keyed by the one before it.

        Each distinct (previous, token) pair counts once, as Hugging Face's WatermarkDetector does
        with ignore_repeated_ngrams: code repeats lines, and each repeat would add its green tokens
        again and push the z-score of human text past the threshold. To score a generation's first
        token, put the prompt's last token first. The same holds for repetitive generated text: a
        sample looping on `1:` repeats a few pairs, and scoring each once keeps its z-score honest
        (the null's independent draws), at the price of little evidence: T distinct pairs reach at
        most z = sqrt(T (1 - gamma) / gamma), and only if all are green. `repeated` says how many
        were skipped. `count_repeats=True` scores every pair (for comparison only: the z-test's
        independence assumption does not hold then).

        With entropy_threshold > 0 (SWEET), `entropies` is required (and ignored otherwise):
        entropies[i] is the entropy of the model's distribution that token_ids[i + 1] was drawn
        from (token_entropies gives them), and the positions below the threshold, which generation
        left unbiased, are not scored. Raises TissLMError when no token is left to score.
        """
        threshold = self.entropy_threshold
        if threshold > 0 and entropies is None:
            raise TissLMError("safety.watermark.entropy_threshold > 0: detection needs the model's entropies")
        if threshold > 0 and len(entropies) != len(token_ids) - 1:
            raise TissLMError(f"{len(entropies)} entropies for {len(token_ids)} tokens: expected one fewer")
        ids = [int(t) for t in token_ids]
        seen = set()
        green = scored = repeated = 0
        for i, (previous, token) in enumerate(itertools.pairwise(ids)):
            if threshold > 0 and entropies[i] < threshold:
                continue
            if (previous, token) in seen:
                repeated += 1
                if not count_repeats:
                    continue
            seen.add((previous, token))
            scored += 1
            if token < self.vocab_size and self._green_mask(previous)[token]:
                green += 1
        if scored == 0:
            raise TissLMError(f"no token to score among {len(token_ids)}: the text is too short or too predictable")
        z = (green - self.gamma * scored) / math.sqrt(scored * self.gamma * (1 - self.gamma))
        p_value = 0.5 * math.erfc(z / math.sqrt(2))
        return Detection(scored, green, z, p_value, z >= self.z_threshold, repeated)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats (...,) of softmax(logits) over the last dimension; -inf logits count as 0 mass."""
    return torch.special.entr(logits.float().softmax(dim=-1)).sum(dim=-1)


@torch.inference_mode()
def token_entropies(model: TissLM, token_ids: Sequence[int], vocab_size: int) -> list[float]:
    """The model's next-token entropy before each of token_ids[1:], for detection with SWEET's gate.

    One teacher-forced forward pass, over the tokenizer's `vocab_size` logits as generation saw them
    after its vocab limit. A text longer than the model's context goes through windows of
    max_seq_len, each new position seen with at least half a context of tokens before it.
    """
    context = model.config.max_seq_len
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    found: list[float] = []
    try:
        done = 1  # the next position whose entropy is missing
        while done < len(token_ids):
            end = min(len(token_ids), max(context, done + context // 2))
            start = max(0, end - context)
            window = torch.tensor([token_ids[start:end]], dtype=torch.long, device=device)  # (1, T)
            logits = model(window)[0, :-1, :vocab_size]  # (T - 1, V): position t predicts start + t + 1
            found += entropy(logits)[done - start - 1 :].tolist()
            done = end
    finally:
        model.train(was_training)
    return found
