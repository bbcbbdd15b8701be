"""The tokenize stage streams data/clean: `tokenize_shards` writes the bytes the in-memory
`tokenize_corpus(read_split(...))` wrote (train.bin, val.bin, meta.json), without holding the
corpus, and a damaged shard is a one-line error that leaves the previous output as it was."""

from __future__ import annotations

import hashlib
import inspect
import json
import random
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO

from tisslm.core.config import TokenizerParams
from tisslm.core.errors import TissLMError
from tisslm.core.model import TOKENIZER_FILE
from tisslm.core.tokenizer import END_OF_TEXT, byte_level_tokenizer, train_bpe
from tisslm.data import tokens as tokens_module
from tisslm.data.shards import checked_shard_files, doc_id, text_sha256, write_shards
from tisslm.data.tokens import (
    is_val,
    iter_clean_batches,
    read_split,
    tokenize_corpus,
    tokenize_shards,
)
from tisslm.eval.compression import bits_per_byte

WORDS = ["def", "return", "café", "naïve", "λx", "日本語", "😀", "x = 1", "\n", "    ", "for i in range(10):", ""]


def random_texts(rng: random.Random, n: int, words: int) -> list[str]:
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, words))) for _ in range(n)]
    texts[3] = ""  # an empty document is still one <|endoftext|>
    return texts


