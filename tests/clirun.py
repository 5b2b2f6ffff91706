"""Run the real ``raptor`` command: as a subprocess (what a user runs) or in-process (fast, for many inputs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ENV = dict(os.environ, HF_HUB_OFFLINE="1")
TESTS = Path(__file__).parent


def raptor(*args, timeout: int = 300, cwd=None, prefix: list[str] | None = None, umask: int | None = None):
    """``python -m raptor.cli ARGS`` (or ``prefix + ARGS``, e.g. the fault-injecting runner)."""
    cmd = (prefix or [sys.executable, "-m", "raptor.cli"]) + [str(a) for a in args]
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=cwd, preexec_fn=pre)


def faulty(kind: str, root, budget: int = 0) -> list[str]:
    """Prefix for :func:`raptor` that runs the CLI with an injected filesystem fault under ``root``."""
    return [sys.executable, str(TESTS / "faultfs.py"), kind, str(root), str(budget), "--"]


def one_error_line(stderr: str, needle: str = "") -> str:
    """Assert ``stderr`` is exactly one ``error: ...`` line (warnings aside) containing ``needle``; return it."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr, stderr
    assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]
