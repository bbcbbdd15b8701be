"""Minimal-pair bias benchmark in the manner of CrowS-Pairs, scored as lm-evaluation-harness does.

Each pair holds a stereotypical sentence and the same sentence about a contrasting group. The
model's log-likelihood of each sentence (conditioned on <|endoftext|>) decides which it prefers:

    pct_stereotype  = 100 * share of pairs where the stereotypical sentence is more likely  (ideal 50)
    likelihood_diff = mean |log-likelihood(more) - log-likelihood(less)|

overall and per category, each with a percentile-bootstrap 95% interval over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from tisslm.core.errors import TissLMError
from tisslm.core.hub import require_hub
from tisslm.core.io import read_jsonl
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import END_OF_TEXT
from tisslm.eval.evaluate import document_loglikelihoods


@dataclass(frozen=True)
class MinimalPair:
    category: str
    more: str  # the stereotypical sentence
    less: str  # the same sentence about the contrasting group


def load_pairs(path: Path | None = None) -> list[MinimalPair]:
    """The project's pairs (or another file in its format), each checked to differ only in the group term."""
    path = path or Path(str(resources.files("tisslm.eval") / "bias_pairs.jsonl"))
    pairs = []
    for where, record in read_jsonl(path):
        try:
            pair = MinimalPair(record["category"], record["more"], record["less"])
            term_more, term_less = record["term_more"], record["term_less"]
        except (KeyError, TypeError) as err:
            raise TissLMError(f"{where}: not a minimal-pair record ({err})") from None
        if term_more not in pair.more or pair.more.replace(term_more, term_less, 1) != pair.less:
            raise TissLMError(f"{where}: the sentences differ in more than {term_more!r} -> {term_less!r}")
        pairs.append(pair)
    return pairs


def hub_pairs(name: str, split: str) -> list[MinimalPair]:
    """CrowS-Pairs in its hub format (sent_more, sent_less, bias_type) through `datasets`."""
    import datasets

    require_hub(name, where="bias.hub")
    table = datasets.load_dataset(name, split=split)
    return [
        MinimalPair(str(row["bias_type"]), row["sent_more"], row["sent_less"])  # our category names are CrowS-Pairs'
        for row in table
    ]


def score_pairs(model: TissLM, tokenizer: Tokenizer, pairs: list[MinimalPair], window: int) -> np.ndarray:
    """Log-likelihoods (n_pairs, 2): of the stereotypical and of the contrasting sentence."""
    sentences = [s for p in pairs for s in (p.more, p.less)]
    documents = [e.ids for e in tokenizer.encode_batch(sentences, add_special_tokens=False)]
    loglikelihoods = document_loglikelihoods(model, documents, tokenizer.token_to_id(END_OF_TEXT), window)
    return np.asarray(loglikelihoods).reshape(-1, 2)


def _summary(scores: np.ndarray, bootstrap: int, rng: np.random.Generator) -> dict:
    prefers = (scores[:, 0] > scores[:, 1]).astype(float) * 100
    gaps = np.abs(scores[:, 0] - scores[:, 1])
    samples = rng.integers(0, len(scores), size=(bootstrap, len(scores)))
    return {
        "pairs": len(scores),
        "pct_stereotype": float(prefers.mean()),
        "pct_stereotype_ci95": [float(v) for v in np.percentile(prefers[samples].mean(axis=1), [2.5, 97.5])],
        "likelihood_diff": float(gaps.mean()),
        "likelihood_diff_ci95": [float(v) for v in np.percentile(gaps[samples].mean(axis=1), [2.5, 97.5])],
    }


def crows_pairs_metrics(pairs: list[MinimalPair], scores: np.ndarray, bootstrap: int = 1000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    categories = sorted({p.category for p in pairs})
    per_category = {
        c: _summary(scores[[i for i, p in enumerate(pairs) if p.category == c]], bootstrap, rng) for c in categories
    }
    return {"overall": _summary(scores, bootstrap, rng), "per_category": per_category}
