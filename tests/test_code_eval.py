"""The evaluate stage's coding checks (agent/code_eval.py): generation, scoring, the sandboxed programs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from tisslm.agent import code_eval
from tisslm.agent.code_eval import (
    code_of,
    continuations,
    doctest_program,
    has_doctests,
    humaneval,
    parses,
    run_checks,
    sft_heldout,
    truncate_at_stop,
)
from tisslm.core.chat import ChatTemplate
from tisslm.core.config import HumanEvalParams
from tisslm.core.tokenizer import byte_level_tokenizer
from tisslm.data.instructions import FunctionExample

FAST = HumanEvalParams(max_new_tokens=8, batch_size=4, timeout_s=5.0, memory_mb=1024)
DOUBLE = '''def double(x):
    """Twice x.

    >>> double(21)
    42
    >>> double('ab')
    'abab'
    """
    return 2 * x
'''


DOCSTRING = "Twice x.\n\n>>> double(21)\n42\n>>> double('ab')\n'abab'"


def example(solution: str = DOUBLE, imports: str = "", doctest: str | None = DOCSTRING, name: str = "double"):
    return FunctionExample("doc", name, f"Write a Python function `{name}(x)`: twice x.", solution, imports, doctest)


def test_truncate_at_stop_cuts_at_the_first_stop_sequence():
    body = "    return a + b\n"
    assert truncate_at_stop(body) == body
    assert truncate_at_stop(body + "\n\ndef other():\n    pass\n") == body + "\n"
    assert truncate_at_stop(body + "\n# a comment\nprint(1)\n") == body
    assert truncate_at_stop(body + "\nprint(add(1, 2))\n#") == body
    assert truncate_at_stop(body + "\nif __name__ == '__main__':\n    main()\n") == body
    assert truncate_at_stop("    # indented comments stay\n" + body) == "    # indented comments stay\n" + body


def test_code_of_takes_a_fenced_block_or_the_whole_answer():
    assert code_of("def f():\n    return 1\n") == "def f():\n    return 1\n"
    assert code_of("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert code_of("```\nx = 1\n") == "x = 1\n"  # an answer cut off inside its fence


def test_parses_needs_non_empty_python():
    assert parses("def f():\n    return 1\n")
    assert not parses("def f(:\n")
    assert not parses("   \n")
    assert not parses("x = (" * 10000)  # too deep for the parser: not code, not a crash


def test_has_doctests_ignores_skipped_and_missing_examples():
    assert has_doctests(">>> 1 + 1\n2")
    assert not has_doctests(None) and not has_doctests("No examples here.")
    assert not has_doctests(">>> token_bytes(16)  #doctest:+SKIP\nb'...'")


def test_a_doctest_program_passes_the_reference_and_fails_wrong_or_missing_answers(locked_workspace):
    wrong = DOUBLE.replace("2 * x", "x + x if isinstance(x, int) else x")
    renamed = DOUBLE.replace("def double", "def twice")
    outcomes = run_checks(
        [doctest_program(example(), code) for code in (DOUBLE, wrong, renamed, "def double(x):\n    return (\n")],
        locked_workspace,
        FAST,
        "test",
    )
    assert [o.status for o in outcomes] == ["passed", "failed", "failed", "error"]
    assert "1 of 2 doctest examples failed" in outcomes[1].detail


def test_imports_that_fail_do_not_sink_the_others(locked_workspace):
    uses_math = 'def root(x):\n    """Square root.\n\n    >>> root(9.0)\n    3.0\n    """\n    return math.sqrt(x)\n'
    imports = "from __future__ import annotations\nfrom . import sibling\nimport math\nfrom .x import (a,\n    b)"
    program = doctest_program(example(uses_math, imports, ">>> root(9.0)\n3.0", "root"), uses_math)
    assert program.startswith("from __future__ import annotations\n")
    assert run_checks([program], locked_workspace, FAST, "test")[0].passed


def test_humaneval_scores_exactly_what_the_sandbox_says(humaneval_problems, locked_workspace, monkeypatch):
    """Greedy: canonical for the first problem, wrong for the second; 3 samples of which 2, then 0, pass."""
    tasks = list(humaneval_problems.values())[:2]
    canonical, wrong = [t["canonical_solution"] for t in tasks], "    return None\n"

    def canned(model, tokenizer, prompts, params, temperature, stop_tokens, desc):
        if temperature == 0:
            return [canonical[0] + "\ndef unrelated():\n    pass\n", wrong]  # the stop sequence cuts the extra def
        return [canonical[0], canonical[0], wrong, wrong, wrong, wrong]  # problem 0's three, then problem 1's

    monkeypatch.setattr(code_eval, "continuations", canned)
    params = FAST.model_copy(update={"problems": 2, "samples": 3})
    summary, records = humaneval(
        make_model(vocab_size=257), byte_level_tokenizer(), humaneval_problems, params, locked_workspace
    )
    assert summary["problems"] == 2 and summary["samples"] == 3 and summary["executor"] == "bubblewrap"
    assert summary["pass@1"] == 0.5 and summary["greedy_outcomes"] == {"passed": 1, "failed": 1}
    assert summary["pass@1_sampled"] == pytest.approx((2 / 3 + 0) / 2)
    assert "pass@10" not in summary  # 3 samples say nothing about 10
    assert [r["task_id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
    assert [(r["status"], r["samples_passed"]) for r in records] == [("passed", 2), ("failed", 0)]
    assert "unrelated" not in records[0]["completion"]


def test_humaneval_with_a_real_model_runs_end_to_end_and_repeats_itself(humaneval_problems, locked_workspace):
    """A tiny random model: whatever it scores, the run is complete, in the sandbox, and deterministic."""
    model, tokenizer = make_model(vocab_size=257), byte_level_tokenizer()  # context 64: prompts keep their end
    params = FAST.model_copy(update={"problems": 3, "samples": 10})
    first = humaneval(model, tokenizer, humaneval_problems, params, locked_workspace)
    again = humaneval(model, tokenizer, humaneval_problems, params, locked_workspace)
    assert first[1] == again[1]  # the same completions and outcomes, sampled ones included
    summary = first[0]
    assert summary["problems"] == 3 and summary["prompts_truncated"] == 3
    assert {"pass@1", "pass@1_sampled", "pass@10"} <= set(summary) and "pass@100" not in summary
    assert all(0 <= summary[k] <= 1 for k in ("pass@1", "pass@1_sampled", "pass@10"))
    assert sum(summary["greedy_outcomes"].values()) == 3
    assert all(0 <= r["samples_passed"] <= 10 for r in first[1])


def test_continuations_are_seeded_and_batching_keeps_greedy_rows_alone():
    model, tokenizer = make_model(vocab_size=257), byte_level_tokenizer()
    prompts = [tokenizer.encode(text).ids for text in ("def ", "import os\n", "class A:\n", "x = ")]
    one_batch, pairs = FAST.model_copy(update={"batch_size": 4}), FAST.model_copy(update={"batch_size": 2})
    greedy = continuations(model, tokenizer, prompts, one_batch, 0.0, (), "test")
    assert greedy == continuations(model, tokenizer, prompts, pairs, 0.0, (), "test")
    sampled = continuations(model, tokenizer, prompts, one_batch, 0.8, (), "test")
    assert sampled == continuations(model, tokenizer, prompts, one_batch, 0.8, (), "test")
    reseeded = one_batch.model_copy(update={"seed": 1})
    assert sampled != continuations(model, tokenizer, prompts, reseeded, 0.8, (), "test")
    threads = torch.get_num_threads()
    continuations(model, tokenizer, prompts, one_batch.model_copy(update={"decode_threads": 2}), 0.0, (), "test")
    assert torch.get_num_threads() == threads  # decode_threads holds while decoding only


def test_a_context_too_short_for_max_new_tokens_is_a_clear_error():
    from tisslm.core.errors import TissLMError

    with pytest.raises(TissLMError, match=r"evaluate\.humaneval\.max_new_tokens=64"):
        continuations(make_model(vocab_size=257), byte_level_tokenizer(), [[1]], FAST.model_copy(update={"max_new_tokens": 64}),
                      0.0, (), "test")  # fmt: skip


def test_sft_heldout_scores_parses_and_doctests_of_the_answers(locked_workspace, monkeypatch):
    """Four examples: a right answer, a wrong one, an unparsable one, and one whose reference fails its
    own doctests (a missing import): scored for parsing, left out of the doctest figure."""
    broken = example(imports="import not_a_module_anywhere",
                     solution=DOUBLE.replace("return 2 * x", "return not_a_module_anywhere.double(x)"))  # fmt: skip
    undocumented = example(doctest=None)
    examples = [example(), example(), example(), broken, undocumented]
    answers = [f"```python\n{DOUBLE}```", DOUBLE.replace("2 * x", "3 * x"), "def double(x) return x", DOUBLE, DOUBLE]

    def canned(model, tokenizer, prompts, params, temperature, stop_tokens, desc):
        assert temperature == 0 and len(prompts) == len(examples)
        return answers

    monkeypatch.setattr(code_eval, "continuations", canned)
    model, tokenizer = make_model(vocab_size=257), byte_level_tokenizer()
    summary, records = sft_heldout(model, tokenizer, ChatTemplate(), examples, FAST, locked_workspace)
    assert summary["examples"] == 5 and summary["parse_rate"] == 4 / 5
    assert summary["doctest_examples"] == 3 and summary["doctest_references_failing"] == 1
    assert summary["doctest_pass@1"] == 1 / 3
    assert [r["doctest"] for r in records] == ["passed", "failed", "error", None, None]
    assert [r["parses"] for r in records] == [True, True, False, True, True]


def test_sft_heldout_asks_in_chat_form_and_stops_at_the_end_of_the_turn(locked_workspace, monkeypatch):
    seen = {}

    def canned(model, tokenizer, prompts, params, temperature, stop_tokens, desc):
        seen.update(prompts=prompts, stop=stop_tokens)
        return [DOUBLE]

    monkeypatch.setattr(code_eval, "continuations", canned)
    tokenizer, template = byte_level_tokenizer(), ChatTemplate()
    sft_heldout(make_model(vocab_size=257), tokenizer, template, [example()], FAST, locked_workspace)
    assert seen["prompts"] == [template.prompt_ids(tokenizer, example().messages[:1])]
    assert seen["stop"] == template.stop_token_ids(tokenizer)


def test_no_examples_is_no_figure(locked_workspace):
    summary, records = sft_heldout(
        make_model(vocab_size=257), byte_level_tokenizer(), ChatTemplate(), [], FAST, locked_workspace
    )
    assert records == [] and summary["parse_rate"] is None and summary["doctest_pass@1"] is None
