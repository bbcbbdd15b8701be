"""alt-profanity-check's toxicity classifier, scored in plain Python from a JSON cache.

profanity_check unpickles a TfidfVectorizer and a CalibratedClassifierCV (five sigmoid-calibrated
LinearSVCs) at import, which takes scikit-learn, scipy and numpy: 0.75 s of every `tisslm safety
scan`. The model is linear, so its numbers are all it needs: per word of the vocabulary the idf
and each SVM's weight, per SVM its intercept and sigmoid. The first use in a process without a
cache loads the model the only way it ships, through profanity_check itself (its own files in its
wheel), and writes those numbers to `$XDG_CACHE_HOME/tisslm/profanity-check.json` (or
~/.cache/tisslm/). Later uses read the JSON (no pickle of ours is ever loaded) and compute
`predict_prob` exactly as scikit-learn does, to within rounding (1e-12 in the tests):

    x = tf * idf of the line's vocabulary words (lowercased, `(?u)\\b\\w\\w+\\b`), l2-normalised
    p = mean over the SVMs of 1 / (1 + exp(a * (coef . x + intercept) + b))

The cache is keyed by a hash of profanity_check's shipped files (a new release rebuilds it) and
`FORMAT`; a file that does not parse or does not hold what it should is rebuilt.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

FORMAT = 1  # bump when the exported numbers or their layout change
CACHE_NAME = "profanity-check.json"
SHIPPED = ("vectorizer.joblib", "model.joblib")


def cache_dir() -> Path:
    """Where the exported classifier is kept: $XDG_CACHE_HOME/tisslm, else ~/.cache/tisslm."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tisslm"


def _shipped_files() -> list[Path]:
    spec = importlib.util.find_spec("profanity_check")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("alt-profanity-check is not installed", name="profanity_check")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return [data / name for name in SHIPPED]


def fingerprint() -> str:
    """The hash of profanity_check's shipped model files and of this module's export format."""
    digest = hashlib.sha256(f"format {FORMAT}".encode())
    for path in _shipped_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def export(key: str) -> dict:
    """The numbers of profanity_check's model, read through profanity_check (scikit-learn: slow)."""
    from profanity_check import profanity_check as shipped

    vectorizer, model = shipped.vectorizer, shipped.model
    # What the plain-Python scoring reproduces; anything else in a future release fails loudly.
    supported = (
        vectorizer.analyzer == "word"
        and tuple(vectorizer.ngram_range) == (1, 1)
        and vectorizer.preprocessor is None
        and vectorizer.tokenizer is None
        and vectorizer.strip_accents is None
        and vectorizer.norm in ("l2", None)
        and getattr(vectorizer, "binary", False) is False
        and model.method == "sigmoid"
        and list(model.classes_) == [0, 1]
        and all(
            len(c.calibrators) == 1 and c.estimator.coef_.shape[0] == 1 and c.method == "sigmoid"
            for c in model.calibrated_classifiers_
        )
    )
    if not supported:
        raise RuntimeError(f"profanity_check's model is not the TF-IDF linear SVM this module scores: {model!r}")
    svms = model.calibrated_classifiers_
    stop_words = vectorizer.get_stop_words() or frozenset()  # dropped before the vocabulary is looked up
    vocabulary = sorted((index, word) for word, index in vectorizer.vocabulary_.items() if word not in stop_words)
    columns = [index for index, _ in vocabulary]
    idf = vectorizer.idf_[columns] if vectorizer.use_idf else [1.0] * len(columns)
    return {
        "format": FORMAT,
        "key": key,
        "token_pattern": vectorizer.token_pattern,
        "lowercase": bool(vectorizer.lowercase),
        "sublinear_tf": bool(vectorizer.sublinear_tf),
        "norm": vectorizer.norm,
        "words": [word for _, word in vocabulary],
        # Columns of float64 in base64: exact, and parsed 30 times faster than as JSON numbers.
        "idf": _pack(idf),
        "coefs": [_pack(c.estimator.coef_[0, columns]) for c in svms],
        "intercepts": [float(c.estimator.intercept_[0]) for c in svms],
        "sigmoids": [[float(c.calibrators[0].a_), float(c.calibrators[0].b_)] for c in svms],
    }


