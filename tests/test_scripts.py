"""Smoke tests of the research scripts under scripts/ that use the package's internals: they must keep running as
the package changes (a script that rots silently cannot reproduce the tables that cite it)."""

import subprocess
import sys
from pathlib import Path

import pytest

from raptor.data.sources import open_source
from raptor.store import extract
from raptor.teachers.hf import build_tiny_teacher

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_recipe_ablation_script_trains_one_block_and_prints_its_r2_beside_the_baselines(tmp_path):
    """scripts/ablation_block.py (docs/surrogate.md's recipe ablation) on a tiny store: one block, two steps."""
    extract(build_tiny_teacher("dinov2"), open_source("bundled:digits").subset(60), tmp_path / "s", chunk_images=16,
            progress=False)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "ablation_block.py"), str(tmp_path / "s"), "0", "2",
                        "1e-5", "3e-3", "layer", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("baselines on the same held-out images") and "ridge chained" in lines[0]
    assert lines[1].startswith("segment 0->2 init 1e-05 lr 0.003 norm layer steps 2: AR R2 mean")
