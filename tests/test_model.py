"""Numerical properties of the TissLM forward pass."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model

from tisslm.core.cache import KVCache
from tisslm.core.loss import linear_cross_entropy
from tisslm.core.model import ModelConfig, RMSNorm, apply_rope, one_query_attention, rope_tables
from tisslm.serve.attention import attention_maps


def reference_logits(model, idx: torch.Tensor) -> torch.Tensor:
    """The same network written out with explicit softmax attention and repeated K/V heads."""
    c = model.config
    B, T = idx.shape
    hd, group = c.head_dim, c.n_heads // c.n_kv_heads
    cos, sin = rope_tables(hd, T, c.rope_theta)

    def rms(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps)

    def rotate(x):  # x (B, H, T, hd), rotate-half convention written with explicit pairs
        half = hd // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat((a * cos[:, :half] - b * sin[:, :half], b * cos[:, half:] + a * sin[:, half:]), -1)

    x = model.tok_emb.weight[idx]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for layer in model.layers:
        h = rms(x, layer.attn_norm.weight)
        w_q, w_k, w_v = layer.attn.qkv.weight.split([c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd])
        q = (h @ w_q.T).view(B, T, c.n_heads, hd).transpose(1, 2)
        k = (h @ w_k.T).view(B, T, c.n_kv_heads, hd).transpose(1, 2).repeat_interleave(group, dim=1)
        v = (h @ w_v.T).view(B, T, c.n_kv_heads, hd).transpose(1, 2).repeat_interleave(group, dim=1)
        scores = rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(hd)
        attn = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + attn.transpose(1, 2).reshape(B, T, -1) @ layer.attn.o_proj.weight.T
        h = rms(x, layer.ffn_norm.weight)
        gate, up = (h @ layer.ffn.gate_up.weight.T).split(c.d_ff, dim=-1)
        x = x + (F.silu(gate) * up) @ layer.ffn.down.weight.T
    return rms(x, model.norm.weight) @ model.lm_head.weight.T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_forward_matches_explicit_reference(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads, dtype=torch.float64)
    idx = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(model(idx), reference_logits(model, idx), atol=1e-10, rtol=0)


def test_gqa_with_all_heads_equals_multi_head_attention():
    """A GQA model equals the MHA model whose K/V heads are its own repeated per group."""
    gqa = make_model(n_kv_heads=2)
    mha = make_model(n_kv_heads=4)
    c, hd = gqa.config, gqa.config.head_dim
    shared = {k: v for k, v in gqa.state_dict().items() if not k.endswith("qkv.weight")}
    mha.load_state_dict(shared, strict=False)
    with torch.no_grad():
        for g_layer, m_layer in zip(gqa.layers, mha.layers, strict=True):
            w_q, w_k, w_v = g_layer.attn.qkv.weight.split([c.n_heads * hd, c.n_kv_heads * hd, c.n_kv_heads * hd])
            repeat = c.n_heads // c.n_kv_heads
            w_k = w_k.view(c.n_kv_heads, hd, -1).repeat_interleave(repeat, dim=0).reshape(-1, c.d_model)
            w_v = w_v.view(c.n_kv_heads, hd, -1).repeat_interleave(repeat, dim=0).reshape(-1, c.d_model)
            m_layer.attn.qkv.weight.copy_(torch.cat((w_q, w_k, w_v)))
    idx = torch.randint(0, 97, (3, 17))
    torch.testing.assert_close(gqa(idx), mha(idx), atol=1e-5, rtol=0)


def test_causality():
    model = make_model()
    idx = torch.randint(0, 97, (3, 24))
    base = model(idx)
    for t in (5, 11, 22):
        changed = idx.clone()
        changed[:, t + 1 :] = torch.randint(0, 97, changed[:, t + 1 :].shape)
        out = model(changed)
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :])  # the future did change


@pytest.mark.parametrize("chunks", [[10, 1, 1, 1, 1, 1], [6, 3, 1, 4]], ids=["decode", "chunked-prefill"])
def test_cached_decoding_equals_full_forward(chunks):
    model = make_model()
    idx = torch.randint(0, 97, (2, sum(chunks)))
    full = model(idx)
    cache = KVCache.for_model(model.config, slots=2)
    start = 0
    for size in chunks:
        step = model(idx[:, start : start + size], cache=cache.rows([0, 1]))
        torch.testing.assert_close(step, full[:, start : start + size], atol=1e-5, rtol=0)
        start += size
    assert cache.lengths.tolist() == cache.host_lengths == [sum(chunks)] * 2


def test_static_step_equals_the_full_forward_of_every_slot():
    """The static step (every slot, the whole buffer under a mask) gives each slot the logits of its own
    sequence; a slot that went past the buffer's end writes nowhere that others read."""
    model = make_model()
    cache = KVCache.for_model(model.config, slots=3, max_len=20)
    sequences = [torch.randint(0, 97, (n,)).tolist() for n in (5, 12, 19)]
    for slot, sequence in enumerate(sequences):
        model(torch.tensor([sequence]), cache=cache.rows([slot]))
    for _ in range(2):
        new = torch.randint(0, 97, (3,))
        step = model(new[:, None], cache=cache.static())[:, -1]  # (3, vocab)
        for slot, token in enumerate(new.tolist()):
            sequences[slot].append(token)
            if len(sequences[slot]) <= 20:
                alone = model(torch.tensor([sequences[slot]]))[0, -1]
                torch.testing.assert_close(step[slot], alone, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [7, 14, 21]
    step = model(torch.tensor([[5], [6]]), cache=cache.static(2))[:, -1]  # the first two slots only
    assert step.shape == (2, model.config.vocab_size) and cache.lengths.tolist() == [8, 15, 21]
    sequences[0].append(5)
    torch.testing.assert_close(step[0], model(torch.tensor([sequences[0]]))[0, -1], atol=1e-5, rtol=0)


def test_static_step_over_a_length_bucket_equals_the_full_forward():
    """A static step over the first L positions only (L past every slot's position) gives each slot the
    logits of its own sequence, and the keys it writes in place serve later steps at another length."""
    model = make_model()
    cache = KVCache.for_model(model.config, slots=3, max_len=20)
    sequences = [torch.randint(0, 97, (n,)).tolist() for n in (5, 9, 12)]
    for slot, sequence in enumerate(sequences):
        model(torch.tensor([sequence]), cache=cache.rows([slot]))
    for length in (16, 14, 20):  # the furthest slot's new token at 12, 13 (L = 14: exactly keys 0..13), 14
        new = torch.randint(0, 97, (3,))
        step = model(new[:, None], cache=cache.static(3, length))[:, -1]  # (3, vocab)
        for slot, token in enumerate(new.tolist()):
            sequences[slot].append(token)
            alone = model(torch.tensor([sequences[slot]]))[0, -1]
            torch.testing.assert_close(step[slot], alone, atol=1e-5, rtol=0)
    assert cache.lengths.tolist() == [8, 12, 15]
    with pytest.raises(ValueError, match="attended length 21"):
        cache.static(3, 21)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_one_query_attention_equals_sdpa_under_a_mask(dtype, n_kv_heads):
    """The decode step's attention is SDPA's for one query per row: grouped heads, masked keys
    (a row that sees 3 of 9 keys ignores the rest, whatever they hold), in fp32 and bf16."""
    torch.manual_seed(0)
    B, H, S, D = 3, 4, 9, 16
    q = torch.randn(B, H, 1, D, dtype=dtype)
    k, v = torch.randn(B, n_kv_heads, S, D, dtype=dtype), torch.randn(B, n_kv_heads, S, D, dtype=dtype)
    lengths = torch.tensor([9, 3, 6])
    mask = (torch.arange(S)[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)
    ours = one_query_attention(q, k, v, mask)
    reference = F.scaled_dot_product_attention(
        q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=n_kv_heads != H
    )
    assert ours.shape == q.shape and ours.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours.double(), reference, atol=tolerance, rtol=tolerance)
    k[1, :, 3:] = 1e4  # keys the mask hides
    torch.testing.assert_close(one_query_attention(q, k, v, mask)[1], ours[1], rtol=0, atol=0)


def test_rope_scores_depend_only_on_relative_offset():
    head_dim = 16
    cos, sin = rope_tables(head_dim, 128, 10000.0)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    cos, sin = cos.double(), sin.double()

    def score(m, n):
        return (apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])).item()

    for m, n in [(3, 1), (10, 10), (7, 30)]:
        for shift in (1, 17, 60):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), abs=1e-5)  # float32 tables
    assert score(5, 1) != pytest.approx(score(5, 2), abs=1e-3)  # it does depend on the offset


