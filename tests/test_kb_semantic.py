"""The reranker's encoder (kb/semantic.py) against transformers' BertModel, its pinned weights, and
the file reranking it drives (index.py)."""

from __future__ import annotations

import math
import shutil
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tisslm.core.errors import TissLMError
from tisslm.kb import KnowledgeBase, build_index, semantic
from tisslm.kb.build import card_text, definition_text
from tisslm.kb.chunk import chunk_document
from tisslm.kb.index import DEFAULT_RANKING, RERANK_FEATURES, Ranking

TEXTS = [
    "read a csv file into dicts",
    "def file_digest(fileobj, digest, /, *, _bufsize=2**18):",
    "word " * 400,  # past MAX_TOKENS: cut, as the reference cuts it
    "",
]


def test_the_numpy_encoder_matches_transformers_bert():
    import torch
    from transformers import AutoModel, AutoTokenizer

    model_dir = semantic._weights_file().parent
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=semantic.MAX_TOKENS, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    ours = semantic.encode(TEXTS)
    assert ours.shape == (len(TEXTS), semantic.DIM) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=2e-6)
    # Batched by length, returned in order: one text alone encodes as it did in the batch.
    np.testing.assert_allclose(semantic.encode([TEXTS[1]])[0], ours[1], atol=2e-6)


def test_erf_is_accurate_to_the_published_bound():
    x = np.linspace(-6, 6, 10001, dtype=np.float64)
    exact = np.array([math.erf(v) for v in x])
    assert np.abs(semantic._erf(x) - exact).max() < 1.5e-7


def test_weights_not_the_pinned_ones_are_refused(monkeypatch, tmp_path):
    semantic.verify_weights()  # the installed ones are
    monkeypatch.setattr(semantic, "WEIGHTS_SHA256", "0" * 64)
    with pytest.raises(TissLMError, match="not the pinned all-MiniLM-L6-v2 weights"):
        semantic._weights_file()
    monkeypatch.undo()
    tampered = tmp_path / "model.safetensors"
    shutil.copyfile(semantic._weights_file(), tampered)
    with tampered.open("r+b") as handle:  # one byte of a weight changed after installation
        handle.seek(-1, 2)
        byte = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([byte[0] ^ 1]))
    monkeypatch.setattr(semantic, "_weights_file", lambda: tampered)
    with pytest.raises(TissLMError, match="is not the pinned"):
        semantic.verify_weights()


LIBRARY = {
    "tabular.py": '"""Comma-separated values: read and write spreadsheet rows."""\n\n'
    'def rows(path):\n    """Read each record of a spreadsheet export as a dictionary."""\n    return []\n',
    "netcode.py": '"""Sockets and network connections."""\n\n'
    'def rows(path):\n    """Open a connection to a server and return its replies."""\n    return []\n',
    "notes.md": "# Notes\n\nNothing documented here.\n",
}


