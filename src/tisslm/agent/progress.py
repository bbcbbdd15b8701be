"""What a script shows while the model works: a PROMPT_AGENT (or a CHOOSE the model decides) can
take many seconds, and a silent terminal looks hung.

Everything goes to stderr, so stdout (the run's transcript) stays what it was. On a terminal a
rich spinner counts the tokens generated so far (the local model reports them as it goes; a server
reports nothing until it answers, so only the time runs) and clears itself; elsewhere (CI logs)
one line says the call began. Either way a last line gives the tokens, the time and the
throughput.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO


class Tally:
    """Tokens so far: called with each batch of new ones; `count` may be set to the final figure
    (a server says how many only when it answers)."""

    def __init__(self, on_change: Callable[[int], None] | None = None):
        self.count, self.on_change = 0, on_change

    def __call__(self, n: int) -> None:
        self.count += n
        if self.on_change is not None:
            self.on_change(self.count)


class ModelProgress:
    """`with progress("local:models/model answering", 256) as tally:` ... `tally(n)` as n more arrive."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None):
        self.stream = stream
        self.live = live  # None: a spinner only when the stream is a terminal

    @contextmanager
    def __call__(self, what: str, max_tokens: int) -> Iterator[Tally]:
        stream = self.stream or sys.stderr
        live = self.live if self.live is not None else stream.isatty()
        start = time.monotonic()
        if live:
            from rich.console import Console  # loaded only when a model is called, on a terminal
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            columns = (SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed} tokens"),
                       TimeElapsedColumn())  # fmt: skip
            with Progress(*columns, console=Console(file=stream), transient=True) as bar:
                task = bar.add_task(what, total=max_tokens)
                tally = Tally(lambda count: bar.update(task, completed=count))
                yield tally
        else:
            print(f"{what} (up to {max_tokens} tokens) ...", file=stream, flush=True)
            tally = Tally()
            yield tally
        took = time.monotonic() - start
        rate = f", {tally.count / took:.1f} tokens/s" if tally.count and took > 0 else ""
        print(f"{what}: {tally.count} tokens in {took:.1f} s{rate}", file=stream, flush=True)
