"""Tokenizers are Hugging Face `tokenizers` objects saved as tokenizer.json beside the weights."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tisslm.errors import TissLMError
from tisslm.model import TOKENIZER_FILE

END_OF_TEXT = "<|endoftext|>"


def byte_level_tokenizer() -> Tokenizer:
    """One token per byte plus <|endoftext|>: needs no training, so a random model can talk."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise TissLMError(f"{path}: not found (the model directory has no tokenizer)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise TissLMError(f"{path}: not a valid tokenizer.json ({err})") from None
