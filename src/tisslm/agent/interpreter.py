"""The TissLang engine: executes a checked script, statement by statement.

State is the variables and LAST_RUN (the result of the latest RUN). Variables given from outside
(`--var`) are fixed for the run: a VAR of the same name is skipped, as make's command-line
variables override a makefile's (`check` warns about it). A RUN that exits non-zero is data, not
an error: ASSERT and IF look at it. What *is* an error — a failed ASSERT, a refused READ/WRITE, a
RUN that cannot start or times out, a model that cannot answer, an exhausted budget — raises
`ScriptFailure`, which a TRY sends to its CATCH (with LAST_ERROR set) and which otherwise halts
the run with a report pointing at `FILE:LINE:COL`; a failed ASSERT's report shows its condition
with the strings interpolated and the values it compared. A reviewer's "no" is the one failure a
CATCH cannot swallow: a human stopping the agent must stop it.

Strings interpolate `{{name}}`, `{{LAST_RUN.FIELD}}` and `{{LAST_PROMPT.FIELD}}`. While the model
answers, `progress` (progress.py) shows it on stderr; stdout stays the run's transcript.

Values interpolated into a RUN command are shell-quoted (`shlex.quote`), so a variable holding a
file's content or a model's answer is always one inert word, never shell syntax.

RETRIEVE asks the knowledge base (`--kb DIR`, `tisslm.kb`) and stores its chunks as text, each
under `# path:start-end name`, the most relevant last, ready to be interpolated into a prompt.

LAST_PROMPT is the latest PROMPT_AGENT's answer, as LAST_RUN is the latest RUN's result: its
MEAN_ENTROPY and MAX_ENTROPY (nats, of the model's distribution at each token of the answer) say
how unsure the model was, so that a script can check an answer before it trusts it; the audit
log records both with each model call and PROMPT_AGENT.
"""

from __future__ import annotations

import inspect
import re
import shlex
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from tisslm.agent import ast
from tisslm.agent.adapter import MAX_TOKENS, AdapterError, Completion, LocalModel, OpenAICompatible
from tisslm.agent.audit import AuditLog, sha256
from tisslm.agent.checks import FIELDS, INTERPOLATION, parse_duration
from tisslm.agent.parser import Diagnostic, format_expr
from tisslm.agent.progress import ModelProgress
from tisslm.agent.review import Decision, Reviewer, ReviewError
from tisslm.agent.sandbox import Limits, RunResult, Sandbox, SandboxError, sandbox_description
from tisslm.agent.workspace import Workspace, WorkspaceRefusal
from tisslm.core.errors import TissLMError

if TYPE_CHECKING:
    from tisslm.kb import Hit, KnowledgeBase
    from tisslm.safety.filters import ContentFilter

Value = str | int | float | bool
RUN_TIMEOUT_S = 3600.0
DEFAULT_LIMITS = Limits()
DEFAULT_TOP = 5  # chunks a RETRIEVE without TOP fetches


class ScriptFailure(TissLMError):
    """A statement failed; a TRY around it catches this. Exit status 1 when it halts the run."""

    exit_code = 1

    def __init__(self, span: ast.Span, kind: str, message: str):
        self.span, self.kind, self.detail = span, kind, message
        super().__init__(f"{kind}: {message}")

    def report(self, filename: str, source: str) -> str:
        return Diagnostic(self.span.line, self.span.column, str(self)).render(filename, source)


class ReviewDenied(ScriptFailure):
    """A reviewer said no (or --deny-all did): not caught by TRY."""


@dataclass
class Budget:
    """Limits set by SET_BUDGET (None: unlimited) and what the run has used so far."""

    deadline: float  # time.monotonic() by which the run must end
    api_calls: int | None = None
    token_count: int | None = None
    calls_used: int = 0
    tokens_used: int = 0


@dataclass
class Outcome:
    variables: dict[str, Value]
    last_run: RunResult | None
    runs: int = 0
    estimates: list[dict] = field(default_factory=list)


