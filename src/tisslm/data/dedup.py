"""Near-duplicate detection: MinHash signatures, LSH candidates, exact Jaccard verification.

As in BigCode's pipeline, a document is the set of its token 5-grams (shingles). MinHash LSH
(datasketch) proposes candidate pairs cheaply; because a pair right at the threshold is missed
by banded LSH about half the time, the index is built for a lower threshold and every candidate
pair is then checked against the exact Jaccard similarity of the two shingle sets. Clusters are
the connected components of the verified pairs; the earliest document of each is kept.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

TOKEN_RE = re.compile(r"[A-Za-z_0-9]+")
MINHASH_SCHEME = "affine32"  # datasketch's permutation scheme; signatures are 32-bit values
# Odd 64-bit multiplier for combining token hashes into a shingle hash (wraps modulo 2**64).
_MIX = np.uint64(0x9E3779B97F4A7C15)


@lru_cache(maxsize=1 << 20)
def _token_hash(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=8).digest(), "little")


def shingle_hashes(text: str, shingle_size: int) -> np.ndarray:
    """Sorted unique 32-bit hashes of the token n-grams of `text` (datasketch expects 32-bit values)."""
    tokens = TOKEN_RE.findall(text)
    if not tokens:
        return np.zeros(0, dtype=np.uint64)
    hashes = np.fromiter((_token_hash(t) for t in tokens), dtype=np.uint64, count=len(tokens))
    n = max(1, len(tokens) - shingle_size + 1)
    combined = hashes[:n].copy()
    with np.errstate(over="ignore"):
        for offset in range(1, min(shingle_size, len(tokens))):
            combined = combined * _MIX + hashes[offset : offset + n]
    return np.unique((combined >> np.uint64(32)) ^ (combined & np.uint64(0xFFFFFFFF)))


def minhash_signature(shingles: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    minhash = MinHash(num_perm=num_perm, seed=seed, hashfunc=int, scheme=MINHASH_SCHEME)
    if len(shingles):
        minhash.update_batch(shingles.tolist())
    return minhash.hashvalues


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    if not len(a) and not len(b):
        return 1.0
    shared = len(np.intersect1d(a, b, assume_unique=True))
    return shared / (len(a) + len(b) - shared)


def near_duplicate_clusters(
    signatures: list[np.ndarray],
    shingles: list[np.ndarray],
    threshold: float,
    num_perm: int,
    seed: int,
) -> list[list[int]]:
    """Clusters (lists of row indices, ascending) of two or more documents with Jaccard >= threshold."""
    lsh = MinHashLSH(threshold=max(0.3, threshold - 0.2), num_perm=num_perm)
    parent = list(range(len(signatures)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for index, signature in enumerate(signatures):
        minhash = LeanMinHash(seed=seed, hashvalues=signature, scheme=MINHASH_SCHEME)
        for other in lsh.query(minhash):
            if root(other) != root(index) and jaccard(shingles[index], shingles[other]) >= threshold:
                parent[max(root(other), root(index))] = min(root(other), root(index))
        lsh.insert(index, minhash, check_duplication=False)
    clusters: dict[int, list[int]] = {}
    for index in range(len(signatures)):
        clusters.setdefault(root(index), []).append(index)
    return [members for members in clusters.values() if len(members) > 1]
