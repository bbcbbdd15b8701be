"""llama.cpp (through llama-cpp-python, built from its sdist) runs the GGUF exports as TissLM does.

Marked slow: `make test-slow` installs the `llama` extra (a 5-minute compile the first time, then
pip's wheel cache) and runs these; `.ci/run` calls it after `make test`.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from runtimes import PROMPTS, bpe_tokenizer, trained_code_model

from tisslm.core.generate import generate
from tisslm.release.export import export_gguf

pytestmark = pytest.mark.slow

NEW_TOKENS = 64
ROUND_TRIP_TEXTS = [*PROMPTS, "x = 1234567 + 0.25e-3  # digits\n", "naïve café — ✓ 日本語\n\ttabs  and   spaces",
                    "if a!=b and c<=d: return {'k': [1, 2]}", "   leading spaces\n\n\n"]  # fmt: skip


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = bpe_tokenizer()
    return trained_code_model(tokenizer), tokenizer


@pytest.fixture(scope="module")
def llama(model_and_tokenizer, tmp_path_factory):
    """tensor type -> a llama_cpp.Llama over that GGUF export, logits kept for every position."""
    import llama_cpp

    model, tokenizer = model_and_tokenizer
    directory = tmp_path_factory.mktemp("gguf")
    runtimes = {}
    for tensor_type in ("F16", "Q8_0"):
        path = export_gguf(model, tokenizer, directory / f"tisslm-{tensor_type}.gguf", tensor_type)
        runtimes[tensor_type] = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    yield runtimes
    for runtime in runtimes.values():
        runtime.close()


@pytest.mark.parametrize("tensor_type", ["F16", "Q8_0"])
def test_gguf_tokenizer_round_trips_text_as_tokenizer_json_does(model_and_tokenizer, llama, tensor_type):
    _, tokenizer = model_and_tokenizer
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text).ids
        assert llama[tensor_type].tokenize(text.encode(), add_bos=False, special=False) == ids, text
        assert llama[tensor_type].detokenize(ids).decode() == text


def f16_matrices(model):
    """The model as tisslm-F16.gguf holds it: matrices rounded to F16, norms kept in F32.

    The reference for llama.cpp's F16 run. Against the F32 model, one of these prompts turns at
    token 34, where TissLM's own top two logits differ by 0.0003: a tie that F16 rounding decides,
    not a difference between the runtimes (gguf_parity measures the rounding itself).
    """
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in rounded.parameters():
            if parameter.dim() == 2:
                parameter.copy_(parameter.half().float())
    return rounded


TIE = 1e-3  # logits this close are a tie that the order of F16 accumulation decides, not the runtime


@torch.no_grad()
def assert_same_greedy(model, prompt: list[int], ours: list[int], theirs: list[int]) -> None:
    """Two greedy continuations agree token for token, or up to a step where the reference's own
    top two logits tie (within TIE): from there the texts part by rounding alone. The test model
    trains on this repository's sources, so which prompt meets such a tie changes with the code;
    a wrong layout, position or mask changes confident choices, which this still catches."""
    assert len(theirs) == len(ours)
    step = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    if step is not None:
        logits = model(torch.tensor([prompt + ours[:step]]))[0, -1]
        gap = (logits[ours[step]] - logits[theirs[step]]).item()
        assert abs(gap) < TIE, f"greedy choices part at step {step} where the logits differ by {gap:.4f}"


def test_f16_greedy_continuation_equals_tisslm_token_for_token(model_and_tokenizer, llama):
    model, tokenizer = model_and_tokenizer
    model = f16_matrices(model)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        theirs = []
        for token in llama["F16"].generate(ids, top_k=1, temp=0.0, reset=True):
            theirs.append(token)
            if len(theirs) == NEW_TOKENS:
                break
        assert_same_greedy(model, ids, generate(model, [ids], NEW_TOKENS, temperature=0)[0], theirs)


@torch.no_grad()
def test_q8_0_picks_tisslm_next_token_at_nine_in_ten_positions(model_and_tokenizer, llama):
    """Teacher-forced on TissLM's own greedy text, so one early flip does not decide every later position."""
    model, tokenizer = model_and_tokenizer
    agree = positions = 0
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt).ids
        sequence = ids + generate(model, [ids], NEW_TOKENS, temperature=0)[0]
        runtime = llama["Q8_0"]
        runtime.reset()
        runtime.eval(sequence)
        theirs = np.asarray(runtime.scores[: len(sequence)]).argmax(-1)[len(ids) - 1 :]
        ours = model(torch.tensor([sequence]))[0].argmax(-1).numpy()[len(ids) - 1 :]
        agree, positions = agree + int((theirs == ours).sum()), positions + len(ours)
    assert agree / positions >= 0.9, f"{agree}/{positions}"


