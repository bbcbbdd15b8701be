"""Human in the loop: PAUSE, REQUEST_REVIEW and CHOOSE.

In a terminal the reviewer is asked; in CI `--approve-all` / `--deny-all` decide. Without a
terminal and without either flag a question cannot be answered, and the run stops rather than
guess (a CHOOSE then goes to the model instead, when the engine has one). Whoever decided, the
engine writes the decision to the audit log.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal, TextIO

from tisslm.core.errors import TissLMError

Policy = Literal["ask", "approve", "deny"]


class ReviewError(TissLMError):
    """A question nobody can answer (no terminal, no --approve-all/--deny-all)."""

    exit_code = 1


@dataclass(frozen=True)
class Decision:
    approved: bool
    by: str  # "terminal", "--approve-all", "--deny-all" or "model:<name>"
    choice: int | None = None  # CHOOSE: the index of the option picked
    answer: str = ""  # what the reviewer typed, for the audit log


class Reviewer:
    def __init__(
        self,
        policy: Policy = "ask",
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        interactive: bool | None = None,
    ):
        self.policy = policy
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stderr  # questions go where progress goes, not into piped output
        self.interactive = self.stdin.isatty() if interactive is None else interactive

    @property
    def can_answer(self) -> bool:
        return self.policy != "ask" or self.interactive

    def _ask(self, question: str) -> str:
        print(question, end="", file=self.stdout, flush=True)
        line = self.stdin.readline()
        if not line:
            raise ReviewError("no answer from the terminal (end of input)")
        return line.strip()

    def _unanswerable(self, what: str) -> ReviewError:
        return ReviewError(f"{what} needs a reviewer: run in a terminal, or pass --approve-all or --deny-all")

    def confirm(self, kind: str, text: str, details: str = "") -> Decision:
        """PAUSE / REQUEST_REVIEW: go on (approved) or stop the run."""
        if self.policy != "ask":
            return Decision(self.policy == "approve", f"--{self.policy}-all")
        if not self.interactive:
            raise self._unanswerable(kind)
        print(f"\n[{kind}] {text}", file=self.stdout)
        if details:
            print(details, file=self.stdout)
        answer = self._ask("continue? [y/N] ")
        return Decision(answer.lower() in ("y", "yes"), "terminal", answer=answer)

    def choose(self, text: str, labels: list[str]) -> Decision:
        """CHOOSE: pick an option (approve-all takes the first; deny-all refuses them all)."""
        if self.policy != "ask":
            return Decision(self.policy == "approve", f"--{self.policy}-all", 0 if self.policy == "approve" else None)
        if not self.interactive:
            raise self._unanswerable("CHOOSE")
        print(f"\n[CHOOSE] {text}", file=self.stdout)
        for i, label in enumerate(labels, 1):
            print(f"  {i}. {label}", file=self.stdout)
        while True:
            answer = self._ask(f"option [1-{len(labels)}, or n to refuse all] ")
            if answer.lower() in ("n", "no"):
                return Decision(False, "terminal", answer=answer)
            if answer.isdigit() and 1 <= int(answer) <= len(labels):
                return Decision(True, "terminal", int(answer) - 1, answer)
