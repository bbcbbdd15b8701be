"""Put retrieved chunks in front of a prompt, within a token budget.

The most relevant chunk goes last, right before the prompt: a small causal model attends most to
what is near, and a chunk cut for space should be a less relevant one. Each chunk carries a header
`# path:start-end name` so the model (and a reader) can tell where the text comes from. The prompt
itself is never cut: when it alone fills the budget, no context is added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenizers import Tokenizer

from tisslm.kb.index import Hit


@dataclass(frozen=True)
class Grounded:
    """A prompt with its context: `text` is what the model reads, `sources` the hits used in it
    (most relevant first), `truncated` whether some retrieved text did not fit."""

    text: str
    sources: list[Hit]
    truncated: bool


def header(hit: Hit) -> str:
    return f"# {hit.path}:{hit.start_line}-{hit.end_line} {hit.name}\n"


def _block(hit: Hit, lines: int | None = None) -> str:
    body = hit.text.split("\n")
    return header(hit) + "\n".join(body if lines is None else body[:lines]) + "\n\n"


def _assemble(blocks: list[str], prompt: str) -> str:
    return "".join(reversed(blocks)) + prompt  # blocks are best first; the best ends up last


def with_context(prompt: str, hits: Sequence[Hit], tokenizer: Tokenizer, budget_tokens: int) -> Grounded:
    """`prompt` preceded by as many of `hits` (best first) as fit in `budget_tokens` tokens in all.

    Hits are taken in rank order, each whole; the first that does not fit whole is cut to the
    lines that do (kept when at least its header and one line fit) and nothing after it is
    taken. The count is checked on the assembled text, since BPE tokens can merge across the
    joins, and the least relevant block is dropped until it fits.
    """

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    remaining = budget_tokens - count(prompt)
    blocks: list[str] = []
    sources: list[Hit] = []
    truncated = False
    for hit in hits:
        block = _block(hit)
        size = count(block)
        if size <= remaining:
            blocks.append(block)
            sources.append(hit)
            remaining -= size
            continue
        truncated = True
        lines = _fitting_lines(hit, remaining, count)
        if lines:
            blocks.append(_block(hit, lines))
            sources.append(hit)
        break
    while blocks and count(_assemble(blocks, prompt)) > budget_tokens:
        blocks.pop()
        sources.pop()
        truncated = True
    return Grounded(_assemble(blocks, prompt), sources, truncated)


def _fitting_lines(hit: Hit, budget: int, count: Callable[[str], int]) -> int:
    """The most leading lines of `hit` whose block fits `budget` tokens (0 if not even one): a
    binary search, since the count grows with the lines."""
    low, high = 0, hit.text.count("\n") + 1
    while low < high:
        middle = (low + high + 1) // 2
        if count(_block(hit, middle)) <= budget:
            low = middle
        else:
            high = middle - 1
    return low
