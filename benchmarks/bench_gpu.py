"""GPU benchmark, one command, under 10 minutes on one H100/H200: writes benchmarks/results/gpu.json.

1. The device: its name, the datasheet's dense bf16 peak and an 8192^3 bf16 matmul measured here;
   and whether the trainer's compiled step computes eager's loss and gradients at GPT-2-small
   shapes (a compiled path that computes something else must not be timed as if it were right).
2. The train stage at the default params.yaml (train.nproc: auto, train.compile: auto), as
   `dvc repro` runs it, in a scratch copy of the project: val bits/byte, time, tokens/s, MFU.
3. GPT-2-small shapes (vocab 32768, d_model 768, 12 layers, 12 heads, 4 KV heads, d_ff 2048,
   16 x 1024 tokens a step, bf16 autocast): TissLM eager and compiled with AdamW and with Muon
   (the default), against transformers' LlamaForCausalLM (same weights, fused AdamW) eager and
   compiled. Tokens/s, MFU of the datasheet and of the measured peak, peak memory, and the first
   step's time, cold and (rerun with the same compile cache) warm. Each configuration runs in a
   process of its own, so that compile caches and memory figures do not leak between them.
4. Muon's optimizer step alone at those shapes: the trainer's batched Muon against torch.optim.Muon.
5. Decoding at GPT-2-small shapes in bf16, 16-token prompts and 256 new greedy tokens at batch 1, 8
   and 32: TissLM's decode engine eager and with its step compiled (CUDA graphs), tokens/s, the
   first compiled call's time, and how many tokens the two agree on.

Usage: python benchmarks/bench_gpu.py [--smoke]
(--smoke: tiny shapes on whatever device there is, to test this script without a GPU; it writes
gpu_smoke.json, so the GPU's figures in gpu.json stay.)
The results are written after each part, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tisslm.core.config import TrainParams  # noqa: E402
from tisslm.core.io import atomic_write_json  # noqa: E402
from tisslm.core.model import ModelConfig, TissLM  # noqa: E402
from tisslm.train.optim import make_optimizer  # noqa: E402
from tisslm.train.perf import datasheet_peak_flops, device_name, measured_peak_flops  # noqa: E402
from tisslm.train.trainer import TrainingLoss  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gpu.json"
SMOKE_RESULTS = ROOT / "benchmarks" / "results" / "gpu_smoke.json"  # ignored by git: never the GPU's figures
GPT2_SMALL = ModelConfig(
    vocab_size=32768, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048, max_seq_len=1024
)
SMOKE = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
# name -> (library, compiled, optimizer)
CONFIGS = {
    "tisslm_eager_adamw": ("tisslm", False, "adamw"),
    "tisslm_eager_muon": ("tisslm", False, "muon"),
    "tisslm_compiled_adamw": ("tisslm", True, "adamw"),
    "tisslm_compiled_muon": ("tisslm", True, "muon"),
    "transformers_eager_adamw": ("transformers", False, "adamw"),
    "transformers_compiled_adamw": ("transformers", True, "adamw"),
}


def python_path(*first: Path) -> str:
    """PYTHONPATH for a child process: the project first, then whatever this one was given."""
    return os.pathsep.join([*map(str, first), *filter(None, [os.environ.get("PYTHONPATH")])])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def shapes(smoke: bool) -> tuple[ModelConfig, int, int, int, int]:
    """(model config, batch, seq_len, warm-up steps, timed steps)."""
    return (SMOKE, 2, 64, 1, 2) if smoke else (GPT2_SMALL, 16, 1024, 5, 20)


def build(library: str, compiled: bool, optimizer_name: str, config: ModelConfig, device: torch.device):
    """A step function for one configuration: forward, backward, clip, update, as the trainer does."""
    torch.manual_seed(0)
    model = TissLM(config).to(device)
    train = TrainParams(optimizer=optimizer_name, lr=1e-4)
    if library == "tisslm":
        trainable = TrainingLoss(model, compile_model=compiled)
        loss_of = trainable
    else:
        from tisslm.release.hf import to_hf

        model = to_hf(model.cpu()).to(device)  # the same weights, in transformers' Llama
        forward = torch.compile(model) if compiled else model
        loss_of = lambda x, y: forward(input_ids=x, labels=y, shift_labels=y).loss  # noqa: E731
    optimizer = make_optimizer(model, train)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def worker(name: str, smoke: bool, out: Path) -> None:
    """One configuration in this process: first step (compile included), then timed steps."""
    library, compiled, optimizer_name = CONFIGS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config, batch, seq_len, warmup, timed = shapes(smoke)
    step = build(library, compiled, optimizer_name, config, device)
    data = torch.randint(0, config.vocab_size, (4, batch, seq_len + 1), device=device)  # random, never zeros
    batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step(*batches[0])
    sync(device)
    first_step = time.perf_counter() - start
    for i in range(warmup):
        step(*batches[i % 4])
    sync(device)
    seconds = []
    for i in range(timed):
        start = time.perf_counter()
        step(*batches[i % 4])
        sync(device)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    result = {
        "first_step_s": first_step,
        "step_s": median,
        "tokens_per_s": batch * seq_len / median,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    out.write_text(json.dumps(result))


def run_worker(name: str, smoke: bool, cache: Path, timeout: float) -> dict:
    """Run one configuration in a fresh process with `cache` as inductor's cache directory."""
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": python_path(ROOT / "src")}
        command = [sys.executable, __file__, "--worker", name, "--out", str(out)] + (["--smoke"] if smoke else [])
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if done.returncode:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
        return json.loads(out.read_text())