def test_rmsnorm_and_rope_pass_gradcheck():
    norm = RMSNorm(8, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(norm, (x,))
    cos, sin = rope_tables(8, 5, 10000.0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, cos.double(), sin.double()), (x,))


def test_dropout_active_only_in_training():
    model = make_model(dropout=0.2)
    idx = torch.randint(0, 97, (2, 10))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_tied_embeddings_share_one_matrix():
    tied, untied = make_model(tie_embeddings=True), make_model(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert untied.lm_head.weight is not untied.tok_emb.weight
    assert untied.num_parameters() - tied.num_parameters() == 97 * 32


def test_scaled_init_shrinks_residual_projections():
    torch.manual_seed(0)
    from tisslm.core.model import TissLM

    model = TissLM(ModelConfig(vocab_size=512, d_model=128, n_layers=8, n_heads=4, n_kv_heads=4, d_ff=256))
    assert model.layers[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.layers[0].attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)


def test_training_step_reduces_loss():
    model = make_model().train()
    idx = torch.randint(0, 97, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 97), idx[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(d_model=30, n_heads=10, n_kv_heads=5), "head_dim=d_model/n_heads=3 must be even"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads=3 must divide n_heads=4"),
        (dict(d_model=30, n_heads=7), "n_heads=7 must divide d_model=30"),
    ],
)
def test_config_rejects_impossible_shapes(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**dict(vocab_size=10, d_ff=8), **bad})


