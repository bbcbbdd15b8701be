"""Model benchmarks, side by side in one run: writes benchmarks/results/model.json.

(a) decode tokens/s with and without the KV cache, batch 1 and 8;
(b) TissLM against transformers' LlamaForCausalLM with the same config and weights: greedy
    decode tokens/s, and training-step tokens/s in fp32 and bf16 autocast;
(c) model FLOPs utilisation of the training step against the matmul peak measured in this run;
(d) greedy decode tokens/s of one model through every decode engine, batch 1 and 8: TissLM's own
    eager and compiled (fp32, torchao int8), TissLM's engine on llama.cpp (F16, Q8_0 GGUF), and
    llama.cpp by itself (needs the `llama` extra: make test-slow installs it);
(e) prompt-lookup speculative decoding on val documents with the pipeline's model (models/model,
    from make run): tokens per forward, speed-up at batch 1, cost at batch 8.

Competing measurements alternate (ours, theirs, ours, ...) and report medians, so that a burst of
load on a shared machine hits both sides alike. Usage: python benchmarks/bench_model.py [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer

from tisslm.core.generate import generate
from tisslm.core.io import atomic_write_json
from tisslm.core.model import ModelConfig, TissLM
from tisslm.release.hf import to_hf
from tisslm.train.perf import PEAK_SHAPES, matmul_gflops

REPO = Path(__file__).parents[1]
RESULTS = REPO / "benchmarks" / "results" / "model.json"
# The reference shapes of ../shared/STACK_NOTES.md: the default model and a d_model=512 one.
SMALL = ModelConfig(vocab_size=8192, d_model=256, n_layers=6, n_heads=8, n_kv_heads=2, d_ff=704, max_seq_len=1024)
WIDE = ModelConfig(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_ff=1408, max_seq_len=1024)
# Ratios written beside each batch's tokens/s: how many times faster an engine decodes than a baseline.
SPEEDUPS = {  # ratio: (engine, baseline)
    "compiled_vs_llama_cpp_F16": ("tisslm_compiled", "llama_cpp_F16"),
    "bf16_compiled_vs_llama_cpp_F16": ("tisslm_bf16_compiled", "llama_cpp_F16"),
    "int8_weight_only_compiled_vs_llama_cpp_F16": ("tisslm_int8_weight_only_compiled", "llama_cpp_F16"),
    "bf16_vs_fp32_compiled": ("tisslm_bf16_compiled", "tisslm_compiled"),
    "int8_weight_only_vs_fp32_compiled": ("tisslm_int8_weight_only_compiled", "tisslm_compiled"),
    "llama_cpp_Q8_0_engine_vs_fp32_compiled": ("tisslm_on_llama_cpp_Q8_0", "tisslm_compiled"),
}


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each fn, run in turns so that noise falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(dtype: torch.dtype) -> dict[str, float]:
    """GFLOP/s of the shapes a small-LM training step is made of; the best is the peak."""
    return {"x".join(map(str, shape)): matmul_gflops(shape, dtype, repeats=5) for shape in PEAK_SHAPES}


def paired_models(config: ModelConfig) -> tuple[TissLM, torch.nn.Module]:
    torch.manual_seed(0)
    ours = TissLM(config).eval()
    return ours, to_hf(ours)


def decode_with_and_without_cache(model: TissLM, new_tokens: int, batches: list[int]) -> dict:
    out = {}
    for batch in batches:
        prompts = [[1 + (7 * i + j) % 200 for j in range(16)] for i in range(batch)]
        seconds = alternate(
            {
                cached: (
                    lambda cached=cached, prompts=prompts: generate(
                        model, prompts, new_tokens, temperature=0, use_cache=cached
                    )
                )
                for cached in (True, False)
            },
            repeats=1,
            warmup=0,
        )
        out[f"batch_{batch}"] = {
            "cache_tokens_per_s": batch * new_tokens / seconds[True],
            "no_cache_tokens_per_s": batch * new_tokens / seconds[False],
            "speedup": seconds[False] / seconds[True],
        }
    return out


def decode_against_transformers(ours: TissLM, theirs, new_tokens: int, batch: int, repeats: int) -> dict:
    prompts = [[1 + (7 * i + j) % 200 for j in range(16)] for i in range(batch)]
    input_ids = torch.tensor(prompts)

    def run_theirs():
        with torch.inference_mode():
            theirs.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=0)  # fmt: skip

    seconds = alternate(
        {"tisslm": lambda: generate(ours, prompts, new_tokens, temperature=0), "transformers": run_theirs}, repeats
    )
    tokens = batch * new_tokens
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "tisslm_tokens_per_s": tokens / seconds["tisslm"],
        "transformers_tokens_per_s": tokens / seconds["transformers"],
        "speedup": seconds["transformers"] / seconds["tisslm"],
    }


def runtime_models(config: ModelConfig, directory: Path) -> tuple[TissLM, Tokenizer, dict[str, Path]]:
    """A TissLM of `config` (its vocabulary a BPE trained on this project's sources) and its GGUF exports."""
    from tisslm.core.config import TokenizerParams
    from tisslm.core.tokenizer import train_bpe
    from tisslm.release.export import GGUF_TYPES, export_gguf

    sources = sorted((Path(__file__).parents[1] / "src").rglob("*.py"))
    tokenizer = train_bpe((p.read_text() for p in sources), TokenizerParams(vocab_size=config.vocab_size), False)
    torch.manual_seed(0)
    model = TissLM(config.model_copy(update={"vocab_size": tokenizer.get_vocab_size()})).eval()
    files = {t: export_gguf(model, tokenizer, directory / f"tisslm-{t}.gguf", t) for t in GGUF_TYPES}
    return model, tokenizer, files


def decode_engines(config: ModelConfig, new_tokens: int, repeats: int) -> dict:
    """Greedy decode tokens/s of one model through every engine, alternating, 16-token prompts, at
    batch 1 and 8: TissLM's engine eager and compiled (fp32, bf16, and the quantize stage's torchao int8
    weight-only, on bf16 activations where bf16 is native, and int8 dynamic through the same compiled
    step), TissLM's engine on llama.cpp (F16 and Q8_0 GGUF exports), and
    llama.cpp by itself: llama-cpp-python's `Llama.generate` at batch 1 (its own loop and sampler),
    and at batch 8 the llama.cpp engine's steps with a bare argmax (llama-cpp-python has no batched
    generate). All with this process's threads."""
    import tempfile

    import llama_cpp

    from tisslm.core.decode import for_decoding
    from tisslm.release.llamacpp import LlamaCppDecoder
    from tisslm.release.quantize import quantize_model

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        model, _, files = runtime_models(config, Path(tmp))
        int8 = {s: quantize_model(model, s) for s in ("int8_weight_only", "int8_dynamic_activation")}
        bf16 = for_decoding(copy.deepcopy(model), "bf16")
        out: dict = {"config": model.config.model_dump(), "threads": threads, "llama_cpp_python": llama_cpp.__version__}
        for batch in (1, 8):
            prompts = [[1 + (7 * i + j) % 200 for j in range(16)] for i in range(batch)]
            engines = {t: LlamaCppDecoder(path, batch, config.max_seq_len, threads) for t, path in files.items()}
            started = time.perf_counter()
            generate(model, prompts, 8, temperature=0, compile=True)
            compile_s = time.perf_counter() - started

            fns = {
                "tisslm_eager": lambda p=prompts: generate(model, p, new_tokens, temperature=0),
                "tisslm_compiled": lambda p=prompts: generate(model, p, new_tokens, temperature=0, compile=True),
                "tisslm_bf16_compiled": lambda p=prompts: generate(bf16, p, new_tokens, temperature=0, compile=True),
                **{
                    f"tisslm_{scheme}_compiled": lambda p=prompts, m=m: generate(m, p, new_tokens, temperature=0, compile=True)
                    for scheme, m in int8.items()
                },
                **{
                    f"tisslm_on_llama_cpp_{t}": lambda p=prompts, e=e: generate(model, p, new_tokens, temperature=0, decoder=e)
                    for t, e in engines.items()
                },
            }  # fmt: skip
            for tensor_type, path in files.items():
                if batch == 1:
                    llm = llama_cpp.Llama(str(path), n_ctx=new_tokens + 32, n_threads=threads,
                                          n_threads_batch=threads, verbose=False)  # fmt: skip
                    fns[f"llama_cpp_{tensor_type}"] = lambda llm=llm, p=prompts[0]: llama_decode(llm, p, new_tokens)
                else:
                    engine = engines[tensor_type]
                    fns[f"llama_cpp_{tensor_type}"] = lambda e=engine, p=prompts: bare_greedy(e, p, new_tokens)
            seconds = alternate(fns, repeats)
            row = {f"{name}_tokens_per_s": batch * new_tokens / s for name, s in seconds.items()}
            row["first_compiled_call_s"] = compile_s  # compiles the step for this batch size (cached on disk)
            row["best_tisslm_vs_llama_cpp_F16"] = seconds["llama_cpp_F16"] / min(
                s for name, s in seconds.items() if name.startswith("tisslm")
            )
            row |= {ratio: seconds[baseline] / seconds[engine] for ratio, (engine, baseline) in SPEEDUPS.items()}
            out[f"batch_{batch}"] = row
            for engine in engines.values():
                engine.close()
        return out


def bare_greedy(engine, prompts: list[list[int]], new_tokens: int) -> None:
    """llama.cpp's batched steps with an argmax and nothing else: llama.cpp's own cost at batch > 1."""
    rows = list(range(len(prompts)))
    logits = torch.cat([engine.prefill(row, p) for row, p in zip(rows, prompts, strict=True)])
    for _ in range(new_tokens - 1):
        logits = engine.step(rows, logits.argmax(dim=-1).tolist())


def llama_decode(llm, prompt: list[int], new_tokens: int) -> None:
    """Greedy tokens through llama.cpp; its generator never stops by itself, end of text included."""
    for generated, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), start=1):
        if generated == new_tokens:
            return


