"""Every README snippet works as written: the Python block runs, and every ``raptor`` command line in the bash
blocks parses (options exist, values have the right types)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer

from raptor.cli import app

README = (Path(__file__).parents[1] / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    code = blocks("python")
    assert code, "the README has a Python example"
    monkeypatch.chdir(tmp_path)
    for snippet in code:
        exec(compile(snippet, "README.md", "exec"), {"__name__": "__readme__"})
    from raptor.store import TrajectoryStore

    assert TrajectoryStore(tmp_path / "runs" / "photos8.zarr").complete


def test_readme_command_lines_parse():
    group = typer.main.get_command(app)
    lines = [ln.split("  #")[0].strip() for b in blocks("bash") for ln in b.splitlines()]
    commands = [shlex.split(ln)[1:] for ln in lines if ln.startswith("raptor ")]
    assert len(commands) >= 5
    for argv in commands:
        with group.make_context("raptor", list(argv), resilient_parsing=False) as ctx:
            name, sub, rest = group.resolve_command(ctx, list(argv))
            sub.make_context(name, rest, parent=ctx)  # raises on an unknown option or a bad value
