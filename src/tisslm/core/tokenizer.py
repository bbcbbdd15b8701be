"""Tokenizers are Hugging Face `tokenizers` objects saved as tokenizer.json beside the weights.

Both kinds here are byte-level: any UTF-8 text encodes, and decoding gives it back exactly.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tisslm.core.chat import CHAT_FILES
from tisslm.core.config import TokenizerParams
from tisslm.core.errors import TissLMError
from tisslm.core.io import atomic_dir
from tisslm.core.model import TOKENIZER_FILE

END_OF_TEXT = "<|endoftext|>"


def _byte_level(model: models.Model) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def byte_level_tokenizer() -> Tokenizer:
    """One token per byte plus <|endoftext|>: needs no training, so a random model can talk."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    tokenizer = _byte_level(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.add_special_tokens([END_OF_TEXT])
    return tokenizer


def train_bpe(texts: Iterable[str], params: TokenizerParams, show_progress: bool = True) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on `texts`; special tokens take the first ids."""
    if END_OF_TEXT not in params.special_tokens:
        raise TissLMError(f"tokenizer.special_tokens must include {END_OF_TEXT!r}: it ends every document")
    tokenizer = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=params.vocab_size,
        min_frequency=params.min_frequency,
        special_tokens=params.special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(model_dir: str | Path) -> Tokenizer:
    """The tokenizer.json of a model (or tokenizer) directory."""
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise TissLMError(f"{path}: not found (the directory has no tokenizer)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise TissLMError(f"{path}: not a valid tokenizer.json ({err})") from None


def copy_tokenizer(model_dir: str | Path, out_dir: str | Path) -> Tokenizer:
    """Make `out_dir` a tokenizer directory holding a model's tokenizer.json byte for byte (and its
    chat template files, if any), atomically: what the tokenizer stage writes under train.init_from.
    The pipeline ends every document with <|endoftext|>, so the tokenizer must have it."""
    model_dir = Path(model_dir)
    tokenizer = load_tokenizer(model_dir)
    if tokenizer.token_to_id(END_OF_TEXT) is None:
        raise TissLMError(f"{model_dir / TOKENIZER_FILE}: no {END_OF_TEXT!r} token, which ends every document")
    with atomic_dir(out_dir) as tmp:
        shutil.copyfile(model_dir / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        for name in CHAT_FILES:
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, tmp / name)
    return tokenizer