def test_sequence_longer_than_context_is_refused(tiny_model):
    from tisslm.core.errors import TissLMError

    with pytest.raises(TissLMError, match="max_seq_len=64"):
        tiny_model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("tie", [True, False])
def test_fused_loss_equals_cross_entropy_of_logits(tie):
    """Same loss and same gradients as F.cross_entropy over materialised logits."""
    fused_model, plain_model = make_model(tie_embeddings=tie), make_model(tie_embeddings=tie)
    idx = torch.randint(0, 97, (3, 40))
    targets = torch.randint(0, 97, (3, 40))
    targets[0, :7] = -100  # ignored positions count neither in the sum nor the mean
    fused = fused_model.loss(idx, targets)
    plain = F.cross_entropy(plain_model(idx).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=0)
    fused.backward()
    plain.backward()
    for (name, a), b in zip(fused_model.named_parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # the no-grad path (evaluation) gives the same value
        hidden = fused_model.hidden_states(idx).flatten(0, 1)
        value = linear_cross_entropy(hidden, fused_model.lm_head.weight, targets.flatten(), chunk_rows=16)
    torch.testing.assert_close(value, plain.detach(), atol=1e-6, rtol=0)


def test_fused_loss_passes_gradcheck():
    hidden = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 12, -100, 5, 5, 7, 1, -100, 2])
    assert torch.autograd.gradcheck(lambda h, w: linear_cross_entropy(h, w, targets, chunk_rows=3), (hidden, weight))


def test_fused_loss_under_bf16_autocast_is_close_to_fp32():
    model = make_model()
    idx, targets = torch.randint(0, 97, (2, 30)), torch.randint(0, 97, (2, 30))
    reference = model.loss(idx, targets).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.loss(idx, targets)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(reference, rel=2e-2)
    low.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---- the slot cache of continuous batching, and explicit attention maps ----


