"""From generated tokens to streamed text: incremental decoding, stop strings, the chat template.

Chat template. TissLM has no special chat tokens, so a conversation is plain text: each message
is its role tag on a line of its own, then its content and a newline, and the prompt ends with
the assistant's tag for the model to continue:

    <|system|>
    You write short Python functions.
    <|user|>
    Add two numbers.
    <|assistant|>

The reply ends at the end-of-text token, or where the model starts a new turn: the tags of the
next turn ("\\n<|user|>", "\\n<|system|>", "\\n<|assistant|>") are stop strings of every chat
request, besides the request's own `stop`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer

ROLES = ("system", "user", "assistant")
CHAT_STOP = tuple(f"\n<|{role}|>" for role in ROLES)
REPLACEMENT = "\ufffd"  # what decoding shows for a UTF-8 sequence whose last bytes are still to come


def render_chat(messages: Iterable[tuple[str, str]]) -> str:
    """The prompt for (role, content) messages, ending where the assistant's reply begins."""
    return "".join(f"<|{role}|>\n{content}\n" for role, content in messages) + "<|assistant|>\n"


class TextStream:
    """The text of a generation, released piece by piece as tokens arrive.

    A byte-level token may end inside a multi-byte character, and the end of the text may be the
    start of a stop string; both are held back until the next tokens settle them, so the pieces
    released always concatenate to the final text, which ends before the first stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.stopped = False  # a stop string has appeared: the generation is over
        self._text = ""
        self._released = 0  # characters of _text handed out so far

    def add(self, token: int) -> str:
        """Take the next token; return the newly settled text (possibly empty)."""
        self.ids.append(token)
        self._text = self.tokenizer.decode(self.ids)
        hits = [i for i in (self._text.find(s, self._released) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits))
        settled = len(self._text.rstrip(REPLACEMENT))
        return self._release(settled - self._stop_prefix_at_end(settled))

    def finish(self) -> str:
        """The held-back rest, once the generation has ended for another reason than a stop string."""
        return "" if self.stopped else self._release(len(self._text))

    def _stop_prefix_at_end(self, end: int) -> int:
        """Length of the longest tail of _text[:end] that a stop string begins with."""
        for size in range(min(max((len(s) for s in self.stop), default=1) - 1, end), 0, -1):
            if any(s.startswith(self._text[end - size : end]) for s in self.stop):
                return size
        return 0

    def _release(self, end: int) -> str:
        piece = self._text[self._released : end]
        self._released = max(self._released, end)
        return piece
