"""Every README snippet works as written: the Python block runs, and every ``raptor`` command line in the bash
blocks parses (options exist, values have the right types)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import typer

from raptor.cli import app

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
SCALE = (ROOT / "docs" / "scale.md").read_text()
SURROGATE = (ROOT / "docs" / "surrogate.md").read_text()  # the fidelity protocol's commands


def blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def command_lines(text: str) -> list[list[str]]:
    """The ``raptor`` arguments of every command line of the bash blocks (``raptor X ...``, ``.venv/bin/raptor X``
    or ``torchrun ... -m raptor.cli X ...``; backslash continuations joined, comments dropped)."""
    out = []
    for b in blocks("bash", text):
        for ln in b.replace("\\\n", " ").splitlines():
            ln = ln.split("  #")[0].split(" # ")[0].strip()
            words = shlex.split(ln) if ln and not ln.startswith("#") else []
            if words and words[0] in ("raptor", ".venv/bin/raptor"):
                out.append(words[1:])
            elif words and words[0] == "torchrun" and "raptor.cli" in words:
                out.append(words[words.index("raptor.cli") + 1:])
    return out


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
    commands = command_lines(README)
    scale = command_lines(SCALE)
    assert len(commands) >= 5 and len(scale) >= 8 and any(a[0] == "fit" and "--parallel-blocks" in a for a in scale)
    protocol = command_lines(SURROGATE)
    assert sum(a[0] == "fit" for a in protocol) >= 6 and any(a[0] == "fit-report" for a in protocol)
    for argv in commands + scale + protocol:
        with group.make_context("raptor", list(argv), resilient_parsing=False) as ctx:
            name, sub, rest = group.resolve_command(ctx, list(argv))
            sub.make_context(name, rest, parent=ctx)  # raises on an unknown option or a bad value
