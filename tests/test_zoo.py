"""raptor zoo: several teachers analysed on the same images, one figure and one table, resumable per teacher."""

from __future__ import annotations

import json

import pytest

from clirun import one_error_line
from raptor import cli
from raptor.errors import RaptorError
from raptor.zoo import ZooConfig, run_zoo, split_teachers

PLANTED = "planted:2,depth=8,base=tiny:dinov2"


@pytest.mark.slow
def test_zoo_tables_each_model_with_its_null_test_and_resumes_per_teacher(tmp_path):
    cfg = ZooConfig(teachers=(PLANTED, "tiny:vit"), data="bundled:lfw", out=str(tmp_path / "z"), limit=24,
                    null_resamples=50, k_max=3)
    res = run_zoo(cfg, progress=False)
    planted, vit = res["models"]
    assert planted["teacher"] == PLANTED and planted["depth"] == 8 and vit["depth"] == 3
    # a teacher that is 2 tied blocks: its cut beats the lag-only null under the boundary jump (test_analyze)
    assert planted["null_test_k2"]["boundary_jump"]["p_value"] < 0.05
    assert set(planted["null_test_k2"]) == set(planted["variable_speed_null"]) == {"lag_contrast", "boundary_jump"}
    analysis = json.loads((tmp_path / "z" / "teachers" / "planted_2_depth_8_base_tiny_dinov2" / "analysis.json")
                          .read_text())
    assert analysis["null_tests"]["2"]["phases"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    k = planted["k"]
    assert planted["phases"] == analysis["segmentations"]["paper_cosine_distance"]["dp"][str(k)]["phases"]
    assert planted["cuts_after"] == [p[0] - 1 for p in planted["phases"][1:]]
    assert planted["cuts_frac"] == [round(b / 8, 3) for b in planted["cuts_after"]]
    md = (tmp_path / "z" / "zoo.md").read_text()
    assert "![similarity matrices](zoo.png)" in md and f"`{PLANTED}`" in md and "`tiny:vit`" in md
    assert "| variable-speed null: p lag / jump |" in md
    assert (tmp_path / "z" / "zoo.png").stat().st_size > 10_000

    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "z" / "teachers").glob("*/analysis.json")}
    again = run_zoo(ZooConfig(**{**cfg.__dict__, "teachers": (PLANTED, "tiny:vit", "tiny:deit")}), progress=False)
    assert [m["teacher"] for m in again["models"]] == [PLANTED, "tiny:vit", "tiny:deit"]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # the two done already were not analysed again
    # replayed from its own config.yaml into another folder: the same table (each teacher analysed again there)
    assert cli.run(["zoo", "--config", str(tmp_path / "z" / "config.yaml"), "--out", str(tmp_path / "z2"),
                    "--no-progress"]) == 0
    replay = json.loads((tmp_path / "z2" / "zoo.json").read_text())
    assert [m["phases"] for m in replay["models"]] == [m["phases"] for m in again["models"]]
    with pytest.raises(RaptorError, match="was analysed with other settings .*limit"):
        run_zoo(ZooConfig(**{**cfg.__dict__, "limit": 20}), progress=False)


def test_teacher_lists_keep_the_commas_inside_a_spec():
    assert split_teachers("tiny:vit, planted:2,depth=8,base=tiny:dinov2,hf:x/y") == (
        "tiny:vit", "planted:2,depth=8,base=tiny:dinov2", "hf:x/y")


def test_zoo_refuses_bad_teacher_lists_before_writing(tmp_path, capsys):
    for teachers, needle in (("", "names no teacher"), ("tiny:vit,nope", "bad teacher spec 'nope'"),
                             ("tiny:vit,tiny:vit", "names tiny:vit twice")):
        assert cli.run(["zoo", "--teachers", teachers, "--out", str(tmp_path / "z")]) == 2
        one_error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "z").exists()
