"""Surrogate model, losses, metrics, training: exact resume, NaN stop, splicing, R^2 definitions, CLI."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from raptor.errors import RaptorError
from raptor.phases import equal_phases, phases_from_analysis
from raptor.surrogate.block import BlockConfig
from raptor.surrogate.config import FitConfig
from raptor.surrogate.fit import run_fit
from raptor.surrogate.losses import token_loss
from raptor.surrogate.metrics import LayerFitAccumulator
from raptor.surrogate.model import RaptorModel, SurrogateConfig
from raptor.teachers.base import TokenLayout
from raptor.teachers.hf import build_tiny_teacher


def _cfg(tmp, **kw):
    base = dict(teacher="tiny:dinov2_with_registers", data="bundled:digits", limit=40, k=2, steps1=4, steps2=4,
                batch_size=4, ckpt_every=2, probe_data=None, out=str(tmp), lr=1e-3)
    base.update(kw)
    return FitConfig(**base)


def test_phases_and_block_assignment():
    assert equal_phases(12, 5) == [[1, 2, 3], [4, 5, 6], [7, 8], [9, 10], [11, 12]]
    m = RaptorModel(SurrogateConfig([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12]], BlockConfig(32, 2)))
    assert m.cfg.segments == [(0, 7), (7, 10), (10, 12)]
    assert [m.block_of[t] for t in range(1, 13)] == [0] * 7 + [1] * 3 + [2] * 2
    assert RaptorModel(SurrogateConfig([[1, 3], [2]], BlockConfig(32, 2))).block_of == {1: 0, 2: 1, 3: 0}
    with pytest.raises(RaptorError):  # layer 2 missing
        RaptorModel(SurrogateConfig([[1], [3]], BlockConfig(32, 2)))


def test_phases_from_analysis_file(tmp_path):
    a = {"chosen": {"phases": [[1, 2, 3, 4, 5], [6, 7, 8, 9], [10, 11, 12]]}, "primary_metric": "m",
         "segmentations": {"m": {"dp": {"2": {"phases": [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]}}}},
         "teacher": {"depth": 12}}
    (tmp_path / "a.json").write_text(json.dumps(a))
    assert phases_from_analysis(tmp_path / "a.json") == a["chosen"]["phases"]
    assert phases_from_analysis(tmp_path / "a.json", 2)[1] == [8, 9, 10, 11, 12]
    with pytest.raises(RaptorError, match="no k=4"):
        phases_from_analysis(tmp_path / "a.json", 4)


def test_cosine_loss_has_the_right_sign_and_group_weights():
    lay = TokenLayout(1, 2, (2, 2))
    y = torch.randn(3, lay.n_tokens, 8)
    assert token_loss(y, y, "cosine", lay).abs() < 1e-6
    assert token_loss(-y, y, "cosine", lay) > 1.9  # opposite vectors: maximal loss, not minimal
    p = y.clone()
    p[:, 0] += 1.0  # error on cls only
    w = token_loss(p, y, "mse", lay, (0.5, 0.0, 0.5))
    assert torch.isclose(w, 0.5 * ((p[:, 0] - y[:, 0]) ** 2).mean())


def test_r2_definitions_match_references():
    from sklearn.metrics import r2_score

    lay = TokenLayout(1, 0, (2, 2))
    g = torch.Generator().manual_seed(0)
    y = torch.randn(6, 2, lay.n_tokens, 4, generator=g) * 3 + 1
    p = y + 0.5 * torch.randn(y.shape, generator=g)
    acc = LayerFitAccumulator(2, 4, lay)
    acc.update(p[:3], y[:3])
    acc.update(p[3:], y[3:])
    r = acc.result()
    for layer in range(2):
        yt = y[:, layer].reshape(-1, 4).double().numpy()
        pt = p[:, layer].reshape(-1, 4).double().numpy()
        assert abs(r["r2"][layer] - r2_score(yt, pt, multioutput="variance_weighted")) < 1e-9
        official = 1 - ((pt - yt) ** 2).mean() / (((pt - pt.mean()) ** 2).mean() + 1e-6)
        assert abs(r["r2_official"][layer] - official) < 1e-9


def test_splice_with_identity_range_is_the_teacher():
    t = build_tiny_teacher("dinov2", seed=0)
    m = RaptorModel(SurrogateConfig(equal_phases(t.depth, 2), BlockConfig(t.dim, 2)))
    x = torch.randn(2, 3, 28, 28)
    full = t.trajectory(x)[:, -1]
    assert torch.allclose(m.splice(t, x, 1, 1), full, atol=1e-6)
    assert not torch.allclose(m.splice(t, x, 0, t.depth), full, atol=1e-3)


@pytest.mark.slow
def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    run_fit(_cfg(tmp_path / "full"), progress=False)

    class Stop(Exception):
        pass

    def stop_at(item, step, loss):  # interrupt in the middle of stage 1, block 1 (after a checkpoint)
        if item.name == "stage1/block1" and step == 3:
            raise Stop
        return loss

    with pytest.raises(Stop):
        run_fit(_cfg(tmp_path / "part"), progress=False, on_step=stop_at)
    with pytest.raises(RaptorError, match="pass resume to continue it"):
        run_fit(_cfg(tmp_path / "part"), progress=False)
    with pytest.raises(RaptorError, match="other settings"):
        run_fit(_cfg(tmp_path / "part", lr=5e-4), resume=True, progress=False)
    ck = json.loads((tmp_path / "part" / "checkpoints" / "latest.json").read_text())["checkpoint"]
    state_file = tmp_path / "part" / "checkpoints" / ck / "state.json"
    st = json.loads(state_file.read_text())
    assert st["train_seconds"] > 0
    state_file.write_text(json.dumps({**st, "train_seconds": "abc"}))  # a damaged checkpoint: one error line
    with pytest.raises(RaptorError, match=r"is damaged: state.json \(ValueError"):
        run_fit(_cfg(tmp_path / "part"), resume=True, progress=False)
    st["train_seconds"] = 1000.0  # as if the interrupted process had trained for 1,000 s
    state_file.write_text(json.dumps(st))
    t = time.perf_counter()
    run_fit(_cfg(tmp_path / "part"), resume=True, progress=False)
    wall = time.perf_counter() - t
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((tmp_path / "full" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "part" / "metrics.json").read_text())
    assert ma["loss_history"] == mb["loss_history"]
    # the recorded training time is the interrupted process's (from its checkpoint) plus the resumed one's
    assert 1000.0 < mb["train_seconds"] < 1000.0 + wall


def test_nan_loss_stops_with_clear_message_and_keeps_last_checkpoint(tmp_path):
    def poison(item, step, loss):
        return loss * float("nan") if item.name == "stage2" and step == 3 else loss

    with pytest.raises(RaptorError, match=r"loss became nan at stage2 step 3.*item2-step0000002"):
        run_fit(_cfg(tmp_path / "r"), progress=False, on_step=poison)
    ck = json.loads((tmp_path / "r" / "checkpoints" / "latest.json").read_text())["checkpoint"]
    assert ck == "item2-step0000002"
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_fit_from_store_writes_metrics_and_plots(tmp_path):
    from raptor.data import open_source
    from raptor.store import extract

    t = build_tiny_teacher("dinov2_with_registers", seed=0)
    extract(t, open_source("bundled:digits").subset(30), tmp_path / "s", progress=False)
    m = run_fit(_cfg(tmp_path / "run", data=None, store=str(tmp_path / "s"), probe_data="bundled:digits",
                     probe_limit=40), progress=False)
    v = m["validation"]
    assert len(v["autoregressive"]["r2"]) == t.depth and "registers" in v["autoregressive"]["cosine"]
    probes = v["probes"]  # the store's own labels (digits), its held-out rows
    assert probes["data"] == "bundled:digits" and probes["n_test"] == v["n_images"] == 6
    assert 0 <= probes["backbones"]["full (0-3)"]["teacher_probe_agreement"] <= 1
    for f in ("metrics.json", "r2_per_layer.png", "loss_curves.png", "model.safetensors", "config.yaml"):
        assert (tmp_path / "run" / f).is_file()


@pytest.mark.slow
def test_cli_fit_errors_are_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "raptor.cli", "fit", "--teacher", "tiny:dinov2", "--data",
                        "bundled:digits", "--out", str(tmp_path / "o")], env=env, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: give --phases (an analysis.json, a phases file or e.g. 1-7/8-12) or --k K"


def test_init_from_teacher_reproduces_teacher_blocks():
    from raptor.surrogate.model import init_from_teacher

    t = build_tiny_teacher("dinov2", seed=5)
    bc = BlockConfig(t.dim, t.blocks[0].attention.config.num_attention_heads, mlp_ratio=2, swiglu=False,
                     t_scale=False)
    m = RaptorModel(SurrogateConfig([[i] for i in range(1, t.depth + 1)], bc))  # one block per layer
    assert init_from_teacher(m, t) == list(range(t.depth))
    x = torch.randn(2, 3, 28, 28)
    traj = t.trajectory(x)
    with torch.no_grad():
        pred = torch.stack(m(traj[:, 0]), dim=1)
    assert (pred - traj[:, 1:]).abs().max().item() <= 1e-5
    with pytest.raises(RaptorError, match="GELU"):
        init_from_teacher(RaptorModel(SurrogateConfig([[1, 2, 3]], BlockConfig(t.dim, 2))), t)


def test_validation_during_training_is_recorded(tmp_path):
    m = run_fit(_cfg(tmp_path / "v", val_every=2), progress=False)
    vals = m["loss_history"]["val/stage2"]
    assert [v[0] for v in vals] == [2, 4] and all(-10 < v[1] <= 1 for v in vals)


def test_probes_and_head_agreement_are_exact_for_a_surrogate_that_is_the_teacher():
    import numpy as np
    from torch import nn

    from raptor.surrogate.evaluate import head_agreement, probe_evaluation
    from raptor.surrogate.model import init_from_teacher
    from raptor.teachers.base import ClassifierHead

    t = build_tiny_teacher("dinov2", seed=7)
    bc = BlockConfig(t.dim, 2, mlp_ratio=2, swiglu=False, t_scale=False)
    exact = RaptorModel(SurrogateConfig([[i] for i in range(1, t.depth + 1)], bc))
    init_from_teacher(exact, t)
    torch.manual_seed(0)
    t.head = ClassifierHead(nn.Linear(2 * t.dim, 5))
    x0 = t.embed(torch.randn(80, 3, 28, 28))
    layout = t.layout(28)
    y = np.arange(80) % 3
    res = head_agreement(exact, t, x0, layout)
    assert all(v["agreement"] == 1.0 for k, v in res.items() if isinstance(v, dict))
    p = probe_evaluation(exact, t, layout, x0[:50], y[:50], x0[50:], y[50:], "random", progress=False)
    for name, b in p["backbones"].items():
        assert b["teacher_probe_agreement"] == 1.0 and b["pct_of_teacher"] == 100.0, name
    random_model = RaptorModel(SurrogateConfig([[1, 2, 3]], BlockConfig(t.dim, 2)))
    with torch.no_grad():
        for q in random_model.parameters():
            q.add_(torch.randn(q.shape) * 0.5)
    assert head_agreement(random_model, t, x0, layout)["full (0-3)"]["agreement"] < 1.0
