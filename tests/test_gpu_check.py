"""The GPU acceptance check's dry run: every check of benchmarks/gpu_check.py on the CPU at tiny sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clirun import ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_writes_its_report(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    rep = json.loads((tmp_path / "gpu_check.json").read_text())
    assert rep["dry_run"] is True
    checks = rep["checks"]
    assert {"extract", "analyze", "dynamics", "study", "fit_store", "fit_online", "compile", "probe_init_head",
            "host_syncs", "extract_vit_b", "train_step", "torchrun"} <= set(checks)
    optional = ("host_syncs", "peak_memory", "timm_parity", "open_clip_parity")  # the last two need their library
    assert all(c["status"] == "pass" for n, c in checks.items() if n not in optional), checks
    assert all(checks[n]["status"] in ("pass", "skipped") for n in ("timm_parity", "open_clip_parity")), checks
    assert checks["host_syncs"]["status"] == "skipped" and "GPU" in checks["host_syncs"]["reason"]
    assert checks["extract"]["store_relative_diff_vs_cpu"] == 0.0  # the CPU against itself: exact
    assert checks["analyze"]["store_max_abs_diff"] == checks["analyze"]["live_max_abs_diff"] == 0.0
    assert checks["dynamics"]["max_abs_diff"] == checks["dynamics"]["effective_rank_max_abs_diff"] == 0.0
    assert checks["study"]["teacher_accuracy_diff"] == checks["study"]["distance_max_abs_diff"] == 0.0
    assert checks["compile"]["unique_graphs"] <= 8
    assert checks["extract_vit_b"]["images_per_s_bf16"] > 0 and checks["train_step"]["reference_steps_per_s"] > 0
    assert checks["torchrun"]["tensor_devices"] == ["cpu"]  # 2 gloo ranks in the dry run
    assert checks["torchrun"]["stage2_loss_relative_diff_vs_1_rank"] <= 1e-4
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check")


def test_gpu_check_without_a_gpu_says_so():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", "/nonexistent/x"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: no CUDA GPU"), r.stderr
