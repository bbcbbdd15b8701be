"""A model and tokenizer for the tests that open the exports with other runtimes (transformers 4.x,
optimum, llama.cpp): a byte-level BPE trained on the project's own Python, so merges and the
pre-tokenizer are exercised, and a model whose RoPE base is not the Llama default, so a runtime
that ignored the config's value would show it."""

from __future__ import annotations

from conftest import REPO, make_model
from tokenizers import Tokenizer

from tisslm.core.config import TokenizerParams
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import END_OF_TEXT, train_bpe

PROMPTS = [
    "def fibonacci(n):\n    ",
    "import os\nfor name in os.listdir(path):\n",
    "class Stack:\n    def push(self, item):",
    "x",
]


def bpe_tokenizer(vocab_size: int = 600) -> Tokenizer:
    sources = sorted((REPO / "src" / "tisslm").rglob("*.py"))
    return train_bpe((p.read_text() for p in sources), TokenizerParams(vocab_size=vocab_size), show_progress=False)


def code_model(tokenizer: Tokenizer, **overrides) -> TissLM:
    settings = dict(vocab_size=tokenizer.get_vocab_size(), max_seq_len=256, rope_theta=500.0)
    return make_model(**{**settings, **overrides})


def end_of_text(tokenizer: Tokenizer) -> int:
    return tokenizer.token_to_id(END_OF_TEXT)


def trained_code_model(tokenizer: Tokenizer, steps: int = 300, **overrides) -> TissLM:
    """code_model after a few hundred AdamW steps on the same sources: its next-token choices are
    confident, as a real model's mostly are, so a runtime's rounding (F16, Q8_0) seldom flips a
    greedy choice while a real mistake (a wrong layout, position or mask) still changes many."""
    import torch

    ids = torch.tensor(
        [i for p in sorted((REPO / "src" / "tisslm").rglob("*.py")) for i in tokenizer.encode(p.read_text()).ids]
    )
    model = code_model(tokenizer, **overrides).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    window = 128
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - window - 1, (16,), generator=generator)
        batch = torch.stack([ids[s : s + window + 1] for s in starts.tolist()])  # (16, window + 1)
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
