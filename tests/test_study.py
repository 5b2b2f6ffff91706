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
from raptor.study.run import (
    FitBudget,
    StudyConfig,
    balanced_min_size,
    null_comparison,
    random_partitions,
    run_study,
    shuffled_partitions,
    spearman_ci,
)
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


def test_vit_training_resumes_to_identical_weights(tmp_path, digits8, patch_everywhere):
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
    patch_everywhere(ck, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_vit(TINY_VIT, tcfg, 0.2, 0, x_tr, y_tr, x_te, y_te, tmp_path / "b", tf.mean, tf.std, False)
    patch_everywhere(ck, "save_checkpoint", real)
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


def test_balanced_and_shuffled_partition_nulls():
    found = [list(range(1, 8)), list(range(8, 13))]
    m = balanced_min_size(12, 2)
    bal = random_partitions(12, 2, 10, found, seed=0, min_size=m)
    assert m == 3 and len(bal) == 6  # cuts after 3, 4, 5, 6, 8, 9 (7 is the found one)
    assert all(min(len(p) for p in part) >= 3 for part in bal) and found not in bal
    assert random_partitions(4, 2, 5, [[1, 2], [3, 4]], seed=0, min_size=3) == []  # none exists
    sh = shuffled_partitions(12, [7, 5], 10, seed=0)
    assert len(sh) == 10 and len({str(p) for p in sh}) == 10
    for part in sh:
        assert sorted(x for p in part for x in p) == list(range(1, 13))
        assert sorted(len(p) for p in part) == [5, 7] and all(p == sorted(p) for p in part)
        assert any(p != list(range(p[0], p[-1] + 1)) for p in part)  # not contiguous
    assert shuffled_partitions(3, [1, 2], 10, seed=0) == [[[1, 3], [2]]]  # the only non-contiguous one


def test_null_comparison_gap_and_rank():
    dp = {"r2_mean": 0.8, "accuracy": 0.5}
    null = [{"r2_mean": v, "accuracy": a} for v, a in ((0.6, 0.6), (0.7, 0.7), (0.9, 0.4))]
    c = null_comparison(dp, null)
    assert c["n"] == 3 and c["r2_mean"]["rank"] == 2 and c["r2_mean"]["of"] == 4
    v = [0.6, 0.7, 0.9]
    assert c["r2_mean"]["gap_sigma"] == pytest.approx((0.8 - np.mean(v)) / np.std(v, ddof=1))
    assert c["accuracy"]["rank"] == 3
    assert null_comparison(dp, [])["r2_mean"]["gap_sigma"] is None


def test_matched_swap_effect_removes_the_depth_confound():
    """Swap accuracies that depend on the depth distance alone (no phases): the plain intra − inter contrast
    favours any contiguous partition, the depth-matched effect is exactly 0. Accuracies that drop across a planted
    boundary: the matched effect is positive for the planted phases and ranks first among contiguous partitions."""
    from raptor.study.swap import _unmatched, matched_swap_effect

    L = 8
    drift = {(i, j): 1 - 0.05 * abs(i - j) for i in range(1, L + 1) for j in range(1, L + 1) if i != j}
    for phases in ([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2], [3, 4, 5, 6, 7, 8]]):
        assert _unmatched(drift, phases) > 0.05
        assert matched_swap_effect(drift, phases)["effect"] == pytest.approx(0, abs=1e-12)
    planted = [[1, 2, 3], [4, 5, 6, 7, 8]]
    side = {t: 0 if t <= 3 else 1 for t in range(1, L + 1)}
    acc = {(i, j): drift[i, j] - (0.3 if side[i] != side[j] else 0) for (i, j) in drift}
    eff = matched_swap_effect(acc, planted)
    assert eff["effect"] == pytest.approx(0.3) and set(eff["by_lag"]) == {"1", "2", "3", "4"}
    others = [matched_swap_effect(acc, [list(range(1, c + 1)), list(range(c + 1, L + 1))])["effect"]
              for c in range(1, L) if c != 3]
    assert all(e is None or e < eff["effect"] - 1e-9 for e in others)


