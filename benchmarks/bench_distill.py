"""Distillation benchmark (`train.teacher`): writes benchmarks/results/distill.json.

On a project's own tokens (data/tokens and models/tokenizer, after `make run` or `dvc repro
tokenize`), through the trainer itself (`tisslm.train.trainer.train`, one process): a teacher of
a larger config trains for --teacher-steps (or --teacher DIR is taken as it is), then the same
small student trains twice for --steps, from the same init on the same batches, once on the data
alone and once also learning the teacher's distributions (train.distill_weight,
train.distill_temperature). Each is scored as the train stage scores a model: val bits/byte over
the whole val split. Reports the three, the distilled student's over the plain student's
bits/byte, and the seconds each took (training, and with the scoring). The defaults take a few
minutes on 2 CPU cores.

Usage: python benchmarks/bench_distill.py [--project .] [--steps 300] [--teacher-steps 300]
       [--teacher DIR] [--weight 0.5] [--temperature 1.0]
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from tisslm.core.config import Params, load_params
from tisslm.core.io import atomic_write_json
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import END_OF_TEXT, load_tokenizer
from tisslm.data.tokens import documents_in, load_split, read_meta
from tisslm.eval.evaluate import document_loglikelihoods, perplexity_metrics
from tisslm.train.trainer import Paths, train

RESULTS = Path(__file__).parent / "results" / "distill.json"
# params.yaml's model is the teacher; the student is a quarter of its width and a third of its depth.
STUDENT = "model.d_model=64 model.n_layers=2 model.n_heads=2 model.n_kv_heads=1 model.d_ff=192"
TEACHER = ""


def run_params(project: Path, overrides: str, steps: int, extra: list[str] = ()) -> Params:
    """params.yaml with `overrides`, trained for `steps` in this process, validated only at the end."""
    operational = [f"train.max_steps={steps}", f"train.eval_interval={steps}", f"train.checkpoint_interval={steps}",
                   "train.nproc=1", "train.mlflow=false"]  # fmt: skip
    return load_params(project / "params.yaml", [*shlex.split(overrides), *operational, *extra])


def trained(name: str, params: Params, project: Path, work: Path) -> dict:
    """Train a model into work/name; its val bits/byte (the train stage's), parameters, steps and seconds."""
    paths = Paths(project / "data" / "tokens", project / "models" / "tokenizer", work / name / "checkpoints",
                  work / name / "model")  # fmt: skip
    started = time.perf_counter()
    metrics = train(params, paths)
    seconds = time.perf_counter() - started
    model = TissLM.from_pretrained(paths.model)
    state = paths.checkpoints / f"step-{params.train.max_steps}" / "trainer_state.json"
    logged = [h for h in json.loads(state.read_text())["history"] if "train_distill_kl" in h]
    result = {
        "val_bits_per_byte": metrics["val_bits_per_byte"],
        "parameters": model.num_parameters(),
        "steps": params.train.max_steps,
        "train_seconds": metrics["train_seconds"],  # the steps (and the trainer's validations)
        "wall_seconds": seconds,  # with the final scoring of the val split
        "tokens_per_s": metrics["tokens_per_s"],
    }
    if logged:  # the KL to the teacher (at the temperature) at the first and the last log
        result |= {"train_distill_kl_first": logged[0]["train_distill_kl"],
                   "train_distill_kl_last": logged[-1]["train_distill_kl"]}  # fmt: skip
    return result


def scored(directory: Path, project: Path, seq_len: int, batch_size: int) -> dict:
    """A given teacher, scored as the train stage scores the model it trains."""
    model = TissLM.from_pretrained(directory).eval()
    tokens = project / "data" / "tokens"
    end = load_tokenizer(project / "models" / "tokenizer").token_to_id(END_OF_TEXT)
    documents = documents_in(load_split(tokens, "val"), end)
    with torch.no_grad():
        loglikelihoods = document_loglikelihoods(model, documents, end, seq_len, batch_size)
    val = perplexity_metrics(loglikelihoods, sum(map(len, documents)), read_meta(tokens)["val"]["bytes"])
    return {"val_bits_per_byte": val["bits_per_byte"], "parameters": model.num_parameters(), "steps": None,
            "train_seconds": None, "directory": str(directory)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."), help="a project with data/tokens, models/tokenizer")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each student")
    parser.add_argument("--teacher-steps", type=int, default=300, help="training steps of the teacher")
    parser.add_argument("--teacher", type=Path, help="a TissLM model dir sharing the tokenizer, not trained here")
    parser.add_argument("--student-config", default=STUDENT, help="params overrides of the student")
    parser.add_argument("--teacher-config", default=TEACHER, help="params overrides of the teacher it trains")
    parser.add_argument("--weight", type=float, default=0.5, help="train.distill_weight")
    parser.add_argument("--temperature", type=float, default=1.0, help="train.distill_temperature")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args()

    tokens = args.project / "data" / "tokens"
    if not (tokens / "meta.json").is_file() or not (args.project / "models" / "tokenizer").is_dir():
        sys.exit(f"{tokens}: no tokens; make them first: `dvc repro tokenize` (or `make run`) in {args.project}")
    student = run_params(args.project, args.student_config, args.steps)
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        work = Path(tmp)
        if args.teacher:
            teacher_dir = args.teacher
            teacher = scored(teacher_dir, args.project, student.train.seq_len, student.evaluate.batch_size)
        else:
            teacher_params = run_params(args.project, args.teacher_config, args.teacher_steps)
            teacher = trained("teacher", teacher_params, args.project, work)
            teacher_dir = work / "teacher" / "model"
        alone = trained("student", student, args.project, work)
        distill = [f"train.teacher={teacher_dir}", f"train.distill_weight={args.weight}",
                   f"train.distill_temperature={args.temperature}"]  # fmt: skip
        distilled = trained("distilled", run_params(args.project, args.student_config, args.steps, distill),
                            args.project, work)  # fmt: skip

    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "device": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__},
        "project_tokens": str(tokens),  # as given (data/tokens by default), not where this machine keeps it
        "student_config": args.student_config,
        "teacher_config": None if args.teacher else args.teacher_config,
        "distill_weight": args.weight,
        "distill_temperature": args.temperature,
        "teacher": teacher,
        "student": alone,
        "student_distilled": distilled,
        "distilled_over_plain_bits_per_byte": distilled["val_bits_per_byte"] / alone["val_bits_per_byte"],
    }  # fmt: skip
    print(f"\n{'model':18s} {'parameters':>11s} {'steps':>6s} {'val bits/byte':>14s} {'train s':>8s}")
    for name in ("teacher", "student", "student_distilled"):
        r = report[name]
        steps, seconds = r["steps"] or "-", "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        print(f"{name:18s} {r['parameters']:>11,} {steps:>6} {r['val_bits_per_byte']:>14.4f} {seconds:>8s}")
    print(f"distilled / plain student bits/byte: {report['distilled_over_plain_bits_per_byte']:.4f}")
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
