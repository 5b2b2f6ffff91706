"""Rich progress bars with a rate column (images/s, steps/s) and warnings printed above the bar."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
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
        console.print(f"[yellow]warning:[/yellow] {msg}", highlight=False)


@contextlib.contextmanager
def progress_bar(total: float, description: str, unit: str = "it", enabled: bool = True, extra: str = ""):
    """A progress bar; disabled (but warnings still printed) when ``enabled`` is false."""
    if not enabled:
        yield _Bar(None, None)
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if extra:
        cols.append(TextColumn(extra))
    with Progress(*cols, console=console, transient=False) as p:
        task = p.add_task(description, total=total, loss="-")
        yield _Bar(p, task)
