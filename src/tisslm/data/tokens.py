"""Token shards: the clean corpus split by document, encoded, and laid out as flat memmaps.

Training samples random windows from data/tokens/train.bin; every document ends with
<|endoftext|>. meta.json records what a reader needs (dtype, counts, the tokenizer's hash) and
the bytes each split came from, so losses convert to bits per byte.

`tokenize_shards` (the tokenize stage) streams the clean shards batch by batch and appends to the
token files as it goes: it never holds the corpus, only the val text and a tail of the train text
for the xz baselines. `tokenize_corpus` writes the same files from texts already in memory.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow.parquet as pq
from tokenizers import Tokenizer
from tqdm import tqdm

from tisslm.core.errors import TissLMError
from tisslm.core.io import atomic_dir
from tisslm.core.tokenizer import END_OF_TEXT
from tisslm.data.shards import checked_shard_files, one_line, read_shards
from tisslm.eval.compression import bits_per_byte

META_FILE = "meta.json"
SPLITS = ("train", "val")
READ_COLUMNS = ("id", "text", "train_only")  # all tokenize needs of a clean shard


def is_val(doc_id: str, val_fraction: float, train_only: bool = False) -> bool:
    """Document-level split by a hash of the id: stable across runs and across corpus changes, so
    that adding a source (train_only or not) leaves every other document on its side."""
    return not train_only and int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000 < val_fraction


def split_documents(
    ids: list[str], texts: list[str], train_only: list[bool], val_fraction: float
) -> dict[str, list[str]]:
    """The texts of each split, in table order: {"train": [...], "val": [...]}."""
    split: dict[str, list[str]] = {"train": [], "val": []}
    for doc_id, text, only_train in zip(ids, texts, train_only, strict=True):
        split["val" if is_val(doc_id, val_fraction, only_train) else "train"].append(text)
    return split


def documents_in(tokens: np.ndarray, end: int) -> list[list[int]]:
    """The documents of a token shard, each without the `end` token that closes it."""
    ends = np.flatnonzero(np.asarray(tokens) == end)  # (documents,)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    return [tokens[start:stop].tolist() for start, stop in zip(starts, ends, strict=True)]


def read_split(clean_dir: str | Path, val_fraction: float) -> dict[str, list[str]]:
    """The clean corpus's texts by split: what the tokenizer trains on and what every stage scores."""
    table = read_shards(clean_dir)
    return split_documents(table["id"], table["text"], table["train_only"], val_fraction)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def read_meta(tokens_dir: str | Path) -> dict:
    path = Path(tokens_dir) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise TissLMError(f"{path}: not found (run the tokenize stage first)") from None
    except json.JSONDecodeError as err:
        raise TissLMError(f"{path}: not valid JSON ({err})") from None


def load_split(tokens_dir: str | Path, split: str) -> np.memmap:
    meta = read_meta(tokens_dir)
    path = Path(tokens_dir) / f"{split}.bin"
    expected = meta[split]["tokens"] * np.dtype(meta["dtype"]).itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise TissLMError(f"{path}: missing or not the {expected} bytes meta.json promises")
    return np.memmap(path, dtype=meta["dtype"], mode="r")


def tokenize_corpus(
    split_texts: dict[str, list[str]],
    tokenizer: Tokenizer,
    tokenizer_path: Path,
    out_dir: Path,
    val_fraction: float,
    batch_docs: int,
    baseline_context_bytes: int,
) -> dict:
    """Write out_dir/{train,val}.bin and meta.json from texts already in memory (`read_split`'s):
    the same files `tokenize_shards` streams from the shards. Returns the meta."""
    with atomic_dir(out_dir) as tmp, _TokenWriter(tmp, tokenizer, baseline_context_bytes) as writer:
        for split in SPLITS:
            texts = split_texts[split]
            for start in tqdm(range(0, len(texts), batch_docs), desc=f"tokenize {split}", unit=" batches"):
                batch = texts[start : start + batch_docs]
                writer.write(batch, [split] * len(batch))
        meta = writer.finish(tokenizer_path, val_fraction)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def iter_clean_batches(files: list[Path], batch_docs: int) -> Iterator[tuple[list[str], list[str], list[bool]]]:
    """(ids, texts, train_only) of at most `batch_docs` documents at a time, in table order (the
    files' order, then their rows'): only the batch being read is in memory. A file that fails to
    read is a one-line TissLMError naming it."""
    for file in files:
        try:
            batches = pq.ParquetFile(file).iter_batches(batch_size=batch_docs, columns=list(READ_COLUMNS))
        except Exception as err:
            raise TissLMError(f"{file}: not a readable parquet file ({one_line(err)})") from None
        while True:
            try:
                batch = next(batches, None)
                if batch is None:
                    break
                if batch.column("id").null_count or batch.column("text").null_count:
                    raise TissLMError(f"{file}: a document without an id or text")
                columns = [batch.column(name).to_pylist() for name in READ_COLUMNS]
            except TissLMError:
                raise
            except Exception as err:  # a damaged page, a column of the wrong type, ...
                raise TissLMError(f"{file}: not a readable parquet file ({one_line(err)})") from None
            yield columns[0], columns[1], columns[2]