def gpt2_table(smoke: bool, peaks: dict, report: dict, save) -> None:
    config, batch, seq_len, _, _ = shapes(smoke)
    flops_per_token = _flops_per_token(config, seq_len)
    table: dict = {
        "config": config.model_dump(),
        "batch": batch,
        "seq_len": seq_len,
        "flops_per_token": flops_per_token,
    }
    report["gpt2_small"] = table
    with tempfile.TemporaryDirectory() as caches:
        for name in [*CONFIGS, "tisslm_compiled_muon_warm"]:
            cold = name.removesuffix("_warm")
            cache = Path(caches) / cold  # the warm run reuses its cold run's cache
            print(f"gpt2_small: {name} ...", flush=True)
            result = run_worker(cold, smoke, cache, timeout=240)
            if "tokens_per_s" in result:
                flops = result["tokens_per_s"] * flops_per_token
                result["mfu"] = flops / peaks["datasheet"] if peaks["datasheet"] else None
                result["mfu_measured_peak"] = flops / peaks["measured"]
            table[name] = result
            print(f"  {result}", flush=True)
            save()

    def ratio(a: str, b: str) -> float | None:
        x, y = table.get(a, {}).get("tokens_per_s"), table.get(b, {}).get("tokens_per_s")
        return x / y if x and y else None

    table["compiled_muon_vs_transformers_compiled"] = ratio("tisslm_compiled_muon", "transformers_compiled_adamw")
    table["compiled_adamw_vs_transformers_compiled"] = ratio("tisslm_compiled_adamw", "transformers_compiled_adamw")
    table["eager_adamw_vs_transformers_eager"] = ratio("tisslm_eager_adamw", "transformers_eager_adamw")
    muon = ratio("tisslm_compiled_muon", "tisslm_compiled_adamw")
    table["muon_cost_of_step_compiled"] = 1 - muon if muon else None
    save()


def _flops_per_token(config: ModelConfig, seq_len: int) -> float:
    with torch.device("meta"):  # no memory for 100M parameters just to count them
        return TissLM(config).flops_per_token(seq_len)


def compiled_gradients(smoke: bool, device: torch.device) -> dict:
    """Loss and gradients of one bf16 step, the trainer's compiled TrainingLoss against eager."""
    config, batch, seq_len, _, _ = shapes(smoke)
    torch.manual_seed(0)
    eager, compiled = TissLM(config).to(device), TissLM(config).to(device)
    compiled.load_state_dict(eager.state_dict())
    data = torch.randint(0, config.vocab_size, (batch, seq_len + 1), device=device)
    losses = {}
    for name, model in (("eager", eager), ("compiled", compiled)):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = TrainingLoss(model, compile_model=name == "compiled")(data[:, :-1], data[:, 1:])
        loss.backward()
        losses[name] = loss.item()
    differences = {
        name: ((a.grad - b.grad).norm() / a.grad.norm()).item()
        for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True)
    }
    worst = max(differences, key=differences.get)
    return {
        "loss_eager": losses["eager"],
        "loss_compiled": losses["compiled"],
        "max_relative_gradient_difference": differences[worst],
        "worst_parameter": worst,
        "match": differences[worst] < 0.05,  # bf16 rounding moves a gradient by ~1%, a broken graph by 100%
    }