def _pack(values: Iterable[float]) -> str:
    column = array("d", (float(v) for v in values))
    if sys.byteorder != "little":
        column.byteswap()
    return base64.b64encode(column.tobytes()).decode("ascii")


def _unpack(text: str) -> array:
    column = array("d", base64.b64decode(text, validate=True))
    if sys.byteorder != "little":
        column.byteswap()
    return column


def _expit_neg(z: float) -> float:
    """1 / (1 + exp(z)), scipy's expit(-z), without overflowing."""
    if z >= 0:
        e = math.exp(-z)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(z))


class ToxicityClassifier:
    """profanity_check.predict_prob from the exported numbers; raises ValueError on numbers that do not fit."""

    def __init__(self, data: dict):
        if data.get("format") != FORMAT or data.get("norm") not in ("l2", None):
            raise ValueError("not an exported classifier of this format")
        self.token = re.compile(data["token_pattern"])
        self.lowercase = bool(data["lowercase"])
        self.sublinear_tf = bool(data["sublinear_tf"])
        self.l2 = data["norm"] == "l2"
        self.intercepts = [float(v) for v in data["intercepts"]]
        self.sigmoids = [(float(a), float(b)) for a, b in data["sigmoids"]]
        words = data["words"]
        self.idf = _unpack(data["idf"])
        self.coefs = [_unpack(column) for column in data["coefs"]]
        if not words or not all(isinstance(word, str) for word in words):
            raise ValueError("exported classifier has no vocabulary")
        if not self.intercepts or not (len(self.sigmoids) == len(self.coefs) == len(self.intercepts)):
            raise ValueError("exported classifier's SVMs are incomplete")
        if any(len(column) != len(words) for column in (self.idf, *self.coefs)):
            raise ValueError("exported classifier's columns do not match its vocabulary")
        self.vocabulary = {word: index for index, word in enumerate(words)}

    def score(self, text: str) -> float:
        """The probability that `text` is toxic: profanity_check.predict_prob([text])[0]."""
        if self.lowercase:
            text = text.lower()
        counts = Counter(token for token in self.token.findall(text) if token in self.vocabulary)
        features = []  # (column, tf * idf)
        for word, count in counts.items():
            index = self.vocabulary[word]
            tf = 1.0 + math.log(count) if self.sublinear_tf else float(count)
            features.append((index, tf * self.idf[index]))
        norm = math.sqrt(sum(value * value for _, value in features)) if self.l2 else 1.0
        if norm == 0.0:
            norm = 1.0  # scikit-learn leaves an empty row as it is
        total = 0.0
        for coef, intercept, (a, b) in zip(self.coefs, self.intercepts, self.sigmoids, strict=True):
            decision = sum(value / norm * coef[index] for index, value in features) + intercept
            total += _expit_neg(a * decision + b)
        return total / len(self.intercepts)

    def predict_prob(self, texts: Iterable[str]) -> list[float]:
        return [self.score(text) for text in texts]


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, separators=(",", ":"))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load(directory: Path | None = None) -> ToxicityClassifier:
    """The classifier from its cache in `directory` (default `cache_dir()`), exporting it there
    first when the cache is missing, stale, or unreadable. An unwritable cache directory costs
    the export on every call, nothing else."""
    path = (directory or cache_dir()) / CACHE_NAME
    key = fingerprint()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and data.get("key") == key:
            return ToxicityClassifier(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, re.error):
        pass  # missing or corrupt: rebuilt below
    data = export(key)
    with contextlib.suppress(OSError):  # unwritable: exported again next time
        _write_atomic(path, data)
    return ToxicityClassifier(data)