def speculative_decoding(model_dir: Path, clean_dir: Path, documents: int, new_tokens: int) -> dict:
    """Prompt-lookup speculative decoding on code completion of val documents with the pipeline's
    model: each document's first 64 tokens as the prompt, `new_tokens` greedy tokens, lookahead 0
    (plain) against 4 and 8, through TissLM's compiled engine and its llama.cpp engine (F16): tokens
    per decoding forward (prefill excluded), speed-up at batch 1, and at batch 8 the cost against plain
    batched decoding (speculation decodes one prompt at a time)."""
    from tisslm.core.config import load_params
    from tisslm.core.generate import decoder_for
    from tisslm.core.tokenizer import load_tokenizer
    from tisslm.data.tokens import read_split
    from tisslm.release.llamacpp import LlamaCppDecoder

    model, tokenizer = TissLM.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)
    val = read_split(clean_dir, load_params().tokenize.val_fraction)["val"]
    prompts = [ids[:64] for ids in (tokenizer.encode(text).ids for text in val) if len(ids) >= 64][:documents]
    out: dict = {
        "model": "/".join(model_dir.resolve().parts[-2:]),
        "documents": len(prompts),
        "prompt_tokens": 64,
        "new_tokens": new_tokens,
    }
    engines = {
        "tisslm_compiled": lambda slots: decoder_for(model, slots, compile=True),
        "llama_cpp_F16": lambda slots: LlamaCppDecoder.for_model(model, tokenizer, slots),
    }
    for name, make in engines.items():
        one, eight = make(1), make(8)
        forwards = [0]
        for method in ("step", "extend"):  # the decoding forwards; prefill is not one of them
            plain_method = getattr(one, method)
            setattr(one, method, lambda *a, f=plain_method, n=forwards: (n.__setitem__(0, n[0] + 1), f(*a))[1])
        row: dict = {}
        for lookahead in (0, 4, 8):

            def run(lookahead=lookahead, one=one):
                return [generate(model, [p], new_tokens, temperature=0, lookahead=lookahead, decoder=one)[0]
                        for p in prompts]  # fmt: skip

            run()  # warm-up (compiles)
            forwards[0] = 0
            started = time.perf_counter()
            tokens = run()
            seconds = time.perf_counter() - started
            generated = sum(len(t) for t in tokens)
            row[f"lookahead_{lookahead}"] = {
                "tokens_per_s": generated / seconds,
                "tokens_per_forward": generated / forwards[0],
                "identical_to_plain_greedy": tokens == row["lookahead_0"]["tokens"] if lookahead else True,
                # documents whose continuation equals plain greedy's, token for token
                "documents_identical": sum(
                    a == b
                    for a, b in zip(tokens, (row.get("lookahead_0") or {"tokens": tokens})["tokens"], strict=True)
                )
                / len(tokens),
                "tokens": tokens,
            }
        for lookahead in (4, 8):
            entry = row[f"lookahead_{lookahead}"]
            entry["speedup_batch_1"] = entry["tokens_per_s"] / row["lookahead_0"]["tokens_per_s"]
        for entry in row.values():
            del entry["tokens"]
        batched = prompts[:8]
        seconds = alternate(
            {
                "plain": lambda b=batched, e=eight: generate(model, b, new_tokens, temperature=0, decoder=e),
                "lookahead_4": lambda b=batched, o=one: generate(
                    model, b, new_tokens, temperature=0, lookahead=4, decoder=o
                ),
            },
            repeats=1,
        )
        row["batch_8_lookahead_4_speed_vs_plain_batched"] = seconds["plain"] / seconds["lookahead_4"]
        out[name] = row
    return out


