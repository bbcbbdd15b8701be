"""Training-loop benchmark: writes benchmarks/results/train.json.

For the default config of params.yaml (model and train sections): training tokens/s and MFU in
fp32 and bf16 autocast, with 1 process (all cores) and 2 DDP processes under torchrun (one core
each), and the same step for transformers' LlamaForCausalLM with identical config and weights,
measured side by side in this run. Usage: python benchmarks/bench_train.py [--steps N]
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

from tisslm.config import load_params
from tisslm.io import atomic_write_json
from tisslm.model import TissLM
from tisslm.perf import matmul_peak_flops
from tisslm.train.trainer import TrainingLoss, autocast, make_optimizer

RESULTS = Path(__file__).parent / "results" / "train.json"


def worker(steps: int, precision: str, out: Path) -> None:
    """One rank of a DDP job (or the only process): median seconds of a training step."""
    params = load_params(overrides=[f"train.precision={precision}"])
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
    data = torch.randint(0, params.model.vocab_size, (p.batch_size, p.seq_len + 1))
    times = []
    for i in range(steps + 2):  # two warm-up steps
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


def run_job(nproc: int, steps: int, precision: str) -> dict:
    out = RESULTS.parent / f".train_{nproc}_{precision}.json"
    command = [sys.executable, __file__, "--worker", "--steps", str(steps), "--precision", precision, "--out", str(out)]
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
    parser.add_argument("--precision", default="bf16", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.steps, args.precision, args.out)
        return

    params = load_params()
    flops = TissLM(params.model).flops_per_token(params.train.seq_len)
    peak = {"fp32": matmul_peak_flops(torch.float32), "bf16": matmul_peak_flops(torch.bfloat16)}
    report: dict = {"config": {"model": params.model.model_dump(), "batch_size": params.train.batch_size, "seq_len": params.train.seq_len},
                    "flops_per_token": flops, "matmul_peak_gflops": {k: v / 1e9 for k, v in peak.items()}}  # fmt: skip
    for precision in ("fp32", "bf16"):
        for nproc in (1, 2):
            print(f"{precision}, {nproc} process(es) ...", flush=True)
            result = run_job(nproc, args.steps, precision)
            result["mfu"] = result["tokens_per_s"] * flops / peak[precision]
            report[f"{precision}_{nproc}proc"] = result
        report[f"{precision}_2proc_vs_1proc"] = (
            report[f"{precision}_2proc"]["tokens_per_s"] / report[f"{precision}_1proc"]["tokens_per_s"]
        )
    print("against transformers ...", flush=True)
    peak_gflops = {"fp32": {"all": peak["fp32"] / 1e9}, "bf16": {"all": peak["bf16"] / 1e9}}
    report["vs_transformers"] = train_against_transformers(
        params.model.model_copy(update={"dropout": 0.0}),
        params.train.batch_size,
        params.train.seq_len,
        args.steps,
        peak_gflops,
    )
    report["goal_tisslm_ge_transformers"] = all(
        report["vs_transformers"][p]["speedup"] >= 1.0 for p in ("fp32", "bf16_autocast")
    )
    atomic_write_json(RESULTS, report)
    print(json.dumps({k: v for k, v in report.items() if k.endswith(("proc", "vs_1proc"))}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
