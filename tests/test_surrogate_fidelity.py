"""Fidelity machinery: planted recurrence is recovered, normalised loss, fp32 gates, explicit group weights, the
hold-out split, training-set statistics and baselines against direct references, fresh probes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from raptor.errors import RaptorError
from raptor.surrogate.batches import holdout_split
from raptor.surrogate.block import BlockConfig, RaptorBlock
from raptor.surrogate.config import FitConfig
from raptor.surrogate.fit import run_fit
from raptor.surrogate.losses import effective_group_weights, token_loss
from raptor.surrogate.stats import TrajectoryStats, ridge_predict
from raptor.teachers import load_teacher
from raptor.teachers.base import TokenLayout

PLANTED = "planted:2,depth=6,gain=0.6,base=tiny:dinov2"


def test_planted_teacher_is_k_tied_blocks_through_the_contract():
    t = load_teacher(PLANTED)
    assert t.depth == 6 and t.phases == [[1, 2, 3], [4, 5, 6]] and len(t.tied) == 2
    x = torch.randn(2, 3, 28, 28)
    traj = t.trajectory(x)
    blk = t.tied[1]
    assert torch.allclose(traj[:, 5], blk(traj[:, 4], 5), atol=1e-6)  # layer 5 = block 1 at t=5 on layer 4
    assert torch.allclose(traj[:, 6], blk(traj[:, 5], 6), atol=1e-6)
    step = (traj[:, 1:] - traj[:, :-1]).norm(dim=-1).mean() / traj[:, 0].norm(dim=-1).mean()
    assert step > 0.1  # layers really move
    with pytest.raises(RaptorError, match="planted"):
        load_teacher("planted:2,ends=3/5,depth=6,base=tiny:dinov2")
    with pytest.raises(RaptorError, match="planted"):
        load_teacher("planted:x")


@pytest.mark.slow
def test_planted_recurrence_is_recovered_by_raptor_fit(tmp_path):
    """A teacher whose layers *are* 2 tied blocks: `raptor fit` (unchanged, online teacher) recovers it on held-out
    images to mean AR R^2 >= 0.95, far above the identity and copy-layer-0 baselines."""
    cfg = FitConfig(teacher=PLANTED, data="bundled:digits", limit=400, k=2, steps1=300, steps2=200, batch_size=16,
                    lr=3e-3, image_size=28, val_images=64, stats_images=64, probe_limit=100, ckpt_every=1000,
                    out=str(tmp_path / "planted"))
    v = run_fit(cfg, progress=False)["validation"]
    ar = v["autoregressive"]
    assert v["n_images"] == 64
    assert ar["r2_mean"] >= 0.95, ar["r2"]
    assert min(ar["r2"]) >= 0.85
    assert ar["r2_mean"] > v["baselines"]["identity"]["r2_mean"] + 0.1
    assert ar["r2_mean"] > v["baselines"]["copy_layer0"]["r2_mean"] + 0.5
    assert v["image_level"]["autoregressive"]["r2"] > 0.8
    assert ar["r2_image_specific_mean"] >= 0.9 and ar["r2_image_specific_ci95"][0] >= 0.85
    probes = v["probes"]["backbones"]
    assert probes["full (0-6)"]["teacher_probe_agreement"] >= 0.8


def test_depth_gates_are_float32_under_bf16_autocast():
    blk = RaptorBlock(BlockConfig(32, 2))
    with torch.no_grad():
        blk.t_proj[2].bias.add_(1e-3)
    ref = blk.gates(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g = blk.gates(5)
    assert all(x.dtype == torch.float32 for x in g)
    assert all(torch.equal(a, b) for a, b in zip(g, ref))
    assert len(torch.unique(g[0])) > 3  # bf16 would round 1 + small to {0.9961, 1.0, 1.0078}


def test_group_weights_are_used_as_given_when_a_group_is_absent():
    no_reg = TokenLayout(1, 0, (2, 2))
    y = torch.randn(3, no_reg.n_tokens, 8)
    p = y + torch.randn(y.shape)
    w = (0.45, 0.10, 0.45)
    got = token_loss(p, y, "mse", no_reg, w)
    ref = 0.45 * ((p[:, :1] - y[:, :1]) ** 2).mean() + 0.45 * ((p[:, 1:] - y[:, 1:]) ** 2).mean()
    assert torch.isclose(got, ref)
    assert effective_group_weights(no_reg, w) == {"cls": 0.45, "registers": 0.0, "patches": 0.45}


def test_normalised_loss_is_one_minus_r2_per_group():
    lay = TokenLayout(1, 2, (2, 2))
    g = torch.Generator().manual_seed(0)
    traj = torch.randn(40, 3, lay.n_tokens, 6, generator=g) * torch.tensor([1.0, 5.0, 50.0]).view(1, 3, 1, 1)
    acc = TrajectoryStats(3, lay.n_tokens, 6, lay)
    acc.update(traj[:25])
    acc.update(traj[25:])
    st = acc.result()
    for layer in range(3):
        flat = traj[:, layer].reshape(-1, 6).double()
        assert st.var["all"][layer] == pytest.approx(float(flat.var(0, unbiased=False).mean()), rel=1e-5)
    # predicting the per-feature mean gives normalised MSE ~1 on every layer, whatever its scale
    for layer in range(3):
        y = traj[:, layer]
        m = y.reshape(-1, 6).mean(0).expand_as(y)
        assert float(token_loss(m, y, "mse", lay, None, st.scale(layer))) == pytest.approx(1.0, rel=1e-4)
    assert torch.allclose(st.position_mean, traj.mean(0), atol=1e-5)


def test_ridge_baseline_matches_a_direct_least_squares_fit():
    lay = TokenLayout(1, 0, (2, 2))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(60, lay.n_tokens, 5, generator=g)
    A = torch.randn(5, 5, generator=g)
    x1 = x0 @ A + 0.3 + 0.01 * torch.randn(x0.shape, generator=g)
    traj = torch.stack([x0, x1], 1)
    acc = TrajectoryStats(2, lay.n_tokens, 5, lay)
    acc.update(traj)
    st = acc.result()
    X = torch.cat([x0.reshape(-1, 5), torch.ones(60 * lay.n_tokens, 1)], 1).double()
    W = torch.linalg.lstsq(X, x1.reshape(-1, 5).double()).solution
    pred = ridge_predict(st.ridge, x0, 1)
    assert torch.allclose(pred.double(), (X @ W).reshape(pred.shape), atol=2e-3)


def test_holdout_split_is_whole_images_spread_and_warns_when_small():
    tr, val = holdout_split(1797, 128)
    assert len(val) == 128 and len(tr) == 1797 - 128 and not set(tr) & set(val)
    assert val.min() == 0 and val.max() == 1796
    with pytest.warns(UserWarning, match="only 5 of 25"):
        tr, val = holdout_split(25, 128)
    assert len(val) == 5
    with pytest.raises(RaptorError):
        holdout_split(3, 128)


def test_fit_reports_baselines_groups_image_level_and_fresh_probes(tmp_path):
    cfg = FitConfig(teacher="tiny:dinov2_with_registers", data="bundled:digits", limit=120, k=2, steps1=3,
                    steps2=3, batch_size=4, val_images=24, stats_images=32, probe_limit=40, probe_data=None,
                    stage2_weights=(0.45, 0.10, 0.45), out=str(tmp_path / "r"))
    m = run_fit(cfg, progress=False)
    v = m["validation"]
    assert set(v["baselines"]) == {"identity", "copy_layer0", "position_mean", "ridge_teacher_forced",
                                   "ridge_autoregressive"}
    assert set(v["autoregressive"]["r2_groups"]) == {"cls", "registers", "patches"}
    assert v["n_images"] == 24 and m["n_train_images"] == 96
    assert np.allclose(v["baselines"]["copy_layer0"]["r2"][0], v["baselines"]["identity"]["r2"][0])
    # image-specific R^2: the image-blind position mean scores exactly 0, per layer and token group
    pm = v["baselines"]["position_mean"]
    assert pm["r2_image_specific"] == [0.0] * 3 and pm["r2_image_specific_mean"] == 0.0
    assert all(x == [0.0] * 3 for x in pm["r2_image_specific_groups"].values())
    ar = v["autoregressive"]
    assert len(ar["r2_image_specific"]) == 3 and ar["r2_image_specific_ci95"][0] <= ar["r2_image_specific_mean"] \
        <= ar["r2_image_specific_ci95"][1]
    assert set(ar["r2_image_specific_groups"]) == {"cls", "registers", "patches"}
    p = v["probes"]
    assert p["n_test"] == 24 and p["n_train"] == 40 and "bundled:digits" in p["data"]
    t = p["backbones"]["teacher"]
    assert t["pct_of_teacher"] == pytest.approx(100.0) and t["teacher_probe_agreement"] == 1.0
    assert m["group_weights"]["stage2"] == {"cls": 0.45, "registers": 0.1, "patches": 0.45}
    from raptor.surrogate.report import load_run, report

    text = report([load_run(tmp_path / "r")])
    assert "| `r` | tiny:dinov2_with_registers | 2 |" in text and "ridge chained" in text
    assert text.startswith("Discriminating measures") and "paper's R² of the position mean" in text
    with pytest.raises(RaptorError, match="cannot read a finished run"):
        load_run(tmp_path / "missing")
    # the run folder: its metrics.json follows the published schema; a run missing a required key is refused
    import jsonschema

    from raptor.surrogate.run_dir import FitRun, metrics_schema

    run = FitRun(tmp_path / "r")
    jsonschema.validate(run.metrics(), metrics_schema())
    assert run.finished and run.teacher_spec == "tiny:dinov2_with_registers"
    assert run.surrogate_config.phases == m["surrogate"]["phases"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.json").write_text(json.dumps({k: v for k, v in m.items() if k != "validation"}))
    with pytest.raises(RaptorError, match="missing validation"):
        FitRun(broken).metrics()
    assert not FitRun(broken).finished


def test_every_committed_fit_result_follows_the_metrics_schema():
    """The metrics.json of every run whose tables the docs publish validates against the shipped schema."""
    import jsonschema

    from raptor.surrogate.run_dir import metrics_schema

    files = sorted((Path(__file__).parents[1] / "docs" / "results").rglob("metrics.json"))
    assert len(files) >= 20
    for f in files:
        jsonschema.validate(json.loads(f.read_text()), metrics_schema())


def test_cli_phase_and_weight_parsing(tmp_path):
    from raptor.phases import parse_phases
    from raptor.surrogate.losses import parse_weights

    assert parse_phases("1-7/8-11/12") == [list(range(1, 8)), [8, 9, 10, 11], [12]]
    (tmp_path / "a.json").write_text("{}")
    assert parse_phases(str(tmp_path / "a.json")) is None  # a file: an analysis.json
    with pytest.raises(RaptorError, match="backwards"):
        parse_phases("1-7/11-8")
    assert parse_weights("0.45,0.1,0.45", "--w") == (0.45, 0.1, 0.45) and parse_weights("none", "--w") is None
    for bad in ("1,2", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(RaptorError):
            parse_weights(bad, "--w")


def test_a_refused_fit_touches_no_output(tmp_path):
    """Bad settings, bad phases and a run dir that already holds a run are refused before anything is written:
    the finished run's metrics.json and config.yaml stay byte-identical and no new directory appears."""
    base = dict(teacher="tiny:dinov2", data="bundled:digits", limit=60, k=2, steps1=2, steps2=2, probe_data=None,
                out=str(tmp_path / "run"))
    run_fit(FitConfig(**base), progress=False)
    before = {f: (tmp_path / "run" / f).read_bytes() for f in ("metrics.json", "config.yaml")}
    bad = [(dict(stats_images=0), False, "stats_images"), (dict(lr2=0.0), False, "lr2"),
           (dict(loss_norm="magic"), False, "loss_norm"), ({}, False, "pass resume to continue"),
           (dict(lr=1e-3), True, r"other settings: lr 0.003 -> 0.001"),
           (dict(k=None, phases_file=str(tmp_path / "missing.json")), False, "cannot read phases file")]
    for change, resume, msg in bad:
        with pytest.raises(RaptorError, match=msg):
            run_fit(FitConfig(**{**base, **change}), resume=resume, progress=False)
    assert {f: (tmp_path / "run" / f).read_bytes() for f in before} == before
    for change, msg in ((dict(k=None, phases=[[1, 2], [4]]), "phases must cover layers"),
                        (dict(teacher="planted:0,base=tiny:dinov2"), "k >= 1")):
        with pytest.raises(RaptorError, match=msg):
            run_fit(FitConfig(**{**base, **change, "out": str(tmp_path / "fresh")}), progress=False)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.slow