# ---- llama.cpp as TissLM's decode engine (serve.backend: llama.cpp) ----


@pytest.fixture(scope="module")
def engine(model_and_tokenizer):
    from tisslm.release.llamacpp import LlamaCppDecoder

    model, tokenizer = model_and_tokenizer
    decoder = LlamaCppDecoder.for_model(model, tokenizer, slots=4)
    yield decoder
    decoder.close()


def test_the_llama_cpp_engine_decodes_what_tisslm_decodes(model_and_tokenizer, engine):
    """Greedy through generate() on the engine, batched and alone, gives the tokens of TissLM's own
    engine on the F16-rounded weights; speculation on it gives plain greedy's tokens."""
    model, tokenizer = model_and_tokenizer
    prompts = [tokenizer.encode(p).ids for p in PROMPTS[:4]]
    reference = f16_matrices(model)
    ours = generate(reference, prompts, NEW_TOKENS, temperature=0)
    batched = generate(model, prompts, NEW_TOKENS, temperature=0, decoder=engine)
    alone = [generate(model, [p], NEW_TOKENS, temperature=0, decoder=engine)[0] for p in prompts]
    for prompt, expected, got, single in zip(prompts, ours, batched, alone, strict=True):
        assert_same_greedy(reference, prompt, expected, got)
        # The engine itself: batching changes nothing but a near-tie, where llama.cpp's batched kernels round
        # differently from its one-sequence ones.
        assert_same_greedy(reference, prompt, single, got)
    for prompt, single in zip(prompts, alone, strict=True):  # speculation: plain greedy's, as above
        drafted = generate(model, [prompt], NEW_TOKENS, temperature=0, decoder=engine, lookahead=4)[0]
        assert_same_greedy(reference, prompt, single, drafted)


def test_the_server_on_the_llama_cpp_engine_serves_what_generate_gives(model_and_tokenizer):
    """Seeded and greedy requests sharing the batcher's steps on llama.cpp get generate()'s tokens on it."""
    import queue

    from tisslm.core.sampling import SamplingParams
    from tisslm.release.llamacpp import decode_engine
    from tisslm.serve.batching import Batcher, Finished, Token

    model, tokenizer = model_and_tokenizer
    vocab = tokenizer.get_vocab_size()
    jobs = [
        (tokenizer.encode(PROMPTS[0]).ids, SamplingParams(max_new_tokens=32, temperature=0.9, top_k=40, seed=7)),
        (tokenizer.encode(PROMPTS[1]).ids, SamplingParams(max_new_tokens=32, temperature=0)),
    ]
    batcher = Batcher(model, 2, vocab_limit=vocab, decoder=decode_engine("llama.cpp", model, tokenizer, 2)).start()
    try:
        events = [queue.Queue() for _ in jobs]
        for (prompt, params), q in zip(jobs, events, strict=True):
            batcher.submit(prompt, params, q.put)
        served = []
        for q in events:
            tokens = []
            while not isinstance(event := q.get(timeout=60), Finished):
                tokens.append(event.id) if isinstance(event, Token) else None
            served.append(tokens)
    finally:
        batcher.stop()
    alone = decode_engine("llama.cpp", model, tokenizer, 1)
    for (prompt, p), tokens in zip(jobs, served, strict=True):
        expected = generate(model, [prompt], p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.seed,
                            vocab_limit=vocab, decoder=alone)[0]  # fmt: skip
        if p.temperature:
            assert tokens == expected
        else:  # greedy, two sequences per llama.cpp batch against one: equal but at a near-tie (see above)
            assert_same_greedy(f16_matrices(model), prompt, expected, tokens)


def test_a_missing_or_bad_gguf_gets_a_one_line_error(tmp_path):
    from tisslm.core.errors import TissLMError
    from tisslm.release.llamacpp import LlamaCppDecoder, decode_engine

    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF but not really")
    with pytest.raises(TissLMError, match=r"llama\.cpp could not load it"):
        LlamaCppDecoder(bad, slots=1, max_len=64)
    with pytest.raises(TissLMError, match=r"backend 'vllm': one of torch, llama\.cpp"):
        decode_engine("vllm", None, None, 1)
