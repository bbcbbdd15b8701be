"""Encoder weights read straight from the files a wheel installed, without the model's own library.

Loading a model through its package costs a CLI search most of its start-up (WordLlama's imports
`requests` for downloads we never make: 0.3 s; transformers and torch: seconds), so the knowledge
base's encoders map the safetensors file and run their few numpy operations themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16}


def mapped_tensors(path: Path) -> dict[str, np.ndarray]:
    """The float tensors of a safetensors file as read-only views of the file mapped into memory:
    nothing is read until used, so a vocabulary costs only the rows a query looks up (the
    safetensors package reads every byte first; the format is an 8-byte header length, a JSON header
    of dtype, shape and byte offsets, then the data)."""
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length)
    return {
        name: np.asarray(data[start:end])
        .view(DTYPES[entry["dtype"]])
        .reshape(entry["shape"])  # plain arrays: no memmap indexing cost
        for name, entry in header.items()
        if name != "__metadata__" and entry["dtype"] in DTYPES
        for start, end in [entry["data_offsets"]]
    }
