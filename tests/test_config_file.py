"""--config FILE: a command re-run from the config.yaml it wrote reproduces the run; flags given on the command line
override the file; unknown keys and wrong types are one error line naming the key, before anything is written."""

from __future__ import annotations

import json

import pytest
import yaml
from safetensors.torch import load_file

from clirun import one_error_line
from raptor import cli

FIT = ["fit", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--limit", "30", "--phases", "1-2/3", "--steps1",
       "3", "--steps2", "2", "--batch-size", "4", "--lr", "2e-3", "--val-images", "5", "--stats-images", "8",
       "--probe-data", "none", "--seed", "4", "--no-progress"]


@pytest.mark.slow
def test_a_fit_rerun_from_its_own_config_reproduces_it_and_flags_override(tmp_path, capsys):
    assert cli.run([*FIT, "--out", str(tmp_path / "a")]) == 0
    assert cli.run(["fit", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b"),
                    "--no-progress"]) == 0
    a, b = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("a", "b"))
    assert b["loss_history"] == a["loss_history"] and b["validation"] == a["validation"]
    wa, wb = (load_file(tmp_path / r / "model.safetensors") for r in ("a", "b"))
    assert all((wa[k] == wb[k]).all() for k in wa)
    ca, cb = (yaml.safe_load((tmp_path / r / "config.yaml").read_text()) for r in ("a", "b"))
    assert {k: v for k, v in ca.items() if k != "out"} == {k: v for k, v in cb.items() if k != "out"}

    # a flag on the command line wins over the file; the rest comes from the file
    assert cli.run(["fit", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "c"),
                    "--steps2", "1", "--phases", "1/2-3", "--no-progress"]) == 0
    cc = yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())
    assert cc["steps2"] == 1 and cc["phases"] == [[1], [2, 3]] and cc["lr"] == 2e-3 and cc["seed"] == 4
    capsys.readouterr()


def test_a_hand_written_subset_and_its_refusals(tmp_path, capsys):
    cfg = tmp_path / "subset.yaml"
    cfg.write_text("k_max: 3\nnull_resamples: 0\nlimit: 12\nimage_size: 28\n")
    assert cli.run(["analyze", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--config", str(cfg), "--out",
                    str(tmp_path / "an"), "--no-progress"]) == 0
    a = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert a["config"]["k_max"] == 3 and a["data"]["n_images"] == 12 and a["config"]["image_size"] == 28
    again = tmp_path / "an" / "config.yaml"  # analyze's own config, re-run elsewhere: the same matrices
    assert cli.run(["analyze", "--config", str(again), "--out", str(tmp_path / "an2"), "--no-progress"]) == 0
    b = json.loads((tmp_path / "an2" / "analysis.json").read_text())
    assert b["metrics"] == a["metrics"]
    capsys.readouterr()

    for text, needle in (("stepz: 3\n", "unknown key 'stepz'"),
                         ("steps1: abc\n", "steps1 must be an integer, got 'abc'"),
                         ("lr: [1, 2]\n", "lr must be a number, got [1, 2]"), ("- 1\n- 2\n", "a mapping of settings"),
                         ("phases: [[1, 2], x]\n", "phases must be"), ("steps1: [\n", "not readable YAML")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        assert cli.run([*FIT, "--config", str(bad), "--out", str(tmp_path / "never")]) == 2
        one_error_line(capsys.readouterr().err, needle)
    (tmp_path / "weights.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")  # a wrong kind of file
    assert cli.run([*FIT, "--config", str(tmp_path / "weights.bin"), "--out", str(tmp_path / "never")]) == 2
    one_error_line(capsys.readouterr().err, "not readable YAML (UnicodeDecodeError)")
    assert cli.run([*FIT, "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "never")]) == 2
    one_error_line(capsys.readouterr().err, "no such file")
    assert not (tmp_path / "never").exists()


def test_a_recipe_in_the_file_sets_its_hyper_parameters_and_values_are_checked(tmp_path, capsys):
    """recipe: paper in a hand-written file gives the paper recipe's hyper-parameters where the file and the
    command line set none; fixed-length settings and numbers written as YAML text are checked."""
    f = tmp_path / "paper.yaml"
    f.write_text("recipe: paper\nsteps1: 2\nsteps2: 1\nbatch_size: 4\nlr2: 1e-4\n")
    argv = ["fit", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--limit", "30", "--phases", "1-2/3",
            "--val-images", "5", "--stats-images", "8", "--probe-data", "none", "--no-progress", "--lr", "2e-3"]
    assert cli.run([*argv, "--config", str(f), "--out", str(tmp_path / "p")]) == 0
    capsys.readouterr()
    cfg = yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())
    assert cfg["recipe"] == "paper" and cfg["steps1"] == 2 and cfg["batch_size"] == 4 and cfg["lr2"] == 1e-4
    assert cfg["loss_norm"] == "none" and cfg["stage2_weights"] == [0.45, 0.1, 0.45]  # the paper recipe's
    assert cfg["lr"] == 2e-3  # given on the command line (FIT): the command line wins over the recipe
    for text, needle in (("stage2_weights: [0.5, 0.5]\n", "stage2_weights must be a list of 3 values"),
                         ("stage2_weights: [-1, 1, 1]\n", "bad stage2_weights [-1.0, 1.0, 1.0]")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        assert cli.run([*FIT, "--config", str(bad), "--out", str(tmp_path / "never")]) == 2
        one_error_line(capsys.readouterr().err, needle)
    assert cli.run(["probe", "--out", str(tmp_path / "pr")]) == 2
    one_error_line(capsys.readouterr().err, "--task is required (on the command line or in --config)")
