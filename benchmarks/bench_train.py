"""Training-loop benchmark: writes benchmarks/results/train.json.

For the default config of params.yaml, at its global batch (train.batch_size sequences): training tokens/s and MFU in fp32 and bf16 autocast with 1 process (all cores)
against 2 DDP processes under torchrun (one core each, half the batch each), torch.compile
against eager, and the same step for transformers' LlamaForCausalLM with identical config and
weights, all measured in this run. Usage: python benchmarks/bench_train.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import train_against_transformers

from tisslm.core.config import load_params
from tisslm.core.io import atomic_write_json
from tisslm.core.model import TissLM
from tisslm.train.optim import make_optimizer
from tisslm.train.perf import measured_peak_flops
from tisslm.train.trainer import TrainingLoss, autocast

RESULTS = Path(__file__).parent / "results" / "train.json"


def worker(steps: int, batch: int, precision: str, compile_model: bool, out: Path) -> None:
    """One rank of a DDP job (or the only process): median seconds of a training step."""
    params = load_params(overrides=[f"train.precision={precision}", f"train.batch_size={batch}"])
    p = params.train
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.manual_seed(p.seed)
    model = TissLM(params.model)
    optimizer = make_optimizer(model, p)
    step_module = TrainingLoss(model)
    if world > 1:
        step_module = torch.nn.parallel.DistributedDataParallel(step_module)
    if compile_model:
        step_module = torch.compile(step_module)
    data = torch.randint(0, params.model.vocab_size, (p.batch_size, p.seq_len + 1))
    times = []
    for i in range(steps + 2):  # two warm-up steps (compilation happens in the first)
        start = time.perf_counter()
        with autocast(p, torch.device("cpu")):
            loss = step_module(data[:, :-1], data[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.barrier()
        if i >= 2:
            times.append(time.perf_counter() - start)
    if int(os.environ.get("RANK", "0")) == 0:
        tokens = p.batch_size * p.seq_len * world
        out.write_text(
            json.dumps(
                {
                    "processes": world,
                    "seconds_per_step": statistics.median(times),
                    "tokens_per_s": tokens / statistics.median(times),
                }
            )
        )
    if world > 1:
        dist.destroy_process_group()


def run_job(nproc: int, steps: int, global_batch: int, precision: str, compile_model: bool = False) -> dict:
    out = RESULTS.parent / f".train_{nproc}_{precision}.json"
    command = [sys.executable, __file__, "--worker", "--steps", str(steps), "--batch", str(global_batch // nproc)]
    command += ["--precision", precision, "--out", str(out)]
    command += ["--compile"] if compile_model else []
    if nproc > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            *command[1:],
        ]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // nproc))}
    subprocess.run(command, check=True, env=env, capture_output=True)
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.batch, args.precision, args.compile, args.out)
        return

    params = load_params()
    global_batch = params.train.batch_size
    flops = TissLM(params.model).flops_per_token(params.train.seq_len)
    peak = {"fp32": measured_peak_flops(torch.float32), "bf16": measured_peak_flops(torch.bfloat16)}
    report: dict = {
        "config": {"model": params.model.model_dump(), "global_batch": global_batch, "seq_len": params.train.seq_len},
        "flops_per_token": flops,
        "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
    }

    def measure(name: str, nproc: int, precision: str, compile_model: bool = False) -> None:
        print(f"{name} ...", flush=True)
        result = run_job(nproc, args.steps, global_batch, precision, compile_model)
        report[name] = result | {"mfu": result["tokens_per_s"] * flops / peak[precision]}

    for precision in ("fp32", "bf16"):
        measure(f"{precision}_1proc", 1, precision)
        measure(f"{precision}_2proc", 2, precision)
        report[f"{precision}_2proc_vs_1proc"] = (
            report[f"{precision}_2proc"]["tokens_per_s"] / report[f"{precision}_1proc"]["tokens_per_s"]
        )
    measure("bf16_1proc_compiled", 1, "bf16", compile_model=True)
    report["bf16_compiled_vs_eager_1proc"] = (
        report["bf16_1proc_compiled"]["tokens_per_s"] / report["bf16_1proc"]["tokens_per_s"]
    )
    print("against transformers ...", flush=True)
    peak_gflops = {"fp32": {"all": peak["fp32"] / 1e9}, "bf16": {"all": peak["bf16"] / 1e9}}
    model = params.model.model_copy(update={"dropout": 0.0})
    report["vs_transformers"] = train_against_transformers(
        model, global_batch, params.train.seq_len, args.steps, peak_gflops
    )
    report["goal_tisslm_ge_transformers"] = all(
        report["vs_transformers"][p]["speedup"] >= 1.0 for p in ("fp32", "bf16_autocast")
    )
    atomic_write_json(RESULTS, report)
    print(json.dumps({k: v for k, v in report.items() if "proc" in k}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