def _read_ahead(items: Iterator, depth: int) -> Iterator:
    """`items`, produced by a background thread up to `depth` ahead: the next batches are read
    (pyarrow releases the GIL) while this one is encoded. The producer's error is raised here;
    closing this generator stops the producer."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as err:  # handed to the consumer, which raises it in its own thread
            put((None, err))
        finally:
            getattr(items, "close", lambda: None)()

    thread = threading.Thread(target=produce, name="tokenize-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, err = slots.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


class _TokenWriter:
    """Appends documents to {train,val}.bin in `directory` as they come and counts them; of their
    text it keeps only the val bytes and the last `baseline_context_bytes` of train, for the xz
    baselines of meta.json."""

    def __init__(self, directory: Path, tokenizer: Tokenizer, baseline_context_bytes: int) -> None:
        self.end = tokenizer.token_to_id(END_OF_TEXT)
        if self.end is None:
            raise TissLMError(f"the tokenizer has no {END_OF_TEXT!r} token")
        self.tokenizer = tokenizer
        self.dtype = token_dtype(tokenizer.get_vocab_size())
        self.context_bytes = baseline_context_bytes
        self.documents = dict.fromkeys(SPLITS, 0)
        self.tokens = dict.fromkeys(SPLITS, 0)
        self.bytes = dict.fromkeys(SPLITS, 0)
        self.val_text = bytearray()
        self.train_tail = bytearray()  # the last context_bytes (up to twice that between trims)
        self.files: dict[str, BinaryIO] = {}
        try:
            for split in SPLITS:
                self.files[split] = open(directory / f"{split}.bin", "wb")  # noqa: SIM115 closed by close()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> _TokenWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for file in self.files.values():
            file.close()

    def write(self, texts: list[str], splits: list[str]) -> None:
        """Encode `texts` in one batch (Rust, on every core) and append each to its split."""
        pieces: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        for text, split, encoding in zip(texts, splits, encodings, strict=True):
            pieces[split].append(np.asarray([*encoding.ids, self.end], dtype=self.dtype))
            data = text.encode("utf-8")
            self.documents[split] += 1
            self.bytes[split] += len(data)
            if split == "val":
                self.val_text += data
            elif self.context_bytes:
                self.train_tail += data
                if len(self.train_tail) > 2 * self.context_bytes:
                    del self.train_tail[: -self.context_bytes]
        for split, arrays in pieces.items():
            if arrays:
                tokens = np.concatenate(arrays)
                self.files[split].write(tokens.data)  # raw array bytes (no copy), read back with np.memmap
                self.tokens[split] += len(tokens)

    def finish(self, tokenizer_path: Path, val_fraction: float) -> dict:
        """Close the token files and return the meta (as `tokenize_corpus` makes it)."""
        self.close()
        if not self.documents["train"] or not self.documents["val"]:
            count = sum(self.documents.values())
            raise TissLMError(f"tokenize.val_fraction={val_fraction}: one split is empty with {count} documents")
        meta: dict = {
            "dtype": self.dtype.name,
            "vocab_size": self.tokenizer.get_vocab_size(),
            "tokenizer_sha256": hashlib.sha256(Path(tokenizer_path).read_bytes()).hexdigest(),
            "val_fraction": val_fraction,
        }
        for split in SPLITS:
            meta[split] = {
                "documents": self.documents[split],
                "tokens": self.tokens[split],
                "bytes": self.bytes[split],
                "bytes_per_token": self.bytes[split] / max(1, self.tokens[split]),
            }
        val = bytes(self.val_text)
        context = bytes(self.train_tail[-self.context_bytes :]) if self.context_bytes else b""
        meta["val_baselines_bits_per_byte"] = {
            "xz_9e": bits_per_byte("xz_9e", val),
            "xz_9e_after_train_text": bits_per_byte("xz_9e", val, context),
            "train_context_bytes": len(context),
        }
        return meta


def tokenize_shards(
    clean_dir: str | Path,
    tokenizer: Tokenizer,
    tokenizer_path: Path,
    out_dir: Path,
    val_fraction: float,
    batch_docs: int,
    baseline_context_bytes: int,
    read_ahead: int = 4,
) -> dict:
    """Write out_dir/{train,val}.bin and meta.json from the shards of `clean_dir`, streamed: the same
    bytes `tokenize_corpus(read_split(clean_dir, val_fraction), ...)` writes, without the corpus in
    memory. A background thread reads up to `read_ahead` batches of `batch_docs` documents ahead
    while `encode_batch` encodes one on every core; the files grow in atomic_dir's temporary
    directory, so a failure (a damaged shard, an empty split) leaves the old out_dir as it was.
    Returns the meta."""
    files = checked_shard_files(clean_dir)
    rows = sum(pq.ParquetFile(file).metadata.num_rows for file in files)

    def split_batches() -> Iterator[tuple[list[str], list[str]]]:  # run by the read-ahead thread
        for ids, texts, train_only in iter_clean_batches(files, batch_docs):
            splits = [is_val(doc, val_fraction, only) for doc, only in zip(ids, train_only, strict=True)]
            yield texts, ["val" if val else "train" for val in splits]

    with atomic_dir(out_dir) as tmp:  # the .bin files and meta.json appear together or not at all
        with _TokenWriter(tmp, tokenizer, baseline_context_bytes) as writer:
            with tqdm(total=rows, desc="tokenize", unit=" docs") as progress:
                batches = _read_ahead(split_batches(), read_ahead)
                try:
                    for texts, splits in batches:
                        writer.write(texts, splits)
                        progress.update(len(texts))
                finally:
                    batches.close()
            meta = writer.finish(tokenizer_path, val_fraction)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
