"""Synthetic code corpora with planted near-duplicates, to measure deduplication quality.

Used by the tests and by benchmarks/bench_data.py: recall and precision need a ground truth,
which real corpora do not come with.
"""

from __future__ import annotations

import random
import string

WORDS = [
    "".join(random.Random(i).choices(string.ascii_lowercase, k=random.Random(-i).randint(3, 9))) for i in range(3000)
]


def code_line(rng: random.Random) -> str:
    w = rng.sample(WORDS, 5)
    return f"    {w[0]} = {w[1]}.{w[2]}({w[3]}, {w[4]}={rng.randint(0, 999)})"


def code_doc(rng: random.Random, n_lines: int = 60) -> list[str]:
    return [f"def {rng.choice(WORDS)}_{rng.randint(0, 10**6)}(self):"] + [code_line(rng) for _ in range(n_lines)]


def planted_near_duplicates(n_docs: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """`n_docs` distinct documents plus a near-copy of every other one (1 to 4 of 60 lines rewritten).

    Returns the texts and, for each, the index of the document it derives from.
    """
    rng = random.Random(seed)
    bases = [code_doc(rng) for _ in range(n_docs)]
    docs, origin = ["\n".join(lines) for lines in bases], list(range(n_docs))
    for i in range(0, n_docs, 2):
        lines = list(bases[i])
        for j in rng.sample(range(1, len(lines)), k=rng.choice([1, 2, 3, 4])):
            lines[j] = code_line(rng)
        docs.append("\n".join(lines))
        origin.append(i)
    return docs, origin
