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


STUDY = ["study", "--data", "bundled:digits", "--limit", "120", "--sd", "0", "--seeds", "0", "--ks", "2", "--random",
         "0", "--swap-samples", "0", "--no-references", "--image-size", "8", "--patch-size", "4", "--dim", "16",
         "--depth", "4", "--heads", "2", "--epochs", "1", "--batch-size", "32", "--steps1", "2", "--steps2", "1",
         "--no-progress"]


@pytest.mark.slow
def test_a_study_rerun_from_its_own_config_reproduces_it(tmp_path, capsys):
    """The study's config.yaml nests the ViT, its training and the fit budget: a re-run from it reproduces the
    sweep; a flag on the command line overrides a nested setting."""
    assert cli.run([*STUDY, "--out", str(tmp_path / "a")]) == 0
    assert cli.run(["study", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(tmp_path / "b"),
                    "--no-progress"]) == 0
    a, b = (json.loads((tmp_path / r / "study.json").read_text())["runs"][0] for r in ("a", "b"))
    assert b["train"]["history"] == a["train"]["history"] and b["phases"] == a["phases"]
    assert b["fits"]["2"]["dp"]["r2_mean"] == a["fits"]["2"]["dp"]["r2_mean"]
    ca, cb = (yaml.safe_load((tmp_path / r / "config.yaml").read_text()) for r in ("a", "b"))
    assert {k: v for k, v in ca.items() if k != "out"} == {k: v for k, v in cb.items() if k != "out"}
    capsys.readouterr()


def test_study_config_nested_settings_override_and_refusals(tmp_path, capsys, monkeypatch):
    import raptor.study.run as study_run
    from raptor.config import save_config, to_dict
    from raptor.study.run import FitBudget, StudyConfig
    from raptor.study.vit import TrainConfig, ViTConfig

    seen = []

    def fake(cfg, progress=True):
        seen.append(cfg)
        raise SystemExit(0)  # the config is what is tested; nothing runs

    monkeypatch.setattr(study_run, "run_study", fake)
    ref = StudyConfig(data="bundled:digits", out=str(tmp_path / "x"), sd=(0.0, 0.3), seeds=(1, 2), ks=(2, 3),
                      random_partitions=4, swap_samples=3, references=False, limit=200,
                      vit=ViTConfig(image_size=8, patch_size=4, dim=16, depth=6, heads=2),
                      train=TrainConfig(epochs=7, batch_size=16, lr=1e-3, flip=True),
                      fit=FitBudget(steps1=9, steps2=5, batch_size=12), log_to=("jsonl",))
    f = tmp_path / "study.yaml"
    save_config(ref, f)
    with pytest.raises(SystemExit):
        cli.run(["study", "--config", str(f), "--epochs", "3", "--random", "2", "--steps2", "4", "--out",
                 str(tmp_path / "y"), "--no-progress"])
    got = to_dict(seen[-1])
    want = to_dict(ref)
    want["out"] = str(tmp_path / "y")
    want["train"]["epochs"], want["random_partitions"], want["fit"]["steps2"] = 3, 2, 4  # the flags win
    assert got == want  # everything else from the file, the fit budget's own batch size included
    for text, needle in (("train:\n  bogus: 1\n", "unknown key 'train.bogus'"),
                         ("vit:\n  depth: x\n", "vit.depth must be an integer, got 'x'"),
                         ("vit: 3\n", "vit must be a mapping of its settings"),
                         ("fit:\n  steps1: [1]\n", "fit.steps1 must be an integer")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        assert cli.run(["study", "--config", str(bad), "--out", str(tmp_path / "never"), "--no-progress"]) == 2
        one_error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "never").exists()


def test_ablation_config_nests_the_full_model_and_replays(tmp_path, capsys, monkeypatch):
    """The ablation's config.yaml (the full model's FitConfig under ``fit``, beside row 6's probe_data and
    init_head) gives back the same AblationConfig; flags override nested FitConfig settings and a fit's own flat
    config.yaml is taken as the full model."""
    import raptor.ablation as ablation
    from raptor.ablation import AblationConfig
    from raptor.config import save_config, to_dict
    from raptor.surrogate.config import FitConfig

    seen = []
    monkeypatch.setattr(ablation, "run_ablation", lambda cfg, progress=True: seen.append(cfg) or {"rows": []})
    monkeypatch.setattr(ablation, "console_summary", lambda res, out: [])
    fit = FitConfig(teacher="tiny:dinov2", data="bundled:digits", limit=60, phases=[[1, 2], [3]], steps1=3, steps2=2,
                    batch_size=4, lr=2e-3, val_images=12, stats_images=16, probe_data=None, seed=5,
                    out=str(tmp_path / "a"))
    ref = AblationConfig(out=str(tmp_path / "a"), fit=fit, probe_data="bundled:digits", init_head="teacher")
    save_config(ref, tmp_path / "abl.yaml")
    assert cli.run(["ablation", "--config", str(tmp_path / "abl.yaml"), "--out", str(tmp_path / "a"),
                    "--no-progress"]) == 0
    assert to_dict(seen[-1]) == to_dict(ref)
    assert cli.run(["ablation", "--config", str(tmp_path / "abl.yaml"), "--steps2", "1", "--out",
                    str(tmp_path / "b"), "--no-progress"]) == 0
    got = to_dict(seen[-1])
    assert got["out"] == got["fit"]["out"] == str(tmp_path / "b") and got["fit"]["steps2"] == 1
    assert got["fit"]["seed"] == 5 and got["fit"]["phases"] == [[1, 2], [3]] and got["init_head"] == "teacher"
    save_config(fit, tmp_path / "fit.yaml")  # a fit's own config.yaml: the full model, no row 6
    assert cli.run(["ablation", "--config", str(tmp_path / "fit.yaml"), "--out", str(tmp_path / "a"),
                    "--no-progress"]) == 0
    assert to_dict(seen[-1].fit) == to_dict(fit) and seen[-1].probe_data is None
    (tmp_path / "bad.yaml").write_text("fit:\n  stepz: 1\n")
    assert cli.run(["ablation", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "n"),
                    "--no-progress"]) == 2
    one_error_line(capsys.readouterr().err, "unknown key 'stepz'")
    (tmp_path / "bad.yaml").write_text("fit: {}\nrows: 3\n")
    assert cli.run(["ablation", "--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "n"),
                    "--no-progress"]) == 2
    one_error_line(capsys.readouterr().err, "unknown key 'rows'")
