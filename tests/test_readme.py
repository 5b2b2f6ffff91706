"""Every README snippet works as written: the Python block runs, and every ``raptor`` command line in the bash
blocks parses (options exist, values have the right types)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import typer

from raptor.cli import app

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
SCALE = (ROOT / "docs" / "scale.md").read_text()
SURROGATE = (ROOT / "docs" / "surrogate.md").read_text()  # the fidelity protocol's commands
PHASES = (ROOT / "docs" / "phases.md").read_text()  # the zoo's commands
SLURM = (ROOT / "docs" / "slurm.md").read_text()  # the cluster templates


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
            words = words[1:] if words[:1] == ["srun"] else words  # srun torchrun ... (docs/slurm.md)
            words = words[:-1] if words[-1:] == ["&"] else words
            if words and words[0] in ("raptor", ".venv/bin/raptor"):
                out.append(words[1:])
            elif words and words[0] == "torchrun" and "raptor.cli" in words:
                out.append(words[words.index("raptor.cli") + 1:])
    return out


def test_readme_python_snippets_run(tmp_path, monkeypatch):
    code = blocks("python")
    assert code, "the README has a Python example"
    monkeypatch.chdir(tmp_path)
    # the store layout section's read-without-raptor snippet reads the store the Python API example makes
    code.sort(key=lambda s: "zarr.open_group" in s)
    assert "zarr.open_group" in code[-1], "the README shows how to read a store with plain zarr"
    for snippet in code:
        ns = {"__name__": "__readme__"}
        exec(compile(snippet, "README.md", "exec"), ns)
    from raptor.store import TrajectoryStore

    st = TrajectoryStore(tmp_path / "runs" / "photos8.zarr")
    assert st.complete
    assert np.array_equal(ns["rows"], st.read(slice(0, 4), layers=(6, 7)).numpy())  # the plain-zarr snippet's rows
    assert ns["ids"] == st.ids and np.array_equal(ns["labels"], st.labels)
    assert np.array_equal(np.flatnonzero(ns["stored"]), st.valid_indices)


def test_readme_command_lines_parse():
    group = typer.main.get_command(app)
    commands = command_lines(README)
    scale = command_lines(SCALE)
    assert len(commands) >= 5 and len(scale) >= 8 and any(a[0] == "fit" and "--parallel-blocks" in a for a in scale)
    protocol = command_lines(SURROGATE)
    assert sum(a[0] == "fit" for a in protocol) >= 6 and any(a[0] == "fit-report" for a in protocol)
    zoo = command_lines(PHASES)
    assert sum(a[0] == "zoo" for a in zoo) >= 2 and any(a[0] == "zoo" for a in commands)
    slurm = command_lines(SLURM)
    assert [a[0] for a in slurm] == ["extract", "fit", "probe", "fit", "fit"]
    assert all("--resume" in a for a in slurm if a[0] == "fit")
    for argv in commands + scale + protocol + zoo + slurm:
        with group.make_context("raptor", list(argv), resilient_parsing=False) as ctx:
            name, sub, rest = group.resolve_command(ctx, list(argv))
            sub.make_context(name, rest, parent=ctx)  # raises on an unknown option or a bad value


def test_published_result_tables_are_regenerated_from_the_committed_runs():
    """`make results` (scripts/results_tables.py) rewrites the result blocks of docs/phases.md and docs/surrogate.md
    from the runs under docs/results; the committed pages must equal what it writes."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "results_tables.py"
    spec = importlib.util.spec_from_file_location("results_tables", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--check"]) == 0


def test_budget_curve_plot(tmp_path):
    """The budget-curve figure of make results: points with CI bars on a log axis and the dashed extrapolation."""
    from raptor.plots import budget_curve

    path = budget_curve(tmp_path / "b.png", {"k=2": ([274, 1100], [0.30, 0.42], [(0.28, 0.32), (0.40, 0.45)])},
                        xlabel="steps", ylabel="R²", title="t", goal=0.8, extend_to=11000)
    assert path.stat().st_size > 5000
    # an R² line is never extrapolated past 1: the fit of a steep curve stops where it would cross the ceiling
    import matplotlib.pyplot as plt

    from raptor import plots

    drawn = []
    real_save = plots.save_figure
    plots.save_figure = lambda fig, p: drawn.append([ln.get_ydata() for ax in fig.axes for ln in ax.get_lines()]) \
        or real_save(fig, p)
    try:
        budget_curve(tmp_path / "c.png", {"steep": ([100, 200], [0.6, 0.9], [(0.5, 0.7), (0.8, 1.0)])},
                     xlabel="steps", ylabel="R²", title="t", extend_to=10000, ceiling=1.0)
    finally:
        plots.save_figure = real_save
        plt.close("all")
    assert drawn and max(float(max(y)) for y in drawn[0] if len(y)) <= 1.0
