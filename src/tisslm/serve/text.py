"""From tokens to text: incremental decoding, stop strings, and tokens by name.

(Conversations become prompts through the model's chat template, `tisslm.core.chat`.)

Tokens by name. Logprobs name each token, and chat's also give its bytes (`Vocabulary`). Both
of TissLM's tokenizers are byte-level, GPT-2's scheme: each byte stands in the vocabulary as a
printable character, so a token's bytes are its characters mapped back. A token whose bytes are
not UTF-8 on their own (a piece of a multi-byte character) is named as OpenAI names such tokens,
`bytes:\\xe2\\x82`, since a JSON string cannot hold the bytes; an added token (<|endoftext|>) by its text.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"  # what decoding shows for a UTF-8 sequence whose last bytes are still to come


def byte_stand_ins() -> dict[str, int]:
    """GPT-2's byte-level alphabet, as the ByteLevel decoder reads it: stand-in character -> byte.
    Printable Latin-1 bytes stand for themselves; the others take the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {chr(byte): byte for byte in printable} | {chr(256 + n): byte for n, byte in enumerate(others)}


class Vocabulary:
    """Each token's bytes and name, for logprobs (see the module's "Tokens by name")."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        stand_ins = byte_stand_ins()
        added = tokenizer.get_added_tokens_decoder()
        self.special = frozenset(token for token, piece in added.items() if piece.special)  # decoding skips them
        self.bytes: list[bytes] = [
            added[token].content.encode()
            if token in added
            else bytes(stand_ins[c] for c in tokenizer.id_to_token(token))
            for token in range(tokenizer.get_vocab_size())
        ]
        self.names = [_name(piece) for piece in self.bytes]  # as logprobs name the tokens

    def text(self, ids: list[int]) -> str:
        """The text of token ids as a prompt writes it (special tokens by name), as TextOffsets counts it."""
        return b"".join(self.bytes[token] for token in ids).decode("utf-8", "replace")


class TextOffsets:
    """Where each token's text begins in a text, in characters, token after token: a token that
    continues a character begins where that character does. Decoding leaves special tokens out of
    a generation's text; in a prompt they stand as the client wrote them (`written`)."""

    def __init__(self, vocabulary: Vocabulary, start: int = 0, written: bool = False):
        self.vocabulary, self.written = vocabulary, written
        self.length = start
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def next(self, token: int) -> int:
        """The offset of `token`, the text's next token."""
        offset = self.length
        if self.written or token not in self.vocabulary.special:
            self.length += len(self._decoder.decode(self.vocabulary.bytes[token]))
        return offset


def _name(piece: bytes) -> str:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in piece)


class TextStream:
    """The text of a generation, released piece by piece as tokens arrive.

    A byte-level token may end inside a multi-byte character, and the end of the text may be the
    start of a stop string; both are held back until the next tokens settle them, so the pieces
    released always concatenate to the final text, which ends before the first stop string.

    The tokens go with their text: `released_tokens` counts the leading tokens whose text has all
    been released (at a stop string, those whose text begins before it), so that logprobs travel
    in the chunk that carries their text. A token that ends inside a character goes with the one
    that completes it.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.stopped = False  # a stop string has appeared: the generation is over
        self.released_tokens = 0
        self._text = ""
        self._released = 0  # characters of _text handed out so far
        self._ends: list[int | None] = []  # where each token's text ends; None while that is inside a character

    def add(self, token: int) -> str:
        """Take the next token; return the newly settled text (possibly empty)."""
        self.ids.append(token)
        self._text = self.tokenizer.decode(self.ids)
        self._ends.append(None if self._text.endswith(REPLACEMENT) else len(self._text))
        hits = [i for i in (self._text.find(s, self._released) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            cut = min(hits)
            self._release_tokens_before(cut)
            return self._release(cut)
        settled = len(self._text.rstrip(REPLACEMENT))
        return self._release(settled - self._stop_prefix_at_end(settled))

    def finish(self) -> str:
        """The held-back rest, once the generation has ended for another reason than a stop string."""
        if self.stopped:
            return ""
        piece = self._release(len(self._text))
        self.released_tokens = len(self.ids)
        return piece

    def _stop_prefix_at_end(self, end: int) -> int:
        """Length of the longest tail of _text[:end] that a stop string begins with."""
        for size in range(min(max((len(s) for s in self.stop), default=1) - 1, end), 0, -1):
            if any(s.startswith(self._text[end - size : end]) for s in self.stop):
                return size
        return 0

    def _release(self, end: int) -> str:
        piece = self._text[self._released : end]
        self._released = max(self._released, end)
        for token in range(self.released_tokens, len(self.ids)):
            token_end = self._ends[token]
            if token_end is not None:
                if token_end > self._released:
                    break
                self.released_tokens = token + 1
        return piece

    def _release_tokens_before(self, cut: int) -> None:
        """Release the tokens whose text begins before `cut`, where a stop string begins."""
        begins = 0  # where the next token's text begins
        for token, token_end in enumerate(self._ends):
            if token_end is not None:
                if begins < cut:
                    self.released_tokens = max(self.released_tokens, token + 1)
                begins = token_end
