"""raptor analyze end to end on the real bundled teacher: files, schema, live = store, CLI."""

import json
import os
import subprocess
import sys
from importlib import resources

import jsonschema
import numpy as np
import pytest

from raptor.analyze import AnalyzeConfig, run_analyze
from raptor.errors import RaptorError


@pytest.fixture(scope="module")
def schema():
    return json.loads(resources.files("raptor").joinpath("schemas/analysis.schema.json").read_text())


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    out = tmp_path_factory.mktemp("an") / "live"
    cfg = AnalyzeConfig(teacher="bundled:dinov2-s", data="bundled:lfw", out=str(out), limit=24, image_size=56,
                        batch_size=8, cka_groups=("cls", "patches", "all"))
    return run_analyze(cfg, progress=False)


@pytest.mark.slow
def test_analysis_json_validates_and_files_exist(live, schema):
    a = json.loads((live.out / "analysis.json").read_text())
    jsonschema.validate(a, schema)
    assert a["layers"] == list(range(1, 13)) and a["data"]["n_images"] == 24
    for f in a["figures"].values():
        assert (live.out / f).stat().st_size > 5000
    assert (live.out / "report.md").read_text().startswith("# Layer similarity")
    assert (live.out / "config.yaml").is_file()
    seg = a["segmentations"]["paper_cosine_distance"]
    assert set(seg["dp"]) == {"2", "3", "4", "5", "6"}
    for k, d in seg["dp"].items():
        assert len(d["phases"]) == int(k) and sum(len(p) for p in d["phases"]) == 12
    assert seg["maxcut"] and all(len(v["phases"]) == int(k) for k, v in seg["maxcut"].items())
    assert set(seg["maxcut_paper_fracs"]) == {"0.2", "0.1", "0.09"}
    assert set(a["null_tests"]) == set(a["boundary_stability"]) == {"2", "3", "4", "5", "6"}
    assert all(set(t["variable_speed_null"]) == {"lag_contrast", "boundary_jump"} for t in a["null_tests"].values())
    report = (live.out / "report.md").read_text()
    assert "## Is there more than a drift?" in report and "(variable-speed null, which explains" in report


def test_a_planted_block_recurrent_teacher_passes_the_null_test(tmp_path, schema):
    """A teacher whose 8 layers are 2 tied blocks (1-4, 5-8): analyze finds those phases at k = 2 in every bootstrap
    resample, and the change-point statistic rejects the lag-only null (p < 0.01); both statistics are reported,
    with the phases chosen on half the images and scored on the other half."""
    cfg = AnalyzeConfig(teacher="planted:2,depth=8,base=tiny:dinov2", data="bundled:lfw", out=str(tmp_path / "p"),
                        limit=64, k_max=3, null_resamples=200)
    a = run_analyze(cfg, progress=False).analysis
    jsonschema.validate(a, schema)
    t = a["null_tests"]["2"]
    assert t["phases"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert a["boundary_stability"]["2"] == {"boundaries": [5], "frequency": [1.0],
                                             "all": {str(i): float(i == 5) for i in range(2, 9)}}
    jump = t["alternatives"]["boundary_jump"]
    assert jump["p_value"] < 0.01 and jump["ci95"][0] > jump["null_ci95"][1]
    # a change point is not a smooth slow-down: the jump rejects the variable-speed null as well
    assert t["variable_speed_null"]["boundary_jump"]["p_value"] < 0.01
    assert t["split_half"]["boundary_jump"]["value"] > 0 and t["split_half"]["phases"] == t["phases"]
    assert 0 < t["p_value"] <= 1 and t["n_resamples"] == 200
    assert "phase structure at k=2" in (tmp_path / "p" / "report.md").read_text()
    assert "phase_evidence" in a["figures"] and (tmp_path / "p" / "phase_evidence.png").stat().st_size > 5000


def test_schema_rejects_a_broken_file(live, schema):
    a = json.loads((live.out / "analysis.json").read_text())
    del a["segmentations"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(a, schema)


def test_real_teacher_similarity_has_structure(live):
    r = live.result
    cos = r.matrices["paper_cosine_distance"]
    adjacent = np.mean([cos[i, i + 1] for i in range(11)])
    assert adjacent < cos[0, -1]  # neighbouring layers are closer than the first and last
    cka = r.matrices["cka_biased/patches"]
    assert np.allclose(np.diag(cka), 1) and cka[0, -1] < np.mean([cka[i, i + 1] for i in range(11)])


@pytest.mark.slow
def test_store_path_equals_live_path(live, tmp_path):
    from raptor.data import open_source
    from raptor.store import extract
    from raptor.teachers import load_teacher

    t = load_teacher("bundled:dinov2-s")
    extract(t, open_source("bundled:lfw").subset(24), tmp_path / "s", dtype="float32", image_size=56,
            progress=False)
    cfg = AnalyzeConfig(store=str(tmp_path / "s"), out=str(tmp_path / "from_store"), batch_size=5,
                        cka_groups=("cls", "patches", "all"))
    st = run_analyze(cfg, progress=False)
    for name, m in live.result.matrices.items():
        assert np.abs(st.result.matrices[name] - m).max() <= 1e-5, name


def test_bad_analyze_inputs(tmp_path):
    with pytest.raises(RaptorError, match="empty"):
        run_analyze(AnalyzeConfig(teacher="tiny:dinov2", data="bundled:lfw", limit=8, out=str(tmp_path / "a"),
                                  cka_groups=("registers",)), progress=False)
    with pytest.raises(RaptorError, match="k range"):
        run_analyze(AnalyzeConfig(k_min=4, k_max=2, out=str(tmp_path / "b")), progress=False)


@pytest.mark.slow
def test_cli_analyze_tiny(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "raptor.cli", "analyze", "--teacher", "tiny:dinov2_with_registers",
                        "--data", "bundled:digits", "--limit", "20", "--out", str(tmp_path / "o"), "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "phases (paper_cosine_distance" in r.stdout
    a = json.loads((tmp_path / "o" / "analysis.json").read_text())
    assert "cka_biased/registers" in a["metrics"] and a["layout"]["n_registers"] == 2