def test_partial_spearman_removes_a_shared_driver():
    """x and y both follow z with independent noise: Spearman is high, the partial ρ given z is not (its CI covers
    0); a shared component beyond z stays."""
    from scipy.stats import spearmanr

    from raptor.study.run import partial_spearman_ci

    rng = np.random.default_rng(1)
    z = np.repeat(np.arange(10.0), 3)
    x, y = z + rng.normal(0, 1, 30), z + rng.normal(0, 1, 30)
    assert spearmanr(x, y).statistic > 0.8
    c = partial_spearman_ci(x, y, z)
    assert c["n"] == 30 and c["ci95"][0] < 0 < c["ci95"][1] and abs(c["rho"]) < 0.4 and c["p_value"] > 0.05
    e = rng.normal(0, 1, 30)
    s = partial_spearman_ci(z + e, z + e + rng.normal(0, 0.2, 30), z)
    assert s["rho"] > 0.8 and s["ci95"][0] > 0.5 and s["p_value"] < 0.001
    assert partial_spearman_ci([1, 2, 3], [1, 2, 3], [1, 2, 3])["rho"] is None  # too few runs


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


@pytest.mark.slow
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
    # depth 4, k = 2: balanced phases need >= 2 layers (only 2/2 exists), shuffled ones keep the DP sizes
    assert set(f["nulls"]) == {"balanced", "shuffled"} and len(f["shuffled"]) >= 1
    assert all(x["phases"] != f["dp"]["phases"] for fam in ("balanced", "shuffled") for x in f[fam])
    for x in f["shuffled"]:
        assert any(p != list(range(p[0], p[-1] + 1)) for p in x["phases"])  # fitted with non-contiguous phases
    assert f["nulls"]["shuffled"]["r2_mean"]["of"] == len(f["shuffled"]) + 1
    assert math.isfinite(f["dp"]["r2_mean"]) and 0 <= f["dp"]["accuracy"] <= 1
    assert set(r["swap"]["by_n"]["1"]) == {"intra", "inter"}
    m = r["swap"]["matched"]
    assert m["null_n"] == 2 and 0 < m["p_value"] <= 1 and m["effect"] is not None  # 3 two-phase cuts of 4 layers
    assert study["partition_nulls"]["2"]["shuffled"]["r2_mean"]["runs"] == 2
    assert study["correlations"]["rho(p, mean_layer_similarity)"]["n"] == 2
    report = (tmp_path / "s/report.md").read_text()
    assert "## Correlations across the sweep" in report and "## Layer swaps" in report
    assert "## Found phases against partition nulls" in report and "## Depth-matched swaps" in report
    refs = {r["reference"]["kind"]: r for r in study["references"]}
    assert set(refs) == {"untrained", "overfit"} and refs["untrained"]["train"]["history"] == []
    assert refs["overfit"]["train"]["train"]["epochs"] == 8 and not refs["overfit"]["fits"]["2"]["nulls"]
    assert "## Figure 13 reference points" in report
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
    # a sweep is finished on the device it started on (as if it had run on a GPU: this one ran on the CPU)
    rec = json.loads((tmp_path / "s/config.json").read_text())
    assert rec["device_type"] == "cpu"
    (tmp_path / "s/config.json").write_text(json.dumps({**rec, "device_type": "cuda"}))
    with pytest.raises(RaptorError, match="run on the cuda; finishing it on the cpu would mix devices"):
        run_study(cfg, progress=False)


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
    (["--device", "cuda"], "sees no CUDA GPU"), (["--device", "tpu"], "bad --device"),
    (["--log-to", "csv"], "bad --log-to"), (["--log-every", "0"], "--log-every must be >= 1"),
])
def test_study_bad_input_is_one_error_line(tmp_path, capsys, monkeypatch, args, needle):
    from raptor.cli import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    assert run(["study", "--out", str(tmp_path / "o"), "--no-progress", *args]) == 2
    one_error_line(capsys.readouterr().err, needle)
    assert not (tmp_path / "o").exists()
