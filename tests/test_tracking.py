"""Live tracking of a fit (raptor.tracking): log.jsonl is the loss history (checkpoints keep only how far it goes),
TensorBoard events equal it, a wandb run (offline) keeps its id across a resume, and a resumed run's logs read as one
uninterrupted run; a probe and a study log their own metrics once each."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from raptor.errors import RaptorError
from raptor.surrogate.config import FitConfig
from raptor.surrogate.fit import run_fit
from raptor.tracking import parse_log_to, read_log


def _cfg(out, **kw):
    return FitConfig(teacher="tiny:dinov2", data="bundled:lfw", limit=40, k=2, steps1=4, steps2=3, batch_size=4,
                     val_images=8, stats_images=16, probe_data=None, ckpt_every=2, out=str(out), **kw)


def _tb_scalars(logdir: Path) -> dict[str, dict[int, float]]:
    """Scalars of every event file under ``logdir`` (TFRecord framing read by hand; tensorboard is not installed), with
    TensorBoard's purge semantics: a file's first event, a session START at step s, drops earlier files' steps >= s."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for f in sorted(logdir.glob("events.out.tfevents.*")):  # TensorBoard's order: by name (a timestamp first)
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            ev = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
                for series in out.values():
                    for s in [s for s in series if s >= ev.step]:
                        del series[s]
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def _steps(records):
    return [(r["item"], r["step"], r["loss"], r["lr"]) for r in records if r["kind"] == "step"]


@pytest.mark.slow
def test_a_resumed_fit_logs_like_an_uninterrupted_one_to_jsonl_tensorboard_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    kinds = ("jsonl", "tensorboard", "wandb")
    ref = run_fit(_cfg(tmp_path / "ref", log_to=kinds), progress=False)

    class Stop(Exception):
        pass

    def stop(item, step, loss):
        if item.name == "stage1/block1" and step == 3:
            raise Stop
        return loss

    with pytest.raises(Stop):
        run_fit(_cfg(tmp_path / "cut", log_to=kinds), progress=False, on_step=stop)
    logged = read_log(tmp_path / "cut")
    ck = json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["checkpoint"]
    st = json.loads((tmp_path / "cut" / "checkpoints" / ck / "state.json").read_text())
    assert "history" not in st and st["tracking"]["wandb_id"]
    assert logged[-1]["item"] == "stage1/block1" and logged[-1]["step"] == 2  # step 2 logged, no checkpoint yet
    wandb_id = st["tracking"]["wandb_id"]
    m = run_fit(_cfg(tmp_path / "cut", log_to=kinds), resume=True, progress=False)

    # the history: log.jsonl == metrics.json == the uninterrupted run's, every step once
    records = read_log(tmp_path / "cut")
    assert _steps(records) == _steps(read_log(tmp_path / "ref"))
    assert [r["global_step"] for r in records if r["kind"] == "step"] == list(range(4 + 4 + 3))
    assert m["loss_history"] == ref["loss_history"]
    assert {k: [[s, v, lr] for _, s, v, lr in [x for x in _steps(records) if x[0] == k]]
            for k in m["loss_history"]} == m["loss_history"]
    # TensorBoard: the loss curves equal the history, the re-trained steps replaced (purged), not duplicated
    tb = _tb_scalars(tmp_path / "cut" / "tensorboard")
    for name, hist in m["loss_history"].items():
        offset = {"stage1/block0": 0, "stage1/block1": 4, "stage2": 8}[name]
        assert tb[f"loss/{name}"] == pytest.approx({offset + s: v for s, v, _ in hist}, rel=1e-6)
    assert set(tb["throughput/images_per_s"]) == set(range(11))
    # wandb: one run id across the resume (offline run folders all end with it)
    runs = sorted((tmp_path / "cut" / "wandb").glob("offline-run-*"))  # offline-run-<time>-<id>[-n]
    assert len(runs) == 2 and all(p.name.split("-")[3] == wandb_id for p in runs)


def test_log_to_is_checked_and_jsonl_always_kept(monkeypatch):
    assert parse_log_to("tensorboard") == ("tensorboard",)
    cfg = FitConfig(k=2, log_to=("tensorboard",))
    cfg.check()
    assert cfg.log_to == ("jsonl", "tensorboard")
    with pytest.raises(RaptorError, match="bad log_to 'csv'"):
        parse_log_to("csv")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(RaptorError, match="log_to wandb needs the wandb package: pip install wandb"):
        parse_log_to("jsonl,wandb")
    with pytest.raises(RaptorError, match="log_every must be >= 1"):
        FitConfig(k=2, log_every=0).check()


@pytest.mark.slow
def test_parallel_blocks_log_every_block_in_global_step_order(tmp_path):
    """--parallel-blocks: the blocks' steps reach log.jsonl (and TensorBoard) at the end of stage 1, in global-step
    order, equal to the run's loss history."""
    m = run_fit(_cfg(tmp_path / "par", parallel_blocks=True, log_to=("jsonl", "tensorboard")), progress=False)
    records = [r for r in read_log(tmp_path / "par") if r["kind"] == "step"]
    assert [r["global_step"] for r in records] == list(range(4 + 4 + 3))
    assert {k: [[r["step"], r["loss"], r["lr"]] for r in records if r["item"] == k] for k in m["loss_history"]} \
        == m["loss_history"]
    tb = _tb_scalars(tmp_path / "par" / "tensorboard")
    assert sorted(tb["loss/stage1/block1"]) == [4, 5, 6, 7]


