"""Progress: rich bars with a rate column (images/s, steps/s) on a terminal; when output is not a terminal (a log
file, CI) plain-text lines every ``PLAIN_EVERY_S`` seconds and at the end, so a log never stays silent."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self.progress, self.task = progress, task

    def advance(self, n: float = 1, **fields) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=n, **fields)

    def set_description(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=text)

    def warn(self, msg: str) -> None:
        console.print(f"[yellow]warning:[/yellow] {msg}", highlight=False, soft_wrap=True, markup=True)


def no_bar() -> _Bar:
    """A bar that shows nothing (warnings still printed): for callers that pass no bar."""
    return _Bar(None, None)


PLAIN_EVERY_S = 30.0


class _PlainBar(_Bar):
    def __init__(self, total: float, description: str, unit: str):
        super().__init__(None, None)
        self.total, self.description, self.unit = total, description, unit
        self.done, self.fields = 0.0, {}
        self.t0 = self.last = time.perf_counter()

    def advance(self, n: float = 1, **fields) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.perf_counter()
        if now - self.last >= PLAIN_EVERY_S:
            self.last = now
            self.line()

    def set_description(self, text: str) -> None:
        self.description = text

    def line(self, final: bool = False) -> None:
        el = time.perf_counter() - self.t0
        rate = self.done / el if el > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and not final else 0.0
        extra = "".join(f", {k} {v}" for k, v in self.fields.items() if v not in (None, "-"))
        console.print(f"{self.description}: {self.done:g}/{self.total:g} {self.unit}, {rate:.2f} {self.unit}/s, "
                      f"elapsed {el:.0f} s" + (f", eta {eta:.0f} s" if not final else " (done)") + extra,
                      highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(total: float, description: str, unit: str = "it", enabled: bool = True, extra: str = ""):
    """A progress bar; disabled (but warnings still printed) when ``enabled`` is false."""
    if not enabled:
        yield no_bar()
        return
    if not console.is_terminal:
        bar = _PlainBar(total, description, unit)
        yield bar
        bar.line(final=True)
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if extra:
        cols.append(TextColumn(extra))
    with Progress(*cols, console=console, transient=False) as p:
        task = p.add_task(description, total=total, loss="-")
        yield _Bar(p, task)


def log_to_stdout() -> None:
    """The ``raptor`` logger as the command shows it: library code logs to ``logging.getLogger("raptor")`` (a
    notebook configures it as it likes; by default only warnings appear); the ``raptor`` command prints its INFO
    lines (e.g. fit's chosen phases) plainly on stdout, once per process."""
    log = logging.getLogger("raptor")
    if not any(isinstance(h, _StdoutHandler) for h in log.handlers):
        h = _StdoutHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at each message (a replaced or captured stdout included)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass
