"""Sampling filters and batched generation."""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from conftest import make_model

from tisslm.core.config import Precision
from tisslm.core.decode import PRECISIONS, Decoder, for_decoding
from tisslm.core.errors import TissLMError
from tisslm.core.generate import generate
from tisslm.core.sampling import filter_logits, sample_next

PROMPTS = [[5, 17, 3, 44, 9, 2, 71], [8], [60, 61, 62, 63]]


def draws(logits: torch.Tensor, n: int = 3000, **kw) -> set[int]:
    g = torch.Generator().manual_seed(0)
    return set(sample_next(logits.expand(n, -1), generator=g, **kw).tolist())


def test_top_k_never_samples_outside_the_k_best():
    torch.manual_seed(1)
    logits = torch.randn(1, 50) * 0.3  # flat: without the cut, all 50 would be drawn
    best = set(torch.topk(logits, 5).indices[0].tolist())
    assert draws(logits, top_k=5) == best
    assert len(draws(logits)) > 40


@pytest.mark.parametrize(
    "top_p, nucleus",
    [(0.5, {0}), (0.75, {0, 1}), (0.79, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3, 4})],
)
def test_top_p_samples_exactly_the_minimal_nucleus(top_p, nucleus):
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]], dtype=torch.float64)
    order = torch.tensor([3, 0, 4, 1, 2])  # shuffle so the result cannot lean on index order
    logits = probs.log()[:, order]
    assert draws(logits, top_p=top_p) == {int((order == i).nonzero()) for i in nucleus}


def test_top_p_on_random_logits_matches_an_independent_nucleus():
    torch.manual_seed(2)
    logits = torch.randn(4, 40) * 2
    kept = torch.isfinite(filter_logits(logits, top_p=0.9))
    for row, mask in zip(logits.softmax(-1), kept, strict=True):
        probs, order = row.sort(descending=True)
        size = int((probs.cumsum(0) < 0.9).sum()) + 1  # smallest prefix reaching 0.9
        assert set(order[:size].tolist()) == set(mask.nonzero().squeeze(-1).tolist())


def test_top_k_and_top_p_compose():
    logits = torch.tensor([[4.0, 3.9, 3.8, 0.0, -1.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=0.99))
    assert kept.tolist() == [[True, True, False, False, False]]


def test_tiny_temperature_equals_greedy(tiny_model):
    greedy = generate(tiny_model, PROMPTS, 12, temperature=0)
    assert generate(tiny_model, PROMPTS, 12, temperature=1e-4, seed=3) == greedy


def test_same_seed_same_tokens_other_seed_other_tokens(tiny_model):
    a = generate(tiny_model, PROMPTS, 16, temperature=1.0, seed=7)
    assert generate(tiny_model, PROMPTS, 16, temperature=1.0, seed=7) == a
    assert generate(tiny_model, PROMPTS, 16, temperature=1.0, seed=8) != a


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_equals_one_by_one(tiny_model, use_cache):
    batched = generate(tiny_model, PROMPTS, 15, temperature=0, use_cache=use_cache)
    alone = [generate(tiny_model, [p], 15, temperature=0, use_cache=use_cache)[0] for p in PROMPTS]
    assert batched == alone
    assert all(len(out) == 15 for out in batched)


def test_cache_and_no_cache_agree(tiny_model):
    assert generate(tiny_model, PROMPTS, 20, temperature=0, use_cache=True) == generate(
        tiny_model, PROMPTS, 20, temperature=0, use_cache=False
    )


def test_stop_token_ends_each_row_and_is_excluded(tiny_model):
    free = generate(tiny_model, PROMPTS, 12, temperature=0)
    stop = free[0][4]
    out = generate(tiny_model, PROMPTS, 12, temperature=0, stop_tokens=[stop])
    for free_row, row in zip(free, out, strict=True):
        expected = free_row[: free_row.index(stop)] if stop in free_row else free_row
        assert row == expected


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_ends_when_every_row_has_stopped(use_cache):
    model = make_model()
    free = generate(model, [PROMPTS[0]], 20, temperature=0)[0]
    stop = free[3]
    calls = count_forwards(model)
    out = generate(model, [PROMPTS[0]], 20, temperature=0, stop_tokens=[stop], use_cache=use_cache)[0]
    assert out == free[: free.index(stop)]
    assert calls[0] == 1 + free.index(stop)  # the prompt's forward, then one per token up to the stop token


def test_vocab_limit_keeps_ids_below_it(tiny_model):
    out = generate(tiny_model, PROMPTS, 30, temperature=2.0, seed=0, vocab_limit=10)
    assert all(0 <= t < 10 for row in out for t in row)


def test_generation_leaves_training_mode_as_it_was():
    model = make_model(dropout=0.1).train()
    generate(model, [[1, 2]], 3, temperature=0)
    assert model.training


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), "temperature=-0.5"),
        (dict(top_k=0), "top_k=0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(max_new_tokens=60), "exceeds max_seq_len=64"),
    ],
)
def test_invalid_sampling_arguments_are_refused(tiny_model, kwargs, message):
    args = {"max_new_tokens": 5, **kwargs}
    with pytest.raises(TissLMError, match=message):
        generate(tiny_model, PROMPTS, **args)


def test_empty_prompt_is_refused(tiny_model):
    with pytest.raises(TissLMError, match="at least one token"):
        generate(tiny_model, [[1], []], 3)


# ---- the decode engine: compiled step and speculative decoding ----


def test_compiled_step_decodes_what_the_eager_step_decodes(tiny_model):
    """fp32: the compiled static step gives the eager reference's tokens, greedy and seeded sampling."""
    for settings in ({"temperature": 0}, {"temperature": 1.0, "top_k": 20, "seed": 5}):
        eager = generate(tiny_model, PROMPTS, 24, **settings)
        assert generate(tiny_model, PROMPTS, 24, compile=True, **settings) == eager
    assert generate(tiny_model, PROMPTS, 24, temperature=0, use_cache=False) == generate(
        tiny_model, PROMPTS, 24, temperature=0, compile=True
    )


def test_bf16_decoding_stays_within_bf16_rounding_of_the_fp32_reference():
    """bf16 (`for_decoding`): the compiled step decodes the bf16 eager step's greedy tokens, and its
    logits, fed the fp32 model's greedy tokens, stay within bf16's rounding (a few percent of the
    largest logit) of the fp32 eager step's at every step and slot."""
    reference, bf16 = make_model(), for_decoding(make_model(), "bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16 and bf16.training is False
    assert generate(bf16, PROMPTS, 24, temperature=0, compile=True) == generate(bf16, PROMPTS, 24, temperature=0)
    slots = list(range(len(PROMPTS)))
    with torch.inference_mode():
        exact, fast = Decoder(reference, len(PROMPTS)), Decoder(bf16, len(PROMPTS), compile=True)
        pairs = [(exact.prefill(s, p), fast.prefill(s, p)) for s, p in zip(slots, PROMPTS, strict=True)]
        tokens = [5, 6, 7]
        for _ in range(16):
            pairs.append((exact.step(slots, tokens), fast.step(slots, tokens)))
            tokens = pairs[-1][0].argmax(dim=-1).tolist()
    for fp32_logits, bf16_logits in pairs:
        assert bf16_logits.dtype == torch.bfloat16
        error = (bf16_logits.float() - fp32_logits).abs().max().item()
        assert 0 < error <= 0.04 * fp32_logits.abs().max().item()
    with pytest.raises(TissLMError, match="precision 'fp16': one of fp32, bf16"):
        for_decoding(make_model(), "fp16")
    assert set(PRECISIONS) == set(get_args(Precision))  # the params' names are the engine's


def count_forwards(model) -> list[int]:
    calls = [0]
    model.layers[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_speculative_decoding_gives_plain_greedy_tokens_in_fewer_forwards():
    model = make_model()
    repetitive = [[5, 6, 7, 8, 9] * 3, [40, 41, 42, 40, 41, 42, 40], [3]]
    plain = generate(model, repetitive, 40, temperature=0)
    calls = count_forwards(model)
    for lookahead in (1, 4, 8):
        calls[0] = 0
        assert generate(model, repetitive, 40, temperature=0, lookahead=lookahead) == plain
        assert calls[0] < 3 * 40  # one prefill per prompt, then fewer forwards than tokens: drafts were kept
    stop = plain[0][10]
    assert generate(model, repetitive, 40, temperature=0, lookahead=4, stop_tokens=[stop]) == generate(
        model, repetitive, 40, temperature=0, stop_tokens=[stop]
    )


def test_speculative_decoding_refuses_sampling(tiny_model):
    with pytest.raises(TissLMError, match="needs greedy decoding"):
        generate(tiny_model, PROMPTS, 5, temperature=1.0, lookahead=4)


@pytest.mark.parametrize(
    "tokens, count, draft",
    [
        ([1, 2, 3, 9, 1, 2, 3], 3, [9, 1, 2]),  # the trigram 1 2 3 occurred before: what followed it
        ([1, 2, 3, 4, 1, 2, 3, 5, 2, 3], 2, [5, 2]),  # the latest occurrence wins
        ([7, 8, 9], 4, []),  # nothing repeats
        ([4, 4], 5, [4]),  # the unigram; no more than the history holds
        ([1, 2, 1, 2], 0, []),
    ],
)
def test_prompt_lookup_drafts_what_followed_the_latest_match(tokens, count, draft):
    from tisslm.core.decode import draft_by_lookup

    assert draft_by_lookup(tokens, count) == draft


def test_the_compiled_step_is_a_cuda_graph_on_a_gpu_and_inductor_cpp_on_a_cpu():
    from tisslm.core.decode import compile_settings

    gpu, cpu = compile_settings("cuda"), compile_settings("cpu")
    assert gpu == {"fullgraph": True, "dynamic": False, "mode": "reduce-overhead"}  # CUDA graphs, one shape
    assert cpu == {"fullgraph": True, "dynamic": False, "options": {"cpp_wrapper": True}}


def test_a_compiled_step_runs_the_fewest_slots_that_hold_the_active_ones():
    from tisslm.core.decode import step_buckets

    assert step_buckets(1) == [1]
    assert step_buckets(8) == [1, 2, 4, 8]
    assert step_buckets(12) == [1, 2, 4, 8, 12]


def test_a_compiled_step_attends_over_the_shortest_length_bucket_past_every_position():
    from tisslm.core.decode import attended_length, length_buckets

    assert length_buckets(1024) == [128, 256, 512, 1024]
    assert length_buckets(300) == [128, 256, 300]  # max_len is always one
    assert length_buckets(64) == [64]
    assert length_buckets(64, shortest=16) == [16, 32, 64]
    assert attended_length(0, 1024) == 128
    assert attended_length(127, 1024) == 128  # keys 0..127: exactly the bucket
    assert attended_length(128, 1024) == 256  # one more: the next bucket
    assert attended_length(1023, 1024) == 1024  # the buffer's last position
    assert attended_length(1024, 1024) == 1024  # past the end (a free slot that keeps stepping): the whole buffer
    assert attended_length(250, 300) == 256 and attended_length(256, 300) == 300


def test_compiled_decoding_across_a_length_bucket_decodes_what_the_eager_step_decodes(monkeypatch):
    """fp32 greedy: prompts just under the 128-position bucket decode past it, so the compiled step runs
    at two attended lengths (two graphs) and still gives the eager reference's tokens."""
    from tisslm.core import decode

    lengths = []
    attended_length = decode.attended_length
    monkeypatch.setattr(decode, "attended_length", lambda *a: lengths.append(attended_length(*a)) or lengths[-1])
    model = make_model(max_seq_len=256)
    prompts = [[1 + (7 * i) % 96 for i in range(120)], [2 + (5 * i) % 95 for i in range(100)]]
    eager = generate(model, prompts, 20, temperature=0)
    assert generate(model, prompts, 20, temperature=0, compile=True) == eager
    assert sorted(set(lengths)) == [128, 256]


def test_a_free_slot_past_the_attended_length_leaves_the_active_one_exact():
    """As in the server: slot 1 steps alone (over the 128 bucket its length needs) while slot 0, free,
    sits at position 200, past it; slot 1 still decodes what it decodes alone."""
    model = make_model(max_seq_len=256)
    prompt = [3, 1, 4, 1, 5]
    with torch.inference_mode():
        decoder = Decoder(model, 2, compile=True)
        decoder.prefill(0, [7] * 200)
        tokens = [int(decoder.prefill(1, prompt).argmax())]
        for _ in range(7):
            tokens.append(int(decoder.step([1], tokens[-1:]).argmax()))
    assert decoder.cache.host_lengths == [207, 12]  # the free slot stepped too, past 128
    assert tokens == generate(model, [prompt], 8, temperature=0)[0]


def test_a_decoder_with_too_few_slots_is_refused(tiny_model):
    with pytest.raises(TissLMError, match="the decoder has 2 slots for 3 rows"):
        generate(tiny_model, PROMPTS, 4, temperature=0, decoder=Decoder(tiny_model, 2))