@pytest.fixture(scope="module")
def small_kb(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    for name, text in LIBRARY.items():
        (root / name).write_text(text, encoding="utf-8")
    out = tmp_path_factory.mktemp("kb")
    build_index(out, directory=root, progress=False)
    return out


def test_the_index_holds_a_card_per_document_and_a_vector_per_documented_definition(small_kb):
    with sqlite3.connect(small_kb / "index.sqlite") as db:
        rows = dict(db.execute("SELECT document, vectors FROM semantic"))
    stored = {
        d: np.frombuffer(v, dtype=np.float16).reshape(-1, semantic.DIM).astype(np.float32) for d, v in rows.items()
    }
    # Every document has its card; the two modules each document one definition, notes.md none.
    assert {d: len(v) for d, v in stored.items()} == {"tabular.py": 2, "netcode.py": 2, "notes.md": 1}
    chunks = chunk_document("tabular.py", LIBRARY["tabular.py"])
    assert card_text("tabular.py", chunks).startswith("tabular.py: Comma-separated values")
    expected = semantic.encode([card_text("tabular.py", chunks), definition_text(chunks[1])])
    np.testing.assert_allclose(stored["tabular.py"], expected, atol=2e-3)  # float16 storage, the card first
    with KnowledgeBase.open(small_kb) as kb:
        stats = kb.stats()
    assert (stats["semantic_model"], stats["semantic_cards"], stats["semantic_definitions"]) == (
        semantic.MODEL_NAME,
        3,
        2,
    )


def test_a_rebuild_replaces_the_vectors_of_changed_and_removed_documents(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    for name, text in LIBRARY.items():
        (root / name).write_text(text, encoding="utf-8")
    build_index(tmp_path / "kb", directory=root, progress=False)
    (root / "netcode.py").unlink()
    (root / "tabular.py").write_text(LIBRARY["tabular.py"] + '\n\ndef more():\n    """Another documented one."""\n')
    report = build_index(tmp_path / "kb", directory=root, progress=False)
    assert (report["removed"], report["updated"], report["unchanged"]) == (1, 1, 1)
    with sqlite3.connect(tmp_path / "kb" / "index.sqlite") as db:
        rows = db.execute("SELECT document, LENGTH(vectors) FROM semantic ORDER BY document").fetchall()
    assert rows == [("notes.md", 2 * semantic.DIM), ("tabular.py", 3 * 2 * semantic.DIM)]  # the card + 2 definitions


def test_reranking_follows_the_weights_and_zero_weights_keep_the_fused_order(small_kb):
    query = "read spreadsheet records as dictionaries"
    with KnowledgeBase.open(small_kb) as kb:
        features = dict(kb.rerank_features(query))
        fused = kb.search(query, k=10, ranking=replace(DEFAULT_RANKING, rerank_weights=(0.0,) * 4))
        card_only = kb.search(query, k=10, ranking=replace(DEFAULT_RANKING, rerank_weights=(0.0, 0.0, 1.0, 0.0)))
        against = kb.search(query, k=10, ranking=replace(DEFAULT_RANKING, rerank_weights=(0.0, 0.0, -1.0, 0.0)))
    assert set(features) == {h.path for h in fused} and all(len(f) == len(RERANK_FEATURES) for f in features.values())
    assert features["tabular.py"][2] > features["netcode.py"][2]  # the card says what the file is for
    assert card_only[0].path == "tabular.py" and against[0].path != "tabular.py"
    # Each chunk is scored as its file, files in order of their scores.
    assert [h.score for h in card_only] == sorted((h.score for h in card_only), reverse=True)
    assert card_only[0].score == pytest.approx(features["tabular.py"][2], abs=1e-6)
    assert [h.score for h in fused] == sorted((h.score for h in fused), reverse=True)  # the RRF scores


def test_rerank_weights_round_trip_and_bad_ones_are_refused():
    ranking = replace(DEFAULT_RANKING, rerank_weights=(1.0, 0.5, 2.0, 3.0))
    assert Ranking.from_json(ranking.to_json()) == ranking
    assert Ranking.from_json({"rerank_weights": {"card": 2.0}}).rerank_weights[2] == 2.0
    with pytest.raises(TissLMError, match="unknown rerank_weights name"):
        Ranking.from_json({"rerank_weights": {"cards": 1.0}})
    with pytest.raises(TissLMError, match="rerank_weights needs 4"):
        Ranking(rerank_weights=(1.0,))


def test_an_index_with_another_reranking_model_must_be_rebuilt(small_kb, tmp_path):
    copy = tmp_path / "kb"
    shutil.copytree(small_kb, copy)
    with sqlite3.connect(copy / "index.sqlite") as db:
        db.execute("UPDATE meta SET value = 'other-model' WHERE key = 'semantic_model'")
    with pytest.raises(TissLMError, match=r"other-model.*rebuild it"):
        KnowledgeBase.open(copy)
