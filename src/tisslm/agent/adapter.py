"""The one door to a model for `PROMPT_AGENT` (and for CHOOSE when the model picks).

Two ways through it, with one contract: a prompt (and a system message: the script's persona) in,
text and token counts out, seeded. The prompt is the user's turn of a chat conversation, so
a chat-tuned model reads it in the layout it was trained on.
- `LocalModel`: a TissLM model directory (default models/model), loaded on the first prompt so
  that scripts without PROMPT_AGENT never pay for it. The conversation is rendered by the
  directory's chat template (`tisslm.core.chat.ChatTemplate`) and the answer ends at its
  end-of-turn tokens, as `tisslm serve` and `tisslm chat` do.
- `OpenAICompatible`: any server with `POST /v1/chat/completions` (`tisslm serve`, vLLM,
  llama.cpp), which applies its model's template.
Token counts feed the run's TOKEN_COUNT budget, so both report them.

Both also report how unsure the model was: the entropy (nats) of the model's distribution at
each token of the answer, log_softmax of its logits over the tokenizer's vocabulary before the
temperature (what `tisslm serve` reports as `entropy`). The local model gets them from one
teacher-forced forward pass over prompt and answer after generating; the server adapter asks for
`logprobs` and reads each token's `entropy` extension (a server without it gives none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING

import httpx

from tisslm.core.errors import TissLMError

if TYPE_CHECKING:
    from tisslm.core.model import TissLM

DEFAULT_MODEL_DIR = "models/model"
MAX_TOKENS = 256
TEMPERATURE = 0.7


class AdapterError(TissLMError):
    """The model could not answer (missing directory, server down, bad reply): the PROMPT_AGENT fails."""

    exit_code = 1


def conversation(prompt: str, system: str | None) -> list[dict[str, str]]:
    """The chat messages a prompt is asked as: the system message, if any, then the user's turn."""
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": prompt}]


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    entropies: tuple[float, ...] = ()  # of each token of `text`, in nats (see the module's docstring)

    @property
    def mean_entropy(self) -> float:
        """The answer's mean token entropy; 0 for an answer without tokens."""
        return fmean(self.entropies) if self.entropies else 0.0

    @property
    def max_entropy(self) -> float:
        """The entropy of the answer's least certain token; 0 for an answer without tokens."""
        return max(self.entropies, default=0.0)


class LocalModel:
    def __init__(self, directory: str | Path = DEFAULT_MODEL_DIR):
        self.directory = Path(directory)
        self.name = f"local:{self.directory}"

    @cached_property
    def _loaded(self):
        # torch is imported here, not at the top: `tiss check` and prompt-free runs never need it.
        from tisslm.core.chat import ChatTemplate
        from tisslm.core.model import CONFIG_FILE, TissLM
        from tisslm.core.tokenizer import load_tokenizer

        if not (self.directory / CONFIG_FILE).is_file():
            raise AdapterError(f"--model {self.directory}: not a model directory (no {CONFIG_FILE})")
        tokenizer = load_tokenizer(self.directory)
        return TissLM.from_pretrained(self.directory), tokenizer, ChatTemplate.load(self.directory)

    def complete(
        self,
        prompt: str,
        max_tokens: int = MAX_TOKENS,
        seed: int = 0,
        on_tokens: Callable[[int], None] | None = None,
        system: str | None = None,
    ) -> Completion:
        """The answer to `prompt` asked as the user's turn after `system`, through the model's chat
        template. `on_tokens(n)` is told as each n new tokens are generated (the run's progress display)."""
        from tisslm.core.generate import generate

        model, tokenizer, template = self._loaded
        try:
            ids = template.prompt_ids(tokenizer, conversation(prompt, system))
        except TissLMError as err:  # a template that refuses the conversation
            raise AdapterError(f"--model {self.directory}: {err}") from None
        new = min(max_tokens, model.config.max_seq_len - 1)
        ids = ids[-(model.config.max_seq_len - new) :]  # the end of a long prompt matters most
        stop = template.stop_token_ids(tokenizer)
        out = generate(
            model,
            [ids],
            new,
            temperature=TEMPERATURE,
            seed=seed,
            stop_tokens=stop,
            vocab_limit=tokenizer.get_vocab_size(),
            on_tokens=on_tokens,
        )[0]
        entropies = token_entropies(model, ids, out, tokenizer.get_vocab_size())
        return Completion(tokenizer.decode(out), len(ids), len(out), entropies)


def token_entropies(model: TissLM, prompt: Sequence[int], answer: Sequence[int], vocab_size: int) -> tuple[float, ...]:
    """The entropy of the model's distribution at each token of `answer` after `prompt`, from one
    teacher-forced forward pass (a causal model's logits at a position are those of generation)."""
    import torch

    if not answer:
        return ()
    device = next(model.parameters()).device
    with torch.inference_mode():
        idx = torch.tensor([[*prompt, *answer]], dtype=torch.long, device=device)  # (1, P + N)
        logits = model(idx)[0, len(prompt) - 1 : -1, :vocab_size]  # (N, vocab_size): each answer token's step
        probs = logits.float().softmax(dim=-1)
        return tuple(torch.special.entr(probs).sum(dim=-1).tolist())  # -sum p log p, with 0 log 0 = 0


class OpenAICompatible:
    def __init__(self, base_url: str, timeout_s: float = 120.0):
        base = base_url.rstrip("/")
        self.url = (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"
        self.name = f"openai:{base}"
        self.timeout_s = timeout_s

    def complete(
        self, prompt: str, max_tokens: int = MAX_TOKENS, seed: int = 0, system: str | None = None
    ) -> Completion:
        """The server's reply to `prompt` asked as the user's turn after `system`; the server applies
        its model's chat template."""
        body = {
            "messages": conversation(prompt, system),
            "max_tokens": max_tokens,
            "temperature": TEMPERATURE,
            "seed": seed,
            "logprobs": True,
        }
        try:
            response = httpx.post(self.url, json=body, timeout=self.timeout_s)
        except httpx.HTTPError as err:
            raise AdapterError(f"{self.url}: {err}") from None
        if response.status_code != 200:
            raise AdapterError(f"{self.url}: HTTP {response.status_code}: {response.text[:200]}")
        try:
            reply = response.json()
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
            scored = (choice.get("logprobs") or {}).get("content") or ()
            entropies = tuple(float(token["entropy"]) for token in scored if "entropy" in token)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise AdapterError(f"{self.url}: not an OpenAI chat completions reply: {response.text[:200]}") from None
        usage = reply.get("usage") or {}
        # A server that reports no usage is charged a rough 4 characters per token.
        prompt_tokens = usage.get("prompt_tokens", len((system or "") + prompt) // 4 + 1)
        return Completion(text, prompt_tokens, usage.get("completion_tokens", len(text) // 4 + 1), entropies)


def make_adapter(model: str | Path | None, base_url: str | None) -> LocalModel | OpenAICompatible:
    if model is not None and base_url is not None:
        raise TissLMError("pass --model or --base-url, not both")
    return OpenAICompatible(base_url) if base_url else LocalModel(model or DEFAULT_MODEL_DIR)