def test_stage2_from_a_stage1_run_equals_one_run_of_both_stages(tmp_path):
    """`--stage 1` then `--stage 2 --init-from` that run trains exactly what `--stage both` trains (the official code
    runs its stages separately); mismatched phases and two starting points are refused before anything is written."""
    from raptor.surrogate.checkpoint import load_tensors

    base = dict(teacher="tiny:dinov2", data="bundled:digits", limit=60, k=2, steps1=3, steps2=3, batch_size=4,
                lr=1e-3, val_images=12, stats_images=16, probe_data=None)
    both = run_fit(FitConfig(**base, out=str(tmp_path / "both")), progress=False)
    run_fit(FitConfig(**base, stage="1", out=str(tmp_path / "s1")), progress=False)
    two = run_fit(FitConfig(**base, stage="2", init_from=str(tmp_path / "s1"), out=str(tmp_path / "s2")),
                  progress=False)
    assert np.allclose(two["loss_history"]["stage2"], both["loss_history"]["stage2"], rtol=1e-5, atol=0)
    w_both, w_two = (load_tensors(tmp_path / r / "model.safetensors") for r in ("both", "s2"))
    assert w_both.keys() == w_two.keys()
    for name in w_both:
        assert torch.allclose(w_both[name], w_two[name], rtol=1e-4, atol=1e-6), name
    again = run_fit(FitConfig(**base, stage="2", init_from=str(tmp_path / "s1"), out=str(tmp_path / "s2"),
                              val_every=1), resume=True, progress=False)  # re-evaluation keeps the training time
    assert again["train_seconds"] == two["train_seconds"] > 0
    from raptor.surrogate.report import load_run, report

    text = report([load_run(tmp_path / "both"), load_run(tmp_path / "s2")])  # the same training twice
    assert "| `s2` (stage 1: `s1`) | tiny:dinov2 | 2 |" in text and "| 3 / 3 × 4 |" in text
    r2, spec = (both["validation"]["autoregressive"][k] for k in ("r2_mean", "r2_image_specific_mean"))
    assert f"| 0, 0 | `both`, `s2` | **{spec:.3f} ± 0.000** |" in text and f"| {r2:.3f} ± 0.000 |" in text
    other = load_run(tmp_path / "both")  # another recipe (an image-level loss) is never one of its seeds
    other["config"] = {**other["config"], "image_loss": 1.0}
    assert "Over seeds" not in report([other, load_run(tmp_path / "s2")])
    for change, msg in ((dict(k=3), "phases"), (dict(init_from_teacher=True), "give one"),
                        (dict(init_from=str(tmp_path / "nowhere")), "not found"),
                        (dict(init_from=str(tmp_path / "s1" / "surrogate.json")), "is a file, not a raptor fit run"),
                        (dict(init_from=str(tmp_path)), "not a finished raptor fit run")):
        cfg = FitConfig(**{**base, "stage": "2", "init_from": str(tmp_path / "s1"), **change,
                           "out": str(tmp_path / "refused")})
        with pytest.raises(RaptorError, match=msg):
            run_fit(cfg, progress=False)
    assert not (tmp_path / "refused").exists()


