"""The denominator of model FLOPs utilisation: the device's datasheet peak where it is known, and
a matmul measured on the machine at hand.

MFU is quoted against the datasheet's dense peak (PaLM, llm.c, nanochat, torchtitan all do), so
that figures compare across papers and machines. A measured peak answers a different question
(how close to what this card actually sustains), and on a CPU it is the only figure there is:
both are reported. The measurement must use shapes that fill the device: on an H200 the small
shapes a CPU is measured with reach 333 TFLOP/s, an 8192^3 product 791.
"""

from __future__ import annotations

import re
import time

import torch

# Shapes a small LM's training step is made of, and a large square one: what a CPU sustains.
PEAK_SHAPES = ((2048, 512, 512), (2048, 512, 1408), (2048, 512, 8192), (2048, 2048, 2048))
# A product large enough to fill a data-centre GPU's tensor cores (and keep them busy for ~1 ms).
GPU_PEAK_SHAPES = ((8192, 8192, 8192),)

# Dense (no structured sparsity) bf16/fp16 tensor-core peak in TFLOP/s, from the vendors' datasheets,
# matched against torch.cuda.get_device_name(). First match wins: the specific forms come first.
DATASHEET_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"GB200", 2500.0),
    (r"B200", 2250.0),
    (r"B100", 1750.0),
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H200|H100|H800|GH200", 989.0),  # SXM H100/H800, H200 (SXM and NVL share the H100 SXM's compute)
    (r"A100|A800", 312.0),
    (r"L40S", 362.0),
    (r"L4\b", 121.0),
    (r"A10\b", 125.0),
    (r"MI325X|MI300X", 1307.4),
    (r"MI300A", 980.6),
    (r"MI250X", 383.0),
    (r"MI250\b", 362.1),
    (r"MI210", 181.0),
)


def datasheet_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet's dense bf16/fp16 peak in FLOP/s for a GPU of this name, or None (unknown
    device, a CPU, or fp32, whose rate depends on whether TF32 is allowed)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    for pattern, tflops in DATASHEET_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops * 1e12
    return None


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
    a = torch.randn(m, k, generator=generator).to(device, dtype)  # random, never zeros: zeros run faster
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


def measured_peak_flops(dtype: torch.dtype, device: torch.device | str = "cpu") -> float:
    """FLOP/s of the fastest matmul of the shapes that fill this kind of device."""
    device = torch.device(device)
    shapes, repeats = (GPU_PEAK_SHAPES, 10) if device.type == "cuda" else (PEAK_SHAPES, 3)
    return max(matmul_gflops(shape, dtype, device, repeats) for shape in shapes) * 1e9


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_flops(dtype: torch.dtype, device: torch.device) -> dict:
    """One device's peaks: {"datasheet": FLOP/s or None, "measured": FLOP/s, "device": name}."""
    name = device_name(device)
    return {
        "device": name,
        "datasheet": datasheet_peak_flops(name, dtype),
        "measured": measured_peak_flops(dtype, device),
    }