def test_slot_cache_advances_each_slot_as_if_it_were_alone():
    """Sequences join free slots at different times and decode together in any selection and order;
    every row's logits equal the full forward of its own sequence."""
    model = make_model()
    torch.manual_seed(3)
    cache = KVCache.for_model(model.config, slots=4)
    sequences: dict[int, list[int]] = {}

    def run(slots: list[int], new: list[list[int]]) -> None:
        step = model(torch.tensor(new), cache=cache.rows(slots))  # (B, T, vocab)
        for row, slot in enumerate(slots):
            sequences[slot] = sequences.get(slot, []) + new[row]
            alone = model(torch.tensor([sequences[slot]]))[0, -len(new[row]) :]  # (T, vocab)
            torch.testing.assert_close(step[row], alone, atol=1e-5, rtol=0)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, 97, (n,)).tolist()

    run([2], [tokens(7)])  # prefill one slot
    run([2], [tokens(1)])
    run([0], [tokens(3)])  # another joins mid-decode
    for order in ([0, 2], [2, 0], [0, 2]):  # one step for both, either order
        run(order, [tokens(1) for _ in order])
    run([3], [tokens(11)])
    run([0, 2, 3], [tokens(1) for _ in range(3)])  # contiguous or not: slots 0, 2, 3
    run([3, 0], [tokens(2), tokens(2)])  # several new tokens per row, at different lengths
    cache.reset(2)  # slot 2's sequence leaves; a new one takes the slot over stale keys
    del sequences[2]
    run([2], [tokens(4)])
    run([2, 3, 0], [tokens(1) for _ in range(3)])
    assert cache.lengths.tolist() == [len(sequences[0]), 0, len(sequences[2]), len(sequences[3])]


def test_slot_cache_refuses_to_overflow():
    from tisslm.core.errors import TissLMError

    model = make_model()
    cache = KVCache.for_model(model.config, slots=2, max_len=8)
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache.rows([1]))
    with pytest.raises(TissLMError, match="KV cache holds 8 positions, 9 requested"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache.rows([0, 1]))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_attention_maps_are_causal_distributions_that_reproduce_sdpa(n_kv_heads):
    model = make_model(n_kv_heads=n_kv_heads)
    idx = torch.randint(0, 97, (2, 13))
    maps = attention_maps(model, idx)  # (n_layers, B, n_heads, T, T)
    c = model.config
    assert maps.shape == (c.n_layers, 2, c.n_heads, 13, 13)
    torch.testing.assert_close(maps.sum(-1), torch.ones(c.n_layers, 2, c.n_heads, 13), atol=1e-5, rtol=0)
    assert (maps.triu(diagonal=1) == 0).all() and (maps >= 0).all()

    # What SDPA hands to each layer's output projection must be these weights applied to the values.
    seen = {}
    hooks = [
        block.attn.o_proj.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(("out", i), args[0]))
        for i, block in enumerate(model.layers)
    ] + [
        block.attn.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(("in", i), args[0]))
        for i, block in enumerate(model.layers)
    ]
    with torch.no_grad():
        model(idx)
        for hook in hooks:
            hook.remove()
        for i, block in enumerate(model.layers):
            x = seen[("in", i)]  # (B, T, d_model), the normalised input of the attention
            _, _, v = block.attn.project(x, model.rope_cos[:13], model.rope_sin[:13])  # (B, n_kv_heads, T, head_dim)
            v = v.repeat_interleave(c.n_heads // n_kv_heads, dim=1)  # (B, n_heads, T, head_dim)
            mixed = (maps[i] @ v).transpose(1, 2).reshape(2, 13, -1)  # (B, T, n_heads * head_dim)
            torch.testing.assert_close(mixed, seen[("out", i)], atol=1e-5, rtol=0)
