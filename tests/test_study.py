"""`raptor study`: the ViT trainer (HF Dinov2 classifier, uniform stochastic depth, exact resume), random partitions,
Spearman with bootstrap CIs, the layer-swap test, and a micro-sweep that resumes after an interruption without
retraining finished runs."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from clirun import one_error_line
from raptor.study.run import FitBudget, StudyConfig, random_partitions, run_study, spearman_ci
from raptor.study.vit import TrainConfig, ViTConfig, build_model, load_split, train_vit

TINY_VIT = ViTConfig(image_size=8, patch_size=4, dim=16, depth=4, heads=2)


@pytest.fixture(scope="module")
def digits8():
    return load_split("bundled:digits", 8, limit=120)


def test_uniform_stochastic_depth_is_the_hf_drop_path():
    m = build_model(TINY_VIT, 10, 0.3, seed=0)
    rates = [layer.drop_path.drop_prob for layer in m.dinov2.encoder.layer]
    assert rates == [0.3] * TINY_VIT.depth  # the same p in every block, as the paper's study
    assert isinstance(build_model(TINY_VIT, 10, 0.0, 0).dinov2.encoder.layer[0].drop_path, torch.nn.Identity)


def test_vit_training_resumes_to_identical_weights(tmp_path, digits8, monkeypatch):
    x_tr, y_tr, x_te, y_te, _, _, _, tf = digits8
    tcfg = TrainConfig(epochs=3, batch_size=32, warmup_epochs=1)
    full = train_vit(TINY_VIT, tcfg, 0.2, 0, x_tr, y_tr, x_te, y_te, tmp_path / "a", tf.mean, tf.std, False)
    # interrupt the second run after its second epoch's checkpoint, then resume
    import raptor.surrogate.checkpoint as ck

    real, calls = ck.save_checkpoint, []

    def save_then_stop(*a, **k):
        out = real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return out
    monkeypatch.setattr(ck, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_vit(TINY_VIT, tcfg, 0.2, 0, x_tr, y_tr, x_te, y_te, tmp_path / "b", tf.mean, tf.std, False)
    monkeypatch.setattr(ck, "save_checkpoint", real)
    resumed = train_vit(TINY_VIT, tcfg, 0.2, 0, x_tr, y_tr, x_te, y_te, tmp_path / "b", tf.mean, tf.std, False)
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a/model/model.safetensors"))
    b = load_file(str(tmp_path / "b/model/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the saved model is a teacher through the contract, with the same accuracy as the HF classifier
    from raptor.teachers import load_teacher

    t = load_teacher(f"hf:{tmp_path / 'a/model'}")
    with torch.no_grad():
        logits = t.classify(t.run_blocks(t.embed(x_te), 0), t.layout(8))
    assert float((logits.argmax(1) == y_te).float().mean()) == pytest.approx(full["test_accuracy"])


def test_random_partitions_are_distinct_contiguous_and_exclude_the_found_ones():
    found = [[1, 2, 3], [4, 5, 6, 7, 8]]
    parts = random_partitions(8, 2, 10, found, seed=0)
    assert len(parts) == 6  # only 7 two-phase splits of 8 layers exist, minus the found one
    assert found not in parts and len({str(p) for p in parts}) == 6
    for p in random_partitions(12, 3, 10, [[1], [2], list(range(3, 13))], seed=1):
        assert [x for ph in p for x in ph] == list(range(1, 13)) and len(p) == 3 and all(p)


def test_spearman_with_bootstrap_ci():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    x = np.arange(20.0)
    y = x + rng.normal(0, 3, 20)
    c = spearman_ci(x, y)
    assert c["rho"] == pytest.approx(spearmanr(x, y).statistic)
    assert c["ci95"][0] <= c["rho"] <= c["ci95"][1] and c["ci95"][1] - c["ci95"][0] < 0.5
    assert spearman_ci([1, 1, 1], [1, 2, 3])["rho"] is None  # constant input: undefined, not 0


def _tiny_study(out: Path, sd=(0.0, 0.5)) -> StudyConfig:
    return StudyConfig(data="bundled:digits", out=str(out), sd=sd, seeds=(0,), ks=(2,), random_partitions=2,
                       swap_samples=2, limit=120, vit=TINY_VIT, train=TrainConfig(epochs=2, batch_size=32),
                       fit=FitBudget(steps1=4, steps2=2, batch_size=8, val_images=16, stats_images=32))


def test_micro_sweep_resumes_without_retraining(tmp_path):
    cfg = _tiny_study(tmp_path / "s")

    def stop(name):
        raise KeyboardInterrupt(name)
    with pytest.raises(KeyboardInterrupt):
        run_study(cfg, progress=False, after_run=stop)
    first = tmp_path / "s/runs/p0_s0"
    stamps = {f: f.stat().st_mtime_ns for f in (first / "result.json", first / "vit/train.json",
                                                first / "fit_k2/metrics.json")}
    assert not (tmp_path / "s/runs/p0.5_s0").exists() and not (tmp_path / "s/study.json").exists()
    study = run_study(cfg, progress=False)
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps  # nothing of the finished run was redone
    assert [(r["p"], r["seed"]) for r in study["runs"]] == [(0.0, 0), (0.5, 0)]
    r = study["runs"][1]
    assert 0 <= r["teacher_accuracy"] <= 1 and 0 <= r["phases"]["mean_layer_similarity"] <= 1
    f = r["fits"]["2"]
    assert len(f["random"]) == 2 and f["dp"]["phases"] not in [x["phases"] for x in f["random"]]
    assert math.isfinite(f["dp"]["r2_mean"]) and 0 <= f["dp"]["accuracy"] <= 1
    assert set(r["swap"]["by_n"]["1"]) == {"intra", "inter"}
    assert study["correlations"]["rho(p, mean_layer_similarity)"]["n"] == 2
    report = (tmp_path / "s/report.md").read_text()
    assert "## Correlations across the sweep" in report and "## Layer swaps" in report
    for fig in study["figures"].values():
        assert (tmp_path / "s" / fig).stat().st_size > 1000
    saved = json.loads((tmp_path / "s/study.json").read_text())
    assert len(saved["runs"]) == 2
    # the same directory refuses a study with other model settings
    from raptor.errors import RaptorError

    other = _tiny_study(tmp_path / "s")
    other.vit = ViTConfig(image_size=8, patch_size=4, dim=16, depth=5, heads=2)
    with pytest.raises(RaptorError, match="other settings"):
        run_study(other, progress=False)


def test_layer_swap_with_itself_changes_nothing(digits8):
    from raptor.study.swap import layer_swap_test, swapped_accuracy
    from raptor.teachers.base import ClassifierHead
    from raptor.teachers.hf import HFTeacher

    x_tr, y_tr, x_te, y_te, *_ = digits8
    m = build_model(TINY_VIT, 10, 0.0, seed=0).eval()
    t = HFTeacher(m.dinov2, "dinov2", spec="test", head=ClassifierHead(m.classifier, "cls+meanpatch"))
    lay = t.layout(8)
    base = swapped_accuracy(t, x_te, y_te, lay, {})
    assert swapped_accuracy(t, x_te, y_te, lay, {1: 1, 2: 2}) == base
    with torch.no_grad():
        ref = float((m(pixel_values=x_te).logits.argmax(1) == y_te).float().mean())
    assert base == pytest.approx(ref)
    res = layer_swap_test(t, x_te, y_te, lay, [[1, 2], [3, 4]], samples=3, seed=0)
    assert res["baseline_accuracy"] == base and set(res["by_n"]) == {"1", "2", "3"}
    assert set(layer_swap_test(t, x_te, y_te, lay, [[1], [2, 3], [4]], samples=2)["by_n"]) == {"1", "2"}  # 2 movable


@pytest.mark.parametrize("args, needle", [
    (["--sd", "1.0"], "[0, 1)"), (["--sd", "0,0"], "repeat"), (["--ks", "1"], "--ks"), (["--ks", "12"], "--ks"),
    (["--data", "bundled:photos"], "unlabelled"), (["--sd", "x"], "--sd"), (["--depth", "2"], "depth"),
    (["--image-size", "10"], "multiple"), (["--epochs", "0"], "epochs"), (["--random", "-1"], "--random"),
])
def test_study_bad_input_is_one_error_line(tmp_path, capsys, args, needle):
    from raptor.cli import run

    assert run(["study", "--out", str(tmp_path / "o"), "--no-progress", *args]) == 2
    one_error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "o").exists()