def train_step_fn(model: torch.nn.Module, batch: torch.Tensor, bf16: bool, hf: bool) -> Callable[[], None]:
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=False)
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def step():
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:  # each model's own loss path: transformers' `labels`, TissLM's fused loss
            loss = (
                model(input_ids=inputs, labels=targets, shift_labels=targets).loss
                if hf
                else model.loss(inputs, targets)
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def train_against_transformers(config: ModelConfig, batch: int, seq_len: int, repeats: int, peak: dict) -> dict:
    ours, theirs = paired_models(config)
    data = torch.randint(0, config.vocab_size, (batch, seq_len + 1))
    tokens = batch * seq_len
    flops = ours.flops_per_token(seq_len)
    out = {"batch": batch, "seq_len": seq_len, "flops_per_token": flops}
    for precision, bf16 in (("fp32", False), ("bf16_autocast", True)):
        seconds = alternate(
            {
                "tisslm": train_step_fn(ours, data, bf16, hf=False),
                "transformers": train_step_fn(theirs, data, bf16, hf=True),
            },
            repeats,
        )
        peak_gflops = max(peak["bf16" if bf16 else "fp32"].values())
        ours_tps, theirs_tps = tokens / seconds["tisslm"], tokens / seconds["transformers"]
        out[precision] = {
            "tisslm_tokens_per_s": ours_tps,
            "transformers_tokens_per_s": theirs_tps,
            "speedup": ours_tps / theirs_tps,
            "tisslm_mfu": ours_tps * flops / (peak_gflops * 1e9),
            "transformers_mfu": theirs_tps * flops / (peak_gflops * 1e9),
            "peak_gflops": peak_gflops,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats, for a smoke run")
    parser.add_argument("--model", type=Path, default=REPO / "models" / "model", help="trained model (speculation)")
    parser.add_argument("--clean", type=Path, default=REPO / "data" / "clean", help="its clean shards (val split)")
    args = parser.parse_args()
    new_tokens, repeats = (64, 2) if args.quick else (512, 5)

    report: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "quick": args.quick,
    }
    print("measuring matmul peak ...", flush=True)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    report["matmul_peak_gflops"] = peak

    ours, theirs = paired_models(SMALL)
    print(f"decode with / without KV cache, {new_tokens} new tokens ...", flush=True)
    report["kv_cache_decode"] = {
        "config": SMALL.model_dump(),
        **decode_with_and_without_cache(ours, new_tokens, [1, 8]),
    }
    print("decode against transformers ...", flush=True)
    report["decode_vs_transformers"] = {
        f"batch_{b}": decode_against_transformers(ours, theirs, new_tokens, b, max(1, repeats // 2)) for b in (1, 8)
    }
    print("decode engines (TissLM eager, compiled, int8; on llama.cpp; llama.cpp itself) ...", flush=True)
    report["decode_engines"] = decode_engines(SMALL, new_tokens // 2, max(1, repeats // 2))
    if (args.model / "config.json").is_file():
        print(f"speculative decoding on val documents with {args.model} ...", flush=True)
        report["speculative_decoding"] = speculative_decoding(args.model, args.clean, 16 if args.quick else 32, 128)
    else:
        report["speculative_decoding"] = f"not measured: {args.model} has no model (make run makes one)"
    for name, config in (("d_model_256", SMALL), ("d_model_512", WIDE)):
        print(f"training step against transformers, {name} ...", flush=True)
        report[f"train_step_{name}"] = {
            "config": config.model_dump(),
            **train_against_transformers(config, 8, 256, repeats, peak),
        }

    decode, wide = report["decode_vs_transformers"], report["train_step_d_model_512"]
    engines = report["decode_engines"]
    report["goals"] = {
        "kv_cache_speedup_ge_5x": min(
            v["speedup"] for k, v in report["kv_cache_decode"].items() if k.startswith("batch")
        )
        >= 5,
        "decode_vs_transformers_ge_1_5x": min(v["speedup"] for v in decode.values()) >= 1.5,
        "train_vs_transformers_ge_1x": min(
            report[f"train_step_{n}"][p]["speedup"]
            for n in ("d_model_256", "d_model_512")
            for p in ("fp32", "bf16_autocast")
        )
        >= 1.0,
        "bf16_mfu_d_model_512_ge_40pct": wide["bf16_autocast"]["tisslm_mfu"] >= 0.40,
        "decode_batch_1_ge_1x_llama_cpp_F16": engines["batch_1"]["best_tisslm_vs_llama_cpp_F16"] >= 1.0,
        "decode_batch_8_ge_1_5x_llama_cpp_F16": engines["batch_8"]["best_tisslm_vs_llama_cpp_F16"] >= 1.5,
        "int8_weight_only_ge_1_3x_fp32": engines["batch_1"]["int8_weight_only_vs_fp32_compiled"] >= 1.3,
    }
    atomic_write_json(RESULTS, report)
    print(json.dumps(report["goals"], indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
