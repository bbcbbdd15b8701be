"""`tisslm generate --kb`: the prompt is grounded in retrieved chunks and the sources are listed."""

from __future__ import annotations

import subprocess
import sys

from conftest import make_model

from tisslm.core.generate import complete
from tisslm.core.sampling import SamplingParams
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.kb import KnowledgeBase, build_index
from tisslm.kb.build import record_grounding
from tisslm.kb.context import with_context


def test_generate_with_a_knowledge_base_grounds_the_prompt_and_cites_sources(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "checksums.py").write_text('def adler_checksum(data):\n    """Adler-32 of data."""\n    return 1\n')
    (corpus / "colors.py").write_text('def mix_paint(a, b):\n    """Blend two colours."""\n    return a\n')
    build_index(tmp_path / "kb", directory=corpus, include=["**/*.py"], progress=False)
    # The pipeline measured grounding in this index as worse than none: generate says so.
    worse = {"bits_per_byte_without": 1.25, "bits_per_byte_with_context": 1.5, "documents": 2, "window": 64}
    record_grounding(tmp_path / "kb", worse)
    model_dir = tmp_path / "model"
    make_model(vocab_size=257, max_seq_len=512).save_pretrained(model_dir, tokenizer=byte_level_tokenizer())

    prompt = "adler checksum of data"
    result = subprocess.run(
        [sys.executable, "-m", "tisslm.cli", "generate", "--model", str(model_dir), "--prompt", prompt,
         "--kb", str(tmp_path / "kb"), "--kb-k", "1", "--temperature", "0", "--max-new-tokens", "8"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "checksums.py:1-3 checksums.adler_checksum" in result.stderr
    assert "warning: grounding with this knowledge base made the model worse" in result.stderr
    assert "1.5000 with retrieved context vs 1.2500 without" in result.stderr
    # The continuation is the one of the grounded text, not of the bare prompt.
    tokenizer = byte_level_tokenizer()
    with KnowledgeBase.open(tmp_path / "kb") as kb:
        grounded = with_context(prompt, kb.search(prompt, k=1), tokenizer, 512 - 8)
    model = make_model(vocab_size=257, max_seq_len=512)
    (expected,) = complete(model, tokenizer, [grounded.text], SamplingParams(max_new_tokens=8, temperature=0))
    assert grounded.text != prompt and result.stdout.rstrip("\n") == prompt + expected


def test_generate_with_a_missing_knowledge_base_is_one_line(tmp_path):
    model_dir = tmp_path / "model"
    make_model(vocab_size=257).save_pretrained(model_dir, tokenizer=byte_level_tokenizer())
    result = subprocess.run(
        [sys.executable, "-m", "tisslm.cli", "generate", "--model", str(model_dir), "--prompt", "x", "--kb",
         str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "nowhere" in result.stderr