def _text(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _number(value: Value) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    try:
        return float(value.strip())
    except ValueError:
        return None


def retrieved_text(hits: list[Hit]) -> str:
    """Chunks as RETRIEVE stores them: best first in, most relevant last out, each under its header
    `# path:start-end name` (as `tisslm.kb.context` puts them before a prompt), a blank line between."""
    from tisslm.kb.context import header  # the knowledge base loads only for scripts that retrieve

    blocks = []
    for hit in reversed(hits):
        body = hit.text.rstrip("\n")
        blocks.append(f"{header(hit)}{body}\n")
    return "\n".join(blocks)


def _entropy(reply: Completion) -> dict[str, float]:
    """An answer's entropies as the audit log records them."""
    return {"mean_entropy": round(reply.mean_entropy, 6), "max_entropy": round(reply.max_entropy, 6)}


def _reports_tokens(adapter) -> bool:
    """Whether the adapter's `complete` takes `on_tokens` (the local model does; a server cannot)."""
    try:
        return "on_tokens" in inspect.signature(adapter.complete).parameters
    except (TypeError, ValueError):
        return False


EXCERPT_CHARS = 400  # a compared value longer than this is shown as its start and its end


def _excerpt(value: Value) -> str:
    """A value for a failure message: numbers as they are, text quoted, long text cut in the middle
    (the end of a command's output, where test runners put their summary, is kept longest)."""
    if isinstance(value, bool | int | float):
        return _text(value)
    if len(value) <= EXCERPT_CHARS:
        return repr(value)
    head, tail = value[: EXCERPT_CHARS // 4], value[-(EXCERPT_CHARS * 3 // 4) :]
    return f"{head!r} ... [{len(value) - len(head) - len(tail)} characters] ... {tail!r}"


def _operands(node: ast.Expr) -> list[ast.Expr]:
    """The variables and LAST_RUN / LAST_PROMPT fields an expression reads, in order."""
    match node:
        case ast.VarRef() | ast.LastRun() | ast.LastPrompt():
            return [node]
        case ast.Binary(left=left, right=right):
            return _operands(left) + _operands(right)
        case ast.Not(operand=operand) | ast.IsEmpty(operand=operand):
            return _operands(operand)
    return []


def _truthy(value: Value) -> bool:
    if isinstance(value, str):
        return value != ""
    return bool(value)


COMPARISONS: dict[str, Callable] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


class Engine:
    def __init__(
        self,
        script: ast.Script,
        workspace: Workspace,
        sandbox: Sandbox,
        *,
        limits: Limits = DEFAULT_LIMITS,
        adapter: LocalModel | OpenAICompatible | None = None,
        reviewer: Reviewer | None = None,
        kb: KnowledgeBase | None = None,
        audit: AuditLog | None = None,
        variables: dict[str, Value] | None = None,
        run_timeout_s: float = RUN_TIMEOUT_S,
        content_filter: ContentFilter | None = None,
        seed: int = 0,
        say: Callable[[str], None] = print,
        progress: ModelProgress | None = None,
    ):
        self.script, self.workspace, self.sandbox = script, workspace, sandbox
        self.limits, self.adapter, self.audit, self.seed, self.say = limits, adapter, audit, seed, say
        self.content_filter = content_filter
        self.progress = progress or ModelProgress()  # on stderr while the model answers: stdout is the transcript
        self.reviewer = reviewer or Reviewer()
        self.kb = kb
        self.variables: dict[str, Value] = dict(variables or {})
        # `variables` are those given from outside (--var): they win over the script's own VAR.
        self.fixed = frozenset(self.variables)
        self.directives: dict[str, str] = {}
        self.last_run: RunResult | None = None
        self.last_prompt: Completion | None = None  # the latest PROMPT_AGENT's answer
        self.written: list[str] = []  # paths WRITE has written, shown to a REQUEST_REVIEW
        self.run_timeout_s = run_timeout_s
        self.outcome = Outcome(self.variables, None)

    # ---- entry point -----------------------------------------------------------------------------

    def run(self) -> Outcome:
        self.started = time.monotonic()
        self.budget = Budget(deadline=self.started + self.run_timeout_s)
        self._record("start", sandbox=sandbox_description(self.sandbox, self.limits))
        try:
            self.block(self.script.body)
        except ScriptFailure as failure:
            self._record("end", status="failed", kind=failure.kind, error=str(failure), span=self._at(failure.span))
            raise
        self._record("end", status="ok", runs=self.outcome.runs, duration=round(time.monotonic() - self.started, 3))
        self.outcome.last_run = self.last_run
        return self.outcome

    # ---- helpers ---------------------------------------------------------------------------------

    def _at(self, span: ast.Span) -> list[int]:
        return [span.line, span.column]

    def _record(self, event: str, **fields) -> None:
        if self.audit:
            self.audit.record(event, **fields)

    def interpolate(self, text: str, span: ast.Span, shell: bool = False) -> str:
        """`text` with each `{{name}}`, `{{LAST_RUN.FIELD}}` and `{{LAST_PROMPT.FIELD}}` replaced by its
        value (shell-quoted for RUN); any other `{{...}}` stays as it is (`check` warns about it)."""

        def value(found: re.Match) -> str:
            name = found["name"]
            if name in FIELDS:  # {{LAST_RUN}} without a field: not a placeholder
                return found.group()
            if name is not None:
                if name not in self.variables:
                    raise ScriptFailure(span, "undefined variable", f"{name!r} has no value here")
                text = _text(self.variables[name])
            else:
                text = _text(self._field(found["object"], found["field"], span))
            return shlex.quote(text) if shell else text

        return INTERPOLATION.sub(value, text)

    def _field(self, of: str, name: str, span: ast.Span) -> Value:
        """LAST_RUN.name or LAST_PROMPT.name; a failure before the first RUN / PROMPT_AGENT."""
        if of == "LAST_RUN":
            run = self.last_run
            if run is None:
                raise ScriptFailure(span, "no command yet", f"LAST_RUN.{name} before any RUN")
            return {"EXIT_CODE": run.exit_code, "STDOUT": run.stdout, "STDERR": run.stderr,
                    "DURATION": run.duration, "TIMED_OUT": run.timed_out}[name]  # fmt: skip
        reply = self.last_prompt
        if reply is None:
            raise ScriptFailure(span, "no prompt yet", f"LAST_PROMPT.{name} before any PROMPT_AGENT")
        return {"MEAN_ENTROPY": reply.mean_entropy, "MAX_ENTROPY": reply.max_entropy}[name]

    def _left_s(self, span: ast.Span) -> float:
        left = self.budget.deadline - time.monotonic()
        if left <= 0:
            raise ScriptFailure(span, "budget exhausted", "EXECUTION_TIME is used up")
        return left

    # ---- statements ------------------------------------------------------------------------------

    def block(self, body: tuple) -> None:
        for node in body:
            self._left_s(node.span)
            self.statement(node)

    def statement(self, node: ast.Stmt) -> None:
        """Run one statement. A handler returns the details for its audit line, or None when it wrote
        its own (blocks log themselves before their body runs, so the log stays in order)."""
        handler = getattr(self, f"do_{type(node).__name__.lower()}")
        try:
            details = handler(node)
        except ReviewError as err:  # nobody could answer: as final as a "no"
            raise ReviewDenied(node.span, "denied", str(err)) from None
        except (WorkspaceRefusal, SandboxError, AdapterError) as err:
            kind = "refused" if isinstance(err, WorkspaceRefusal) else "failed"
            raise ScriptFailure(node.span, kind, str(err)) from None
        if details is not None:
            self._record("node", type=type(node).__name__, span=self._at(node.span), **details)

    def do_task(self, node: ast.Task):
        self.say(f"== TASK {node.title}")
        self._record("node", type="Task", span=self._at(node.span), title=node.title)
        if node.body is not None:
            self.block(node.body)

    def do_setup(self, node: ast.Setup):
        self.say(f"-- SETUP {node.title or ''}".rstrip())
        self._record("node", type="Setup", span=self._at(node.span), title=node.title)
        self.block(node.body)

    def do_step(self, node: ast.Step):
        self.say(f"-- STEP {node.title}")
        self._record("node", type="Step", span=self._at(node.span), title=node.title)
        self.block(node.body)

    def do_if(self, node: ast.If):
        taken = _truthy(self.evaluate(node.condition))
        self._record("node", type="If", span=self._at(node.span), condition=format_expr(node.condition), taken=taken)
        self.block(node.then if taken else node.orelse or ())

    def do_try(self, node: ast.Try):
        self._record("node", type="Try", span=self._at(node.span))
        try:
            self.block(node.body)
        except ReviewDenied:
            raise
        except ScriptFailure as failure:
            self.say(f"caught: {failure}")
            self._record("caught", span=self._at(failure.span), kind=failure.kind, error=str(failure))
            self.variables["LAST_ERROR"] = str(failure)
            self.block(node.catch)

    def do_parallel(self, node: ast.Parallel):
        commands = [self.interpolate(run.command, run.span, shell=True) for run in node.body]
        left = self._left_s(node.span)
        limits = replace(self.limits, timeout_s=min(self.limits.timeout_s, left))
        with ThreadPoolExecutor(max_workers=len(commands) or 1) as pool:
            results = list(pool.map(lambda command: self.sandbox.run(command, limits), commands))
        failures = [self._finish_run(run, result, left) for run, result in zip(node.body, results, strict=True)]
        failed = [r for r in results if r.exit_code != 0]
        self.last_run = failed[0] if failed else (results[-1] if results else self.last_run)
        if problems := [f for f in failures if f is not None]:
            raise problems[0]
        return {"commands": len(results), "failed": len(failed)}

    def do_choose(self, node: ast.Choose):
        labels = [option.label for option in node.options]
        question = "pick one: " + ", ".join(labels)
        if self.reviewer.can_answer:
            decision = self.reviewer.choose(question, labels)
        elif self.adapter is not None:
            decision = self._model_choice(labels)
        else:
            raise ReviewError("CHOOSE needs a reviewer or a model: run in a terminal, pass --approve-all, or a model")
        self._approval(node, "CHOOSE", question, decision)
        if not decision.approved or decision.choice is None:
            raise ReviewDenied(node.span, "denied", f"no option of CHOOSE was accepted ({decision.by})")
        chosen = node.options[decision.choice]
        self.say(f"-- OPTION {chosen.label} (chosen by {decision.by})")
        self.block(chosen.body)

    def _model_choice(self, labels: list[str]) -> Decision:
        listing = "\n".join(f"{i}. {label}" for i, label in enumerate(labels, 1))
        answer = self._complete(f"Choose one option by its number.\n{listing}\nAnswer: ", 8).text
        found = re.search(r"\d+", answer)
        number = int(found.group()) if found else 0
        if 1 <= number <= len(labels):
            return Decision(True, f"model:{self.adapter.name}", number - 1, answer)
        return Decision(False, f"model:{self.adapter.name}", answer=answer)

    def do_estimatecost(self, node: ast.EstimateCost):
        runs = writes = prompts = tokens = 0
        for child in ast.walk(node):
            match child:
                case ast.Run():
                    runs += 1
                case ast.Write():
                    writes += 1
                case ast.PromptAgent(prompt=prompt):
                    prompts += 1
                    tokens += len(prompt) // 4 + 1 + MAX_TOKENS  # ~4 characters a token, plus the answer
        estimate = {"commands": runs, "writes": writes, "model_calls": prompts, "tokens": tokens}
        self.outcome.estimates.append(estimate)
        self.say(f"estimate: {runs} commands, {writes} file writes, {prompts} model calls, ~{tokens} tokens")
        return estimate

    def do_run(self, node: ast.Run):
        command = self.interpolate(node.command, node.span, shell=True)
        left = self._left_s(node.span)
        self.say(f"$ {command}")
        result = self.sandbox.run(command, replace(self.limits, timeout_s=min(self.limits.timeout_s, left)))
        self.last_run = result
        if failure := self._finish_run(node, result, left):
            raise failure

    def _finish_run(self, node: ast.Run, result: RunResult, left: float) -> ScriptFailure | None:
        """Show and log a finished command; the failure to raise if it timed out."""
        self.outcome.runs += 1
        for stream in (result.stdout, result.stderr):
            if stream:
                self.say(stream.rstrip("\n"))
        self.say(f"[exit {result.exit_code}, {result.duration:.2f} s{', truncated' if result.truncated else ''}]")
        details = {
            "command": result.command,
            "sandbox": self.sandbox.profile,
            "exit_code": result.exit_code,
            "duration": round(result.duration, 4),
            "timed_out": result.timed_out,
            "truncated": result.truncated,
            "stdout_sha256": sha256(result.stdout),
            "stderr_sha256": sha256(result.stderr),
        }
        self._record("node", type="Run", span=self._at(node.span), **details)
        if not result.timed_out:
            return None
        if left <= self.limits.timeout_s:  # the run's budget, not the command's limit, cut it short
            return ScriptFailure(node.span, "budget exhausted", f"EXECUTION_TIME ran out during {result.command!r}")
        return ScriptFailure(
            node.span, "timeout", f"{result.command!r} ran past {self.limits.timeout_s:g} s and was killed"
        )

    def do_write(self, node: ast.Write):
        path = self.interpolate(node.path, node.span)
        content = self.interpolate(node.content, node.span) if node.interpolate else node.content
        self.workspace.write(path, content)
        self.written.append(path)
        self.say(f"wrote {path} ({len(content.encode())} bytes)")
        return {"path": path, "bytes": len(content.encode()), "sha256": sha256(content), "language": node.delimiter}

    def do_read(self, node: ast.Read):
        path = self.interpolate(node.path, node.span)
        text = self.workspace.read(path)
        self.variables[node.name] = text
        return {"path": path, "into": node.name, "sha256": sha256(text)}

    def do_assert(self, node: ast.Assert):
        if not _truthy(self.evaluate(node.condition)):
            raise ScriptFailure(node.span, "assertion failed", self._explain(node.condition))
        return {"condition": format_expr(node.condition)}

    def _explain(self, condition: ast.Expr) -> str:
        """A failed condition as it was tested: its strings interpolated, then the value of each
        variable, LAST_RUN and LAST_PROMPT field it compared (long ones shortened in the middle)."""
        shown = format_expr(self._interpolated(condition))
        values, seen = [], set()
        for operand in _operands(condition):
            label = format_expr(operand)
            if label in seen:
                continue
            seen.add(label)
            try:
                values.append(f"{label} was {_excerpt(self.evaluate(operand))}")
            except ScriptFailure:
                continue
        run = self.last_run
        if run is not None and any(isinstance(o, ast.LastRun) for o in _operands(condition)):
            if run.stderr.strip() and "LAST_RUN.STDERR" not in seen:
                values.append(f"LAST_RUN.STDERR was {_excerpt(run.stderr)}")
            if "LAST_RUN.EXIT_CODE" not in seen:
                values.append(f"LAST_RUN.EXIT_CODE was {run.exit_code}")
        return shown + (f" ({'; '.join(values)})" if values else "")

    def _interpolated(self, node: ast.Expr) -> ast.Expr:
        """`node` with its string literals (and FILE paths) interpolated, for showing it."""
        try:
            match node:
                case ast.Literal(value=str(text)):
                    return replace(node, value=self.interpolate(text, node.span))
                case ast.FileExists(path=path):
                    return replace(node, path=self.interpolate(path, node.span))
        except ScriptFailure:
            return node
        match node:
            case ast.Binary(left=left, right=right):
                return replace(node, left=self._interpolated(left), right=self._interpolated(right))
            case ast.Not(operand=operand) | ast.IsEmpty(operand=operand):
                return replace(node, operand=self._interpolated(operand))
        return node

    def do_var(self, node: ast.Var):
        if node.name in self.fixed:  # the command line wins, as make's and ansible's variables do
            return {"name": node.name, "skipped": "given with --var"}
        self.variables[node.name] = self.evaluate(node.value)
        return {"name": node.name}

    def _complete(self, prompt: str, max_tokens: int = MAX_TOKENS, system: str | None = None) -> Completion:
        """The adapter's answer to `prompt` (the user's turn, after the `system` message if any),
        within the run's budgets, filtered and audited."""
        budget = self.budget
        if budget.api_calls is not None and budget.calls_used >= budget.api_calls:
            raise AdapterError(f"API_CALLS budget of {budget.api_calls} is used up")
        if self.adapter is None:
            raise AdapterError("no model: pass --model DIR or --base-url URL")
        options: dict = {"system": system} if system else {}
        with self.progress(f"{self.adapter.name} answering", max_tokens) as tally:
            if _reports_tokens(self.adapter):
                options["on_tokens"] = tally
            reply = self.adapter.complete(prompt, max_tokens, seed=self.seed + budget.calls_used, **options)
            tally.count = reply.completion_tokens
        budget.calls_used += 1
        budget.tokens_used += reply.prompt_tokens + reply.completion_tokens
        decisions = []
        if self.content_filter is not None:  # the answer as the policy lets it out, before any step uses it
            verdict = self.content_filter.apply(reply.text)
            reply, decisions = replace(reply, text=verdict.text), verdict.decisions()
        self._record("model_call", model=self.adapter.name, prompt_sha256=sha256(prompt),
                     reply_sha256=sha256(reply.text), prompt_tokens=reply.prompt_tokens,
                     completion_tokens=reply.completion_tokens, content_filter=decisions,
                     **({"system_sha256": sha256(system)} if system else {}), **_entropy(reply))  # fmt: skip
        return reply

    def do_promptagent(self, node: ast.PromptAgent):
        prompt = self.interpolate(node.prompt, node.span)
        system = "\n".join(
            f"{label}: {self.directives[key]}"
            for key, label in (("persona", "You are"), ("output", "Output"))
            if key in self.directives
        )  # the directives are the conversation's system message
        try:
            self.last_prompt = self._complete(prompt, system=system or None)
        except AdapterError as err:
            kind = "budget exhausted" if "budget" in str(err) else "model failed"
            raise ScriptFailure(node.span, kind, str(err)) from None
        self.variables[node.into] = self.last_prompt.text
        limit = self.budget.token_count
        if limit is not None and self.budget.tokens_used > limit:
            raise ScriptFailure(
                node.span, "budget exhausted", f"TOKEN_COUNT: {self.budget.tokens_used} tokens used of {limit}"
            )
        used = {"calls_used": self.budget.calls_used, "tokens_used": self.budget.tokens_used}
        return {"into": node.into, **used, **_entropy(self.last_prompt)}

    def do_retrieve(self, node: ast.Retrieve):
        query = self.interpolate(node.query, node.span)
        if self.kb is None:
            raise ScriptFailure(node.span, "no knowledge base", "RETRIEVE needs a knowledge base: pass --kb DIR")
        top = DEFAULT_TOP if node.top is None else node.top
        try:
            hits = self.kb.search(query, k=top)
        except TissLMError as err:
            raise ScriptFailure(node.span, "retrieval failed", str(err)) from None
        text = retrieved_text(hits)
        self.variables[node.into] = text
        self.say(f"retrieved {len(hits)} chunks for {query!r}")
        for hit in hits:
            self.say(f"  {hit.path}:{hit.start_line}-{hit.end_line} {hit.name}")
        sources = [
            {"path": h.path, "name": h.name, "lines": [h.start_line, h.end_line], "score": round(h.score, 6),
             "sha256": sha256(h.text)}
            for h in hits
        ]  # fmt: skip
        return {"query": query, "top": top, "into": node.into, "hits": sources, "sha256": sha256(text)}

    def do_setbudget(self, node: ast.SetBudget):
        if node.budget == "EXECUTION_TIME":
            self.budget.deadline = min(self.budget.deadline, self.started + parse_duration(str(node.value)))
        elif node.budget == "API_CALLS":
            self.budget.api_calls = int(node.value)
        else:
            self.budget.token_count = int(node.value)
        return {"budget": node.budget, "value": node.value}

    def do_log(self, node: ast.Log):
        text = self.interpolate(node.text, node.span)
        self.say(text)
        return {"text": text}

    def _confirm(self, node: ast.Pause | ast.RequestReview, kind: str, details: str = ""):
        text = self.interpolate(node.text, node.span)
        decision = self.reviewer.confirm(kind, text, details)
        self._approval(node, kind, text, decision)
        if not decision.approved:
            raise ReviewDenied(node.span, "denied", f"{kind} {text!r} was not approved ({decision.by})")

    def do_pause(self, node: ast.Pause):
        self._confirm(node, "PAUSE")
        return {}

    def do_requestreview(self, node: ast.RequestReview):
        written = "".join(f"\n  {path}" for path in self.written)
        self._confirm(node, "REQUEST_REVIEW", f"files written so far:{written}" if written else "")
        return {}

    def _approval(self, node: ast.Node, kind: str, text: str, decision: Decision) -> None:
        self.say(f"{kind}: {'approved' if decision.approved else 'denied'} by {decision.by}")
        self._record("approval", kind=kind, span=self._at(node.span), text=text, approved=decision.approved,
                     by=decision.by, choice=decision.choice, answer=decision.answer)  # fmt: skip

    def do_directive(self, node: ast.Directive):
        self.directives[node.name] = self.interpolate(node.value, node.span)
        return {"name": node.name}

    # ---- expressions -----------------------------------------------------------------------------

    def evaluate(self, node: ast.Expr) -> Value:
        match node:
            case ast.Literal(value=str(text)):
                return self.interpolate(text, node.span)
            case ast.Literal(value=value):
                return value
            case ast.VarRef(name=name):
                if name not in self.variables:
                    raise ScriptFailure(node.span, "undefined variable", f"{name!r} has no value here")
                return self.variables[name]
            case ast.LastRun(field=name):
                return self._field("LAST_RUN", name, node.span)
            case ast.LastPrompt(field=name):
                return self._field("LAST_PROMPT", name, node.span)
            case ast.FileExists(path=path):
                return self.workspace.exists(self.interpolate(path, node.span))
            case ast.Not(operand=operand):
                return not _truthy(self.evaluate(operand))
            case ast.IsEmpty(operand=operand):
                return _text(self.evaluate(operand)).strip() == ""
            case ast.Binary(op="AND", left=left, right=right):
                return _truthy(self.evaluate(left)) and _truthy(self.evaluate(right))
            case ast.Binary(op="OR", left=left, right=right):
                return _truthy(self.evaluate(left)) or _truthy(self.evaluate(right))
            case ast.Binary(op=op, left=left, right=right):
                return self._binary(node, op, self.evaluate(left), self.evaluate(right))
        raise TypeError(f"not an expression: {node!r}")

    def _binary(self, node: ast.Binary, op: str, a: Value, b: Value) -> bool:
        if op == "CONTAINS":
            return _text(b) in _text(a)
        if op == "NOT CONTAINS":
            return _text(b) not in _text(a)
        if op == "MATCHES":
            try:
                return re.search(_text(b), _text(a)) is not None
            except re.error as err:
                raise ScriptFailure(node.span, "bad pattern", f"{_text(b)!r}: {err}") from None
        x, y = _number(a), _number(b)
        if x is None or y is None:  # not both numbers: compare as text ("true" == TRUE holds)
            x, y = _text(a), _text(b)
        return COMPARISONS[op](x, y)
