"""Token shards: the clean corpus split by document, encoded, and laid out as flat memmaps.

Training samples random windows from data/tokens/train.bin; every document ends with
<|endoftext|>. meta.json records what a reader needs (dtype, counts, the tokenizer's hash) and
the bytes each split came from, so losses convert to bits per byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from tisslm.core.errors import TissLMError
from tisslm.core.io import atomic_dir
from tisslm.core.tokenizer import END_OF_TEXT
from tisslm.data.shards import read_shards
from tisslm.eval.compression import bits_per_byte

META_FILE = "meta.json"
SPLITS = ("train", "val")


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


def encode_documents(texts: list[str], tokenizer: Tokenizer, batch_docs: int, desc: str) -> np.ndarray:
    """All documents' ids, each followed by <|endoftext|>, in one flat array (Rust encodes on every core)."""
    end = tokenizer.token_to_id(END_OF_TEXT)
    if end is None:
        raise TissLMError(f"the tokenizer has no {END_OF_TEXT!r} token")
    dtype = token_dtype(tokenizer.get_vocab_size())
    pieces = []
    for start in tqdm(range(0, len(texts), batch_docs), desc=desc, unit=" batches"):
        for encoding in tokenizer.encode_batch(texts[start : start + batch_docs], add_special_tokens=False):
            pieces.append(np.asarray([*encoding.ids, end], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


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
    """Write out_dir/{train,val}.bin and meta.json from `read_split`'s texts; return the meta."""
    if not split_texts["train"] or not split_texts["val"]:
        count = sum(map(len, split_texts.values()))
        raise TissLMError(f"tokenize.val_fraction={val_fraction}: one split is empty with {count} documents")
    meta: dict = {
        "dtype": token_dtype(tokenizer.get_vocab_size()).name,
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_sha256": hashlib.sha256(tokenizer_path.read_bytes()).hexdigest(),
        "val_fraction": val_fraction,
    }
    split_bytes = {}
    with atomic_dir(out_dir) as tmp:  # the .bin files and meta.json appear together or not at all
        for split in SPLITS:
            tokens = encode_documents(split_texts[split], tokenizer, batch_docs, f"tokenize {split}")
            tokens.tofile(tmp / f"{split}.bin")  # raw array bytes, read back with np.memmap
            split_bytes[split] = "".join(split_texts[split]).encode("utf-8")
            meta[split] = {
                "documents": len(split_texts[split]),
                "tokens": len(tokens),
                "bytes": len(split_bytes[split]),
                "bytes_per_token": len(split_bytes[split]) / max(1, len(tokens)),
            }
        context = split_bytes["train"][-baseline_context_bytes:] if baseline_context_bytes else b""
        meta["val_baselines_bits_per_byte"] = {
            "xz_9e": bits_per_byte("xz_9e", split_bytes["val"]),
            "xz_9e_after_train_text": bits_per_byte("xz_9e", split_bytes["val"], context),
            "train_context_bytes": len(context),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