def muon_step(smoke: bool, device: torch.device) -> dict:
    """The optimizer step alone over the blocks' matrices: ours (batched) against torch.optim.Muon."""
    from tisslm.train.muon import Muon

    config = shapes(smoke)[0]
    torch.manual_seed(0)
    model = TissLM(config).to(device)
    matrices = [q for name, q in model.named_parameters() if q.dim() == 2 and name.startswith("layers.")]
    for q in matrices:
        q.grad = torch.randn_like(q)
    out = {"matrices": len(matrices)}
    for name, cls in (("batched", Muon), ("torch", torch.optim.Muon)):
        optimizer = cls(matrices, lr=1e-4, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
        for _ in range(3):
            optimizer.step()
        sync(device)
        seconds = []
        for _ in range(10):
            start = time.perf_counter()
            optimizer.step()
            sync(device)
            seconds.append(time.perf_counter() - start)
        out[f"{name}_ms"] = 1000 * statistics.median(seconds)
    out["batched_speedup"] = out["torch_ms"] / out["batched_ms"]
    return out


def train_stage(smoke: bool, timeout: float, train_overrides: dict | None = None) -> dict:
    """`python -m stages.train` with dvc.yaml's arguments and the default params.yaml (MLflow off,
    and `train_overrides`), in a scratch directory holding links to the project's tokens and tokenizer."""
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"] |= {"mlflow": False, **(train_overrides or {})}
    if smoke:
        params["train"] |= {"max_steps": 4, "eval_interval": 2, "checkpoint_interval": 4, "log_interval": 2}
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        for dep in ("data/tokens", "models/tokenizer"):
            (work / dep).parent.mkdir(parents=True, exist_ok=True)
            (work / dep).symlink_to(ROOT / dep)
        env = {
            **os.environ,
            "PYTHONPATH": python_path(ROOT / "src", ROOT),
            "TORCHINDUCTOR_CACHE_DIR": str(work / "cache"),
        }
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, *stage["cmd"].split()[1:]],
                cwd=work,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - start
        if done.returncode:
            return {"error": "\n".join(done.stderr.strip().splitlines()[-5:])}
        metrics = json.loads((work / "metrics" / "train.json").read_text())
        history = [h for h in json.loads(
            (max((work / "models" / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:])) / "trainer_state.json").read_text()
        )["history"] if "tokens_per_s" in h]  # fmt: skip
    keys = ("val_bits_per_byte", "train_seconds", "tokens_per_s", "mfu", "mfu_measured_peak", "processes",
            "global_batch", "micro_batch", "device", "precision", "steps")  # fmt: skip
    return {"wall_s": wall, **{k: metrics.get(k) for k in keys},
            "first_log": history[0] if history else None, "last_log": history[-1] if history else None}  # fmt: skip


def decode(smoke: bool, device: torch.device) -> dict:
    """Greedy decode tokens/s through the decode engine, eager against compiled (CUDA graphs on a GPU)."""
    from tisslm.core.generate import generate

    config = SMOKE if smoke else GPT2_SMALL
    new_tokens = 16 if smoke else 256
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = TissLM(config).to(device=device, dtype=dtype).eval()
    out: dict = {"config": config.model_dump(), "dtype": str(dtype), "new_tokens": new_tokens}
    for batch in (1, 8, 32):
        prompts = [[1 + (7 * i + j) % 200 for j in range(16)] for i in range(batch)]
        row: dict = {}
        outputs = {}
        for compiled in (False, True):
            name = "compiled" if compiled else "eager"
            sync(device)
            started = time.perf_counter()
            generate(model, prompts, 4, temperature=0, compile=compiled)  # warm-up; compiles the step
            sync(device)
            row[f"{name}_first_call_s"] = time.perf_counter() - started
            seconds = []
            for _ in range(1 if smoke else 3):
                sync(device)
                started = time.perf_counter()
                outputs[name] = generate(model, prompts, new_tokens, temperature=0, compile=compiled)
                sync(device)
                seconds.append(time.perf_counter() - started)
            row[f"{name}_tokens_per_s"] = batch * new_tokens / statistics.median(seconds)
        row["compiled_speedup"] = row["compiled_tokens_per_s"] / row["eager_tokens_per_s"]
        pairs = [
            (a, b)
            for x, y in zip(outputs["eager"], outputs["compiled"], strict=True)
            for a, b in zip(x, y, strict=True)
        ]
        row["tokens_agreeing"] = sum(a == b for a, b in pairs) / len(pairs)  # bf16: near-ties may flip
        out[f"batch_{batch}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device: tests this script")
    parser.add_argument("--out", type=Path, help="where the JSON goes (default gpu.json; gpu_smoke.json with --smoke)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out = args.out or (SMOKE_RESULTS if args.smoke else RESULTS)
    if args.worker:
        worker(args.worker, args.smoke, args.out)
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report: dict = {"smoke": args.smoke, "torch": torch.__version__, "device": device_name(device)}

    def save() -> None:
        atomic_write_json(args.out, report)

    began = time.perf_counter()
    peaks = {
        "datasheet": datasheet_peak_flops(report["device"], torch.bfloat16),
        "measured": measured_peak_flops(torch.bfloat16, device),
    }
    report["bf16_peak_tflops"] = {k: v / 1e12 if v else None for k, v in peaks.items()}
    print(f"device {report['device']}: bf16 peak {report['bf16_peak_tflops']}", flush=True)
    save()

    def part(name: str, what: str, measure) -> None:
        """Run one part; one that fails is reported, and the rest still runs."""
        print(f"{what} ...", flush=True)
        try:
            report[name] = measure()
        except Exception as err:
            report[name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"  {report[name]}", flush=True)
        save()

    part("compiled_gradients", "compiled gradients against eager", lambda: compiled_gradients(args.smoke, device))
    part("train_stage", "train stage at the default params", lambda: train_stage(args.smoke, timeout=240))
    part("muon_step", "muon step", lambda: muon_step(args.smoke, device))
    part("decode", "decode engine, eager and compiled", lambda: decode(args.smoke, device))
    gpt2_table(args.smoke, peaks, report, save)
    report["seconds"] = time.perf_counter() - began
    save()
    print(json.dumps({k: v for k, v in report["gpt2_small"].items() if k != "config"}, indent=1))
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
