"""Matmul throughput, the denominator of model FLOPs utilisation, measured on the machine at hand."""

from __future__ import annotations

import time

import torch

# Shapes a small LM's training step is made of, and a large square one.
PEAK_SHAPES = ((2048, 512, 512), (2048, 512, 1408), (2048, 512, 8192), (2048, 2048, 2048))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(
    shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device | str = "cpu", repeats: int = 3
) -> float:
    """Best-of-`repeats` GFLOP/s of an (m, k) @ (k, n) matmul. Uses its own RNG: a training run's
    random stream (dropout, resumption) must not depend on whether this was measured."""
    device = torch.device(device)
    m, k, n = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(device, dtype)
    b = torch.randn(k, n, generator=generator).to(device, dtype)
    a @ b  # warm-up: allocations, kernel selection
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def matmul_peak_flops(dtype: torch.dtype, device: torch.device | str = "cpu") -> float:
    """FLOP/s of the fastest of PEAK_SHAPES: what "100% MFU" means on this machine."""
    return max(matmul_gflops(shape, dtype, device) for shape in PEAK_SHAPES) * 1e9
