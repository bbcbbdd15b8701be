"""General-purpose compressors as language-model baselines: bits they spend per byte of text.

An honest LM must beat them on held-out bytes; `context` lets a compressor see training text
first, as the model has (the bytes it spends on `context` itself are not counted).
"""

from __future__ import annotations

import bz2
import gzip
import lzma

COMPRESSORS = {
    "gzip_9": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
    "bz2_9": lambda data: bz2.compress(data, compresslevel=9),
    "xz_9e": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
}


def bits_per_byte(name: str, target: bytes, context: bytes = b"") -> float:
    compress = COMPRESSORS[name]
    spent = len(compress(context + target)) - (len(compress(context)) if context else 0)
    return 8 * spent / len(target)
