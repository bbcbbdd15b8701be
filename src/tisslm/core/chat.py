"""Chat templates: how a conversation becomes the one string a decoder reads, and back.

One function of this module turns messages into tokens for every user of a chat model: the sft
and dpo stages (training), the server's chat route, `tisslm chat` and TissLang's PROMPT_AGENT.
If training and serving formatted conversations differently, a fine-tuned model would be asked
questions in a layout it never saw.

A model directory may hold `chat_template.jinja` (an imported model keeps its Hugging Face one);
otherwise the ChatML-style default applies. Templates render in Jinja's immutable sandbox, as
transformers renders them, because an imported template is code from somebody else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from tisslm.core.errors import TissLMError
from tisslm.core.io import atomic_write_bytes

CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # an imported model's: names its bos and eos tokens
CHAT_FILES = (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE)  # what a model directory's template is made of
ROLES = ("system", "user", "assistant")

TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Tokens that end an assistant's turn in the templates of the common model families, besides the
# checkpoint's own eos token: the first of these a tokenizer knows stops generation.
END_OF_TURN_TOKENS = (TURN_END, "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>")


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} dicts, or a one-line error naming `where`."""
    if not isinstance(messages, list) or not messages:
        raise TissLMError(f"{where}: messages must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "content" not in message:
            raise TissLMError(f"{where}: messages[{i}] must be an object with 'role' and 'content' only")
        if message.get("role") not in ROLES:
            raise TissLMError(
                f"{where}: messages[{i}].role={message.get('role')!r}: expected one of {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise TissLMError(f"{where}: messages[{i}].content must be a string")
    return messages


def _token_text(value: Any) -> str | None:
    """A tokenizer_config.json token entry: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A Jinja chat template plus the bos/eos strings templates may refer to."""

    def __init__(self, source: str = DEFAULT_CHAT_TEMPLATE, bos_token: str = "", eos_token: str = TURN_END):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            self._template = env.from_string(source)
        except TemplateError as err:
            raise TissLMError(f"chat template: invalid Jinja ({err})") from None

    @classmethod
    def load(cls, model_dir: str | Path) -> ChatTemplate:
        """The template of a model directory: its chat_template.jinja, else the ChatML default."""
        model_dir = Path(model_dir)
        path = model_dir / CHAT_TEMPLATE_FILE
        if not path.is_file():
            return cls()
        tokens: dict[str, Any] = {}
        if (model_dir / TOKENIZER_CONFIG_FILE).is_file():
            try:
                tokens = json.loads((model_dir / TOKENIZER_CONFIG_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise TissLMError(f"{model_dir / TOKENIZER_CONFIG_FILE}: unreadable ({err})") from None
        return cls(
            path.read_text(encoding="utf-8"),
            bos_token=_token_text(tokens.get("bos_token")) or "",
            eos_token=_token_text(tokens.get("eos_token")) or TURN_END,
        )

    def save(self, model_dir: str | Path) -> None:
        atomic_write_bytes(Path(model_dir) / CHAT_TEMPLATE_FILE, self.source.encode("utf-8"))

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation as text; with `add_generation_prompt`, ending where the assistant speaks next."""
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as err:
            raise TissLMError(f"chat template: rendering failed ({err})") from None

    def prompt_ids(self, tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
        """The tokens a model continues to answer `messages`: what serving and evaluation feed it."""
        return tokenizer.encode(self.render(messages), add_special_tokens=False).ids

    def encode(self, tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation and, per token, whether the assistant wrote it (its
        words and its end-of-turn marker): the tokens an SFT loss is taken on.

        Each assistant turn is found by rendering the conversation up to it with and without the
        turn: the difference is what the model must produce after the generation prompt. The
        prompt part is encoded on its own, as `prompt_ids` encodes it at inference, so training
        and serving see the same tokens at the turn's boundary."""
        ids: list[int] = []
        mask: list[bool] = []
        done = ""  # the text encoded so far

        def add(text: str, assistant: bool) -> None:
            tokens = tokenizer.encode(text, add_special_tokens=False).ids if text else []
            ids.extend(tokens)
            mask.extend([assistant] * len(tokens))

        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not turn.startswith(prompt):
                raise TissLMError(
                    f"chat template: messages[{i}]: the conversation's rendering does not extend its "
                    "prefix's, so the assistant's tokens cannot be told apart"
                )
            add(prompt[len(done) :], assistant=False)
            add(turn[len(prompt) :], assistant=True)
            done = turn
        whole = self.render(messages, add_generation_prompt=False)
        add(whole[len(done) :], assistant=False)
        return ids, mask

    def stop_token_ids(self, tokenizer: Tokenizer) -> list[int]:
        """Ids of the tokens that end a turn in this tokenizer: the eos token and the usual ones."""
        found = (tokenizer.token_to_id(text) for text in (self.eos_token, *END_OF_TURN_TOKENS))
        return sorted({token for token in found if token is not None})


def _raise_template_error(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)