def write_clean(directory: Path, texts: list[str], train_only: list[bool], shard_rows: int) -> list[str]:
    """A clean corpus as the clean stage writes it; the documents' ids in table order."""
    import datasets

    paths = [f"doc{i}.py" for i in range(len(texts))]
    ids = [doc_id("test", p) for p in paths]
    table = {"id": ids, "source": ["test"] * len(texts), "path": paths, "text": texts,
             "n_bytes": [len(t.encode()) for t in texts], "sha256": [text_sha256(t) for t in texts],
             "train_only": train_only}  # fmt: skip
    write_shards(datasets.Dataset.from_dict(table), directory, shard_rows)
    return ids


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Five uneven shards of 170 documents (multi-byte text, some train_only) and a BPE tokenizer."""
    root = tmp_path_factory.mktemp("streaming")
    rng = random.Random(1)
    texts = random_texts(rng, 170, 120)
    train_only = [i % 7 == 0 for i in range(len(texts))]
    ids = write_clean(root / "clean", texts, train_only, shard_rows=37)
    tokenizer = train_bpe(texts, TokenizerParams(vocab_size=320, special_tokens=[END_OF_TEXT, "<|pad|>"]),
                          show_progress=False)  # fmt: skip
    tokenizer.save(str(root / TOKENIZER_FILE))
    return root, ids, texts, train_only, tokenizer


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(("batch_docs", "context", "read_ahead"), [(16, 3000, 4), (5, 0, 1), (64, 10**9, 2)])
def test_streaming_writes_the_bytes_of_the_in_memory_encoding(corpus, tmp_path, batch_docs, context, read_ahead):
    root, ids, texts, train_only, tokenizer = corpus
    assert len(checked_shard_files(root / "clean")) == 5
    val_fraction = 0.2
    meta = tokenize_shards(root / "clean", tokenizer, root / TOKENIZER_FILE, tmp_path / "tokens", val_fraction,
                           batch_docs, context, read_ahead=read_ahead)  # fmt: skip

    # What the in-memory stage wrote, built here from the texts: each document's ids then
    # <|endoftext|>, in table order, split by the id hash.
    end = tokenizer.token_to_id(END_OF_TEXT)
    expected = {"train": [], "val": []}
    split_text = {"train": [], "val": []}
    for doc, text, only in zip(ids, texts, train_only, strict=True):
        split = "val" if is_val(doc, val_fraction, only) else "train"
        expected[split] += [*tokenizer.encode(text, add_special_tokens=False).ids, end]
        split_text[split].append(text)
    assert expected["val"] and expected["train"] and split_text["train"][-1] != ""
    for split in ("train", "val"):
        data = np.asarray(expected[split], dtype=np.uint16).tobytes()
        assert (tmp_path / "tokens" / f"{split}.bin").read_bytes() == data
        raw = "".join(split_text[split]).encode()
        assert meta[split] == {"documents": len(split_text[split]), "tokens": len(expected[split]),
                               "bytes": len(raw), "bytes_per_token": len(raw) / len(expected[split])}  # fmt: skip
    val = "".join(split_text["val"]).encode()
    train_context = "".join(split_text["train"]).encode()[-context:] if context else b""
    assert meta["val_baselines_bits_per_byte"] == {
        "xz_9e": bits_per_byte("xz_9e", val),
        "xz_9e_after_train_text": bits_per_byte("xz_9e", val, train_context),
        "train_context_bytes": len(train_context),
    }
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tokenizer.get_vocab_size()
    assert meta["tokenizer_sha256"] == hashlib.sha256((root / TOKENIZER_FILE).read_bytes()).hexdigest()
    assert json.loads((tmp_path / "tokens" / "meta.json").read_text()) == meta

    # And byte for byte what the in-memory path (still used by tests) writes, meta.json included.
    tokenize_corpus(read_split(root / "clean", val_fraction), tokenizer, root / TOKENIZER_FILE,
                    tmp_path / "in_memory", val_fraction, batch_docs, context)  # fmt: skip
    assert files_of(tmp_path / "tokens") == files_of(tmp_path / "in_memory")
    assert sorted(files_of(tmp_path / "tokens")) == ["meta.json", "train.bin", "val.bin"]


def test_the_reader_yields_one_batch_at_a_time(corpus):
    root, ids, texts, train_only, _ = corpus
    batches = iter_clean_batches(checked_shard_files(root / "clean"), 10)
    assert inspect.isgenerator(batches)
    first = next(batches)
    assert first == (ids[:10], texts[:10], train_only[:10])
    rest = list(batches)
    assert all(len(batch[0]) <= 10 for batch in rest)  # a batch never spans two shards
    assert [doc for batch in [first, *rest] for doc in batch[0]] == ids


def test_streaming_holds_a_fraction_of_the_corpus(tmp_path, monkeypatch):
    """Python's peak allocations while tokenizing a 4 MB corpus stay far below its size: the val text
    (2% here, twice at the end), a tail of train and a few batches. xz's own buffers (hundreds of MB at -9e, whatever the
    input) are left out: bits_per_byte is replaced by a probe taken when streaming is over."""
    rng = random.Random(2)
    texts = ["".join(rng.choices("abcdefghij \n", k=8000)) for _ in range(500)]
    write_clean(tmp_path / "clean", texts, [False] * len(texts), shard_rows=100)
    corpus_bytes = sum(len(t) for t in texts)
    tokenizer = byte_level_tokenizer()  # one token per byte: the most tokens a corpus can make
    tokenizer.save(str(tmp_path / TOKENIZER_FILE))
    del texts

    peaks = []

    def probe(*args) -> float:
        peaks.append(tracemalloc.get_traced_memory()[1])
        return 1.0

    def run(out: str) -> dict:
        return tokenize_shards(tmp_path / "clean", tokenizer, tmp_path / TOKENIZER_FILE, tmp_path / out,
                               0.02, 4, 20_000)  # fmt: skip

    monkeypatch.setattr(tokens_module, "bits_per_byte", probe)
    run("warm")  # imports and caches are not the corpus
    tracemalloc.start()
    try:
        meta = run("tokens")
    finally:
        tracemalloc.stop()
    assert meta["train"]["bytes"] + meta["val"]["bytes"] == corpus_bytes
    assert meta["train"]["tokens"] + meta["val"]["tokens"] == corpus_bytes + 500
    print(f"peak {max(peaks)} of a {corpus_bytes}-byte corpus")
    assert peaks and max(peaks) < corpus_bytes / 4, (max(peaks), corpus_bytes)


@pytest.mark.parametrize("damage", ["footer", "pages"])
def test_a_damaged_shard_is_one_line_and_keeps_the_old_output(corpus, tmp_path, damage):
    root, _, texts, train_only, tokenizer = corpus
    clean = tmp_path / "clean"
    write_clean(clean, texts, train_only, shard_rows=37)
    out = tmp_path / "tokens"
    tokenize_shards(clean, tokenizer, root / TOKENIZER_FILE, out, 0.2, 16, 3000)
    before = files_of(out)

    shard = checked_shard_files(clean)[2]
    data = bytearray(shard.read_bytes())
    if damage == "footer":  # not parquet at all: refused before anything is read
        data[-200:] = b"\0" * 200
    else:  # the footer reads, the third shard's pages do not: refused mid-stream
        data[4:2004] = b"\xff" * 2000
    shard.write_bytes(data)
    with pytest.raises(TissLMError) as raised:
        tokenize_shards(clean, tokenizer, root / TOKENIZER_FILE, out, 0.2, 16, 3000)
    message = str(raised.value)
    assert message.startswith(f"{shard}: not a readable parquet file (") and "\n" not in message
    assert files_of(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean", "tokens"]  # no temporary directory left


def test_an_empty_split_keeps_the_old_output(corpus, tmp_path):
    root, *_, tokenizer = corpus
    out = tmp_path / "tokens"
    tokenize_shards(root / "clean", tokenizer, root / TOKENIZER_FILE, out, 0.2, 16, 0)
    before = files_of(out)
    with pytest.raises(TissLMError, match=r"tokenize.val_fraction=1e-09: one split is empty with 170 documents"):
        tokenize_shards(root / "clean", tokenizer, root / TOKENIZER_FILE, out, 1e-9, 16, 0)
    assert files_of(out) == before


def test_the_stage_streams(corpus, tmp_path, monkeypatch, capsys):
    """`python -m stages.tokenize` as dvc.yaml runs it, in-process: the same files as in memory."""
    root, *_, tokenizer = corpus
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["tokenize"] = {"val_fraction": 0.2, "batch_docs": 8, "baseline_context_bytes": 1000}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (tmp_path / "models" / "tokenizer").mkdir(parents=True)
    (tmp_path / "models" / "tokenizer" / TOKENIZER_FILE).write_bytes((root / TOKENIZER_FILE).read_bytes())
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tokens_module, "read_shards", None)  # the stage must not load the corpus (read_split)
    argv = ["stages.tokenize", "--clean", str(root / "clean"), "--tokenizer", "models/tokenizer",
            "--tokens", "data/tokens"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    from stages import tokenize as stage

    stage.main()
    assert "tokenize: val" in capsys.readouterr().out
    monkeypatch.undo()
    tokenize_corpus(read_split(root / "clean", 0.2), tokenizer, root / TOKENIZER_FILE, tmp_path / "in_memory",
                    0.2, 8, 1000)  # fmt: skip
    assert files_of(tmp_path / "data" / "tokens") == files_of(tmp_path / "in_memory")
