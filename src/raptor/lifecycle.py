"""The lifecycle every command shares:

    check the settings -> cheap checks of the inputs -> device -> claim the output -> stage -> run -> finish

The first two are the command's own (its config's ``check()``, then opening its store, data or runs: everything that
can be refused before a model loads or an output directory is touched). :func:`command_run` does the rest: it picks
the device (joining torchrun's process group when there is one), claims the output directory on rank 0 (created and
locked; a resumable command keeps its earlier progress, a refusal on rank 0 ends every rank), and, for a command
whose results appear together, stages them so that they move in only on success with ``final`` written last.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from raptor.distributed import Dist, claim_on_main, setup
from raptor.outputs import staged


@dataclass(frozen=True)
class CommandRun:
    """A claimed output: ``out``; ``stage``: where the results are written before they move in (None when the
    command writes in place); ``dist`` / ``device``: this process's rank and device."""

    out: Path
    stage: Path | None
    dist: Dist
    device: torch.device | None


@contextlib.contextmanager
def command_run(out: str | Path, *, final: str | None = None, device: str | None = None,
                placed: tuple[Dist, torch.device] | None = None, has_progress: Callable[[Path], bool] | None = None,
                then: Callable[[], None] | None = None) -> Iterator[CommandRun]:
    """Claim ``out`` for one command run (see the module doc).

    - ``device``: the ``--device`` to set up (None: one process, no device choice: the command runs on the CPU),
      or ``placed``: the (dist, device) the command already set up for its cheap checks;
    - ``has_progress(out)``: whether ``out`` holds progress a re-run resumes (kept, not refused);
    - ``then()``: checks to repeat once the lock is held (e.g. what an existing run directory holds);
    - ``final``: the file written last; the results are staged (rank 0) and moved in together on success.
    """
    out = Path(out)
    dist, dev = placed if placed is not None else setup(device) if device is not None else (Dist(), None)
    with contextlib.ExitStack() as stack:
        claim_on_main(stack, dist, out, has_progress, then)
        stage = stack.enter_context(staged(out, final)) if final is not None and dist.main else None
        yield CommandRun(out, stage, dist, dev)
