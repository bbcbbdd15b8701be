"""The knowledge base's WordLlama pooling (kb/embed.py) against the wordllama package's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from tisslm.kb import embed

TEXTS = [
    "decode a JSON document",
    "def customs_duty(value, rate):\n    return value * rate\n",
    "héllo wörld, ünïcode and 日本語 text",
    "x" * 9000,  # past EMBED_CHARS: both sides see the same cut
    Path(embed.__file__).read_text(),
    " ",
    "a",
]


def wordllama_vectors(texts: list[str]) -> np.ndarray:
    import wordllama

    model = wordllama.WordLlama.load(
        config=embed.WORDLLAMA_CONFIG, cache_dir=Path(wordllama.__file__).parent, dim=embed.DIM, disable_download=True
    )
    return model.embed([t[: embed.EMBED_CHARS] for t in texts], norm=True, batch_size=len(texts))


def test_vectors_equal_wordllamas_in_any_batching_and_order():
    texts = TEXTS * 11  # 77 texts: two batches of 64 and 13, sorted by length across them
    ours = embed.embed(texts)
    assert ours.shape == (len(texts), embed.DIM) and ours.dtype == np.float32
    for text, vector in zip(TEXTS, ours[: len(TEXTS)], strict=True):
        reference = wordllama_vectors([text])[0]
        np.testing.assert_allclose(vector, reference, rtol=0, atol=1e-6, err_msg=text[:40])
    np.testing.assert_array_equal(ours, np.tile(ours[: len(TEXTS)], (11, 1)))  # the caller's order, batch-free
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


def test_a_text_without_tokens_embeds_as_zeros_where_wordllama_gives_nan():
    with np.errstate(invalid="ignore"):  # wordllama divides by the zero norm
        assert np.isnan(wordllama_vectors([""])).all()
    vectors = embed.embed(["", "decode a JSON document"])
    assert not vectors[0].any() and np.isfinite(vectors).all()
    assert embed.embed([]).shape == (0, embed.DIM)


def test_embedding_imports_neither_the_wordllama_package_nor_requests():
    code = (
        "import sys\n"
        "from tisslm.kb import embed\n"
        "assert embed.embed(['decode a JSON document']).shape == (1, embed.DIM)\n"
        "print(sorted(m for m in ('wordllama', 'requests') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
