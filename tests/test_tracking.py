"""Live tracking of a fit (raptor.tracking): log.jsonl is the loss history (checkpoints keep only how far it goes),
TensorBoard events equal it, a wandb run (offline) keeps its id across a resume, and a resumed run's logs read as one
uninterrupted run."""

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
