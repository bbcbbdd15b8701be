"""tisslm.train.muon.Muon against torch.optim.Muon: the same bits on CPU, the same checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from tisslm.train.muon import Muon, orthogonalize

# Three same-shape tall matrices (one stack), two wide, a square one, a tall one alone (a group of
# one) and two tiny wide ones.
SHAPES = [(48, 32)] * 3 + [(24, 80)] * 2 + [(40, 40), (96, 20), (6, 10), (6, 10)]
# Two layers of GPT-2 small (d_model 768): qkv, o_proj, gate_up, down.
GPT2_SHAPES = [(1280, 768), (768, 768), (4096, 768), (768, 2048)] * 2


def make_params(
    seed: int = 0, dtype: torch.dtype = torch.float32, shapes: list[tuple[int, int]] = SHAPES
) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in shapes]


def set_grads(param_sets: list[list[torch.nn.Parameter]], seed: int) -> None:
    """The same random gradients on each set of parameters."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(p.shape, generator=gen).to(p.dtype) for p in param_sets[0]]
    for params in param_sets:
        for p, g in zip(params, grads, strict=True):
            p.grad = g.clone()


def assert_same(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer) -> None:
    for p, q in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"], strict=True):
        assert torch.equal(p, q)
        assert torch.equal(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"])


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_bitwise_parity_with_torch(adjust_lr_fn: str, nesterov: bool) -> None:
    """Bitwise, not within a tolerance: each matrix of a stacked bf16 bmm/baddbmm gets the bits of
    torch's per-matrix mm/addmm (same oneDNN kernel, same layouts), and the norms are per matrix."""
    ours_p, theirs_p = make_params(), make_params()
    kwargs = dict(lr=0.02, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    ours, theirs = Muon(ours_p, **kwargs), torch.optim.Muon(theirs_p, **kwargs)
    for step in range(5):
        set_grads([ours_p, theirs_p], seed=100 + step)
        ours.step()
        theirs.step()
        assert_same(ours, theirs)
    assert not torch.equal(ours_p[0], make_params()[0])  # it did move


def test_bitwise_parity_at_gpt2_small_shapes() -> None:
    ours_p, theirs_p = make_params(shapes=GPT2_SHAPES), make_params(shapes=GPT2_SHAPES)
    kwargs = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    ours, theirs = Muon(ours_p, **kwargs), torch.optim.Muon(theirs_p, **kwargs)
    set_grads([ours_p, theirs_p], seed=0)
    ours.step()
    theirs.step()
    assert_same(ours, theirs)


@pytest.mark.parametrize("shape", [(3, 48, 32), (3, 24, 80), (2, 40, 40)])
def test_batched_newton_schulz_matches_per_matrix(shape: tuple[int, int, int]) -> None:
    """The GPU path (stacked bmm) against the CPU one (torch's 2-D ops, matrix by matrix): the same
    within bf16 rounding; bitwise on some CPUs, not on all (see `orthogonalize`)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    args = ((3.4445, -4.7750, 2.0315), 5, 1e-7)
    torch.testing.assert_close(orthogonalize(x, *args, batched=True), orthogonalize(x, *args, batched=False))


def test_bitwise_parity_bf16_params() -> None:
    """Nesterov on (the default): with it off, torch's Muon overwrites a bf16 momentum buffer with the
    normalised momentum (`.bfloat16()` of a bf16 tensor is the tensor itself, then `div_`), a bug that
    this Muon does not copy."""
    ours_p, theirs_p = make_params(dtype=torch.bfloat16), make_params(dtype=torch.bfloat16)
    ours, theirs = Muon(ours_p, lr=0.02), torch.optim.Muon(theirs_p, lr=0.02)
    for step in range(3):
        set_grads([ours_p, theirs_p], seed=step)
        ours.step()
        theirs.step()
        assert_same(ours, theirs)


@pytest.mark.parametrize("first", [Muon, torch.optim.Muon])
def test_state_dict_round_trip(first: type[torch.optim.Optimizer]) -> None:
    """A checkpoint written by either optimizer resumes in the other, bit for bit."""
    second = torch.optim.Muon if first is Muon else Muon
    kwargs = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    before_p = make_params()
    before = first(before_p, **kwargs)
    for step in range(2):
        set_grads([before_p], seed=step)
        before.step()
    saved = copy.deepcopy(before.state_dict())  # a copy, as a checkpoint is: state_dict() shares the live tensors

    after_p = [torch.nn.Parameter(p.detach().clone()) for p in before_p]
    after = second(after_p, lr=1.0)  # hyperparameters come from the checkpoint
    after.load_state_dict(saved)
    assert after.state_dict()["param_groups"] == saved["param_groups"]
    for step in range(2, 4):
        set_grads([before_p, after_p], seed=step)
        before.step()
        after.step()
    assert_same(after, before) if second is Muon else assert_same(before, after)


def test_lr_set_through_param_groups_takes_effect() -> None:
    """The trainer sets `param_groups[i]["lr"]` before each step."""
    ours_p, theirs_p = make_params(), make_params()
    ours, theirs = Muon(ours_p, lr=0.02), torch.optim.Muon(theirs_p, lr=0.02)
    for step, lr in enumerate([0.05, 0.01, 0.003]):
        for opt in (ours, theirs):
            opt.param_groups[0]["lr"] = lr
        set_grads([ours_p, theirs_p], seed=step)
        ours.step()
        theirs.step()
        assert_same(ours, theirs)

    ours.param_groups[0]["lr"] = 0.0  # no step at all, weight decay included
    before = [p.detach().clone() for p in ours_p]
    set_grads([ours_p], seed=9)
    ours.step()
    assert all(torch.equal(p, q) for p, q in zip(ours_p, before, strict=True))


@pytest.mark.parametrize("shape", [(8,), (2, 3, 4)])
def test_refuses_non_2d_params(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
        Muon([torch.nn.Parameter(torch.zeros(4, 4)), torch.nn.Parameter(torch.zeros(shape))])


def test_params_without_grad_are_skipped() -> None:
    params = make_params()
    opt = Muon(params, lr=0.02)
    set_grads([params], seed=0)
    params[1].grad = None
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1], before) and params[1] not in opt.state
