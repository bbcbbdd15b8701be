"""with_context: retrieved chunks before the prompt, within a token budget, the best one last."""

from __future__ import annotations

from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.kb import Hit
from tisslm.kb.context import header, with_context

TOKENIZER = byte_level_tokenizer()  # one token per byte: budgets are easy to reason about


def hit(rank: int, lines: int = 3) -> Hit:
    body = "\n".join(f"    line {i} of chunk {rank}" for i in range(lines))
    return Hit(f"pkg/m{rank}.py", f"pkg.m{rank}.f", 10 * rank + 1, 10 * rank + lines, 1.0 / (rank + 1), body)


def tokens(text: str) -> int:
    return len(TOKENIZER.encode(text, add_special_tokens=False).ids)


def test_everything_fits_and_the_most_relevant_is_nearest_the_prompt():
    hits = [hit(0), hit(1), hit(2)]
    grounded = with_context("def main():", hits, TOKENIZER, budget_tokens=10_000)
    assert grounded.sources == hits and not grounded.truncated
    assert grounded.text.endswith("def main():")
    positions = [grounded.text.index(header(h)) for h in hits]
    assert positions == sorted(positions, reverse=True)  # rank 0 last, just before the prompt
    assert header(hits[0]) == "# pkg/m0.py:1-3 pkg.m0.f\n"


def test_the_budget_is_respected_and_truncation_reported():
    hits = [hit(0), hit(1, lines=20), hit(2)]
    prompt = "x = 1\n"
    whole_first = tokens(header(hits[0]) + hits[0].text + "\n\n")
    budget = tokens(prompt) + whole_first + 60  # room for the best chunk and a few lines of the second
    grounded = with_context(prompt, hits, TOKENIZER, budget)
    assert tokens(grounded.text) <= budget and grounded.truncated
    assert grounded.sources == hits[:2]  # the second is cut to its leading lines; the third is not taken
    assert "line 0 of chunk 1" in grounded.text and "line 19 of chunk 1" not in grounded.text
    assert "chunk 2" not in grounded.text


def test_the_prompt_is_never_cut():
    prompt = "p" * 500
    grounded = with_context(prompt, [hit(0)], TOKENIZER, budget_tokens=100)
    assert grounded.text == prompt and grounded.sources == [] and grounded.truncated
    empty = with_context(prompt, [], TOKENIZER, budget_tokens=100)
    assert empty.text == prompt and not empty.truncated