def test_probe_logs_each_seed_once_to_jsonl_and_tensorboard(tmp_path):
    """``probe --log-to``: per seed, its validation curve per learning rate (step = epoch) and its test score
    (step = seed), equal to results.jsonl; a re-run with one more seed logs only that seed."""
    from raptor.probes.run import ProbeConfig, read_results, run_probe

    out = tmp_path / "p"
    lrs = (1e-2, 1e-3)
    cfg = dict(task="cls", backbone="tiny:vit", data="bundled:lfw", out=str(out), limit=40, epochs=3, lrs=lrs,
               log_to=("jsonl", "tensorboard"))
    run_probe(ProbeConfig(**cfg, seeds=(0, 1)), progress=False)
    run_probe(ProbeConfig(**cfg, seeds=(0, 1, 2)), progress=False)
    recs = read_results(out / "results.jsonl")
    log = [r for r in read_log(out) if r["kind"] == "metrics"]
    finals = [r for r in log if "/seed" not in r["item"]]
    assert [r["seed"] for r in finals] == [r["seed"] for r in recs] == [0, 1, 2]
    tb = _tb_scalars(out / "tensorboard")
    for rec, final in zip(recs, finals):
        metric = rec["metric"]
        assert final["values"][f"test_{metric}"] == pytest.approx(rec["value"]) and final["backbone"] == rec["backbone"]
        curve = [r for r in log if r["item"] == f"{final['item']}/seed{rec['seed']}"]
        assert [r["step"] for r in curve] == list(range(len(rec["history"]["val"][0])))
        for g, lr in enumerate(lrs):
            key = f"val_{metric}/lr_{lr:g}"
            assert [r["values"][key] for r in curve] == pytest.approx(rec["history"]["val"][g])
            assert tb[f"{curve[0]['item']}/{key}"] == pytest.approx(dict(enumerate(rec["history"]["val"][g])))
    assert tb[f"{finals[0]['item']}/test_{recs[0]['metric']}"] == pytest.approx({r["seed"]: r["value"] for r in recs})


@pytest.mark.slow
def test_study_logs_each_vit_epoch_and_each_finished_run_once(tmp_path):
    """``study --log-to``: each ViT's training loss per epoch (equal to its train.json) and each finished run's
    scores (equal to study.json); a second call on the finished sweep logs nothing more."""
    from raptor.study.run import FitBudget, StudyConfig, run_study
    from raptor.study.vit import TrainConfig, ViTConfig

    out = tmp_path / "s"
    cfg = StudyConfig(data="bundled:digits", out=str(out), sd=(0.0, 0.5), seeds=(0,), ks=(2,), random_partitions=0,
                      swap_samples=0, references=False, limit=120,
                      vit=ViTConfig(image_size=8, patch_size=4, dim=16, depth=4, heads=2),
                      train=TrainConfig(epochs=2, batch_size=32),
                      fit=FitBudget(steps1=2, steps2=1, batch_size=8, val_images=16, stats_images=32),
                      log_to=("jsonl", "tensorboard"))
    study = run_study(cfg, progress=False)
    first = read_log(out)
    run_study(cfg, progress=False)
    assert read_log(out) == first
    for i, r in enumerate(study["runs"]):
        name = f"p{r['p']:g}_s{r['seed']}"
        vit = [x for x in first if x["item"] == f"vit/{name}"]
        assert [(x["step"], x["values"]["train_loss"]) for x in vit] == [
            (h["epoch"], pytest.approx(h["train_loss"])) for h in r["train"]["history"]]
        (row,) = [x for x in first if x["item"] == "study" and x["step"] == i]
        assert row["values"]["teacher_accuracy"] == pytest.approx(r["teacher_accuracy"])
        assert row["values"]["raptor_k2_r2_mean"] == pytest.approx(r["fits"]["2"]["dp"]["r2_mean"])
    tb = _tb_scalars(out / "tensorboard")
    acc = {i: r["teacher_accuracy"] for i, r in enumerate(study["runs"])}
    assert tb["study/teacher_accuracy"] == pytest.approx(acc)


def test_log_metrics_gives_each_item_its_own_wandb_step_axis(tmp_path):
    """wandb drops a log whose step is below the run's counter: probe/study items (each with steps from 0) are
    logged without step=, against their own <item>/step metric, so none is dropped."""
    from raptor.tracking import Tracker

    calls = []

    class FakeRun:
        def define_metric(self, name, step_metric=None):
            calls.append(("define", name, step_metric))

        def log(self, data, step=None):
            calls.append(("log", dict(data), step))

    with Tracker(tmp_path, ("jsonl",)) as t:
        t._wandb = FakeRun()
        for item in ("probe/a/seed0", "probe/a/seed1"):
            for epoch in range(3):
                t.log_metrics(item, epoch, {"val": epoch / 10})
        t.log_metrics("probe/a", 0, {"test": 0.5}, last=True)
        t._wandb = None
    logs = [c for c in calls if c[0] == "log"]
    assert len(logs) == 7 and all(c[2] is None for c in logs)
    assert [c[1]["probe/a/seed1/step"] for c in logs if "probe/a/seed1/step" in c[1]] == [0, 1, 2]
    assert ("define", "probe/a/seed0/*", "probe/a/seed0/step") in calls
    assert sum(c[0] == "define" for c in calls) == 6  # two per item, once each
    assert len([r for r in read_log(tmp_path) if r["kind"] == "metrics"]) == 7