def test_image_specific_r2_is_relative_to_the_image_blind_reference():
    """1 - SSE / SSE of the reference: the reference itself scores 0, the target 1, and a prediction halfway from the
    reference to the target 0.75 (its error is half the reference's: a quarter of the squared error)."""
    from raptor.surrogate.metrics import LayerFitAccumulator
    from raptor.teachers.base import TokenLayout

    g = torch.Generator().manual_seed(0)
    y = torch.randn(6, 2, 5, 8, generator=g)
    ref = torch.randn(1, 2, 5, 8, generator=g)
    for pred, want in ((ref.expand_as(y), 0.0), (y, 1.0), ((y + ref) / 2, 0.75)):
        acc = LayerFitAccumulator(2, 8, TokenLayout(1, 0, (2, 2)))
        acc.update(pred[:3], y[:3], ref)
        acc.update(pred[3:], y[3:], ref)
        r = acc.result()
        assert r["r2_image_specific"] == pytest.approx([want, want], abs=1e-6)
        lo, hi = r["r2_image_specific_ci95"]
        assert lo <= want + 1e-6 and hi >= want - 1e-6


def test_image_level_loss_is_one_for_a_collapse_and_zero_when_exact():
    from raptor.surrogate.losses import image_level_loss
    from raptor.teachers.base import TokenLayout

    layout = TokenLayout(1, 0, (2, 2))
    g = torch.Generator().manual_seed(1)
    t = torch.randn(8, 5, 16, generator=g)
    collapse = t.mean(0, keepdim=True).expand_as(t)  # every image the batch's mean tokens
    assert float(image_level_loss(collapse, t, layout)) == pytest.approx(1.0, abs=1e-6)
    assert float(image_level_loss(t, t, layout)) == 0.0
    assert float(image_level_loss(t + 5.0, t, layout)) > 1  # a shifted copy is worse than the collapse


def test_bootstrap_ci_resamples_photos_when_views_are_grouped():
    """Six identical views of each of 20 photos: grouped by photo, the CI is the 20 photos' CI (the views add no
    information); treated as 120 independent rows it would be narrower."""
    from raptor.surrogate.metrics import bootstrap_ratio_ci

    g = torch.Generator().manual_seed(3)
    sse, ref = torch.rand(20, 4, generator=g, dtype=torch.float64), 1 + torch.rand(20, 4, generator=g,
                                                                                     dtype=torch.float64)
    photos = bootstrap_ratio_ci(sse, ref, seed=1)
    rep = torch.arange(20).repeat_interleave(6)
    grouped = bootstrap_ratio_ci(sse[rep], ref[rep], seed=1, groups=rep)
    assert grouped == pytest.approx(photos, abs=1e-12)
    naive = bootstrap_ratio_ci(sse[rep], ref[rep], seed=1)
    assert naive[1] - naive[0] < 0.6 * (photos[1] - photos[0])
