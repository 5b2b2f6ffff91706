"""The notebook API (``raptor.load_teacher``, ``Teacher.trace``, ``raptor.similarity``, ``raptor.fit``, ``probe``,
``dynamics``): the same numbers as the commands, results as objects, nothing written or changed process-wide."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import raptor
from raptor import runtime
from raptor.analyze import AnalyzeConfig, run_analyze
from raptor.data import open_source
from raptor.errors import RaptorError
from raptor.store import extract


@pytest.fixture(scope="module")
def tiny():
    return raptor.load_teacher("tiny:dinov2")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """8 real photos (LFW faces) as PNG files and as PIL images."""
    d = tmp_path_factory.mktemp("photos")
    items = open_source("bundled:lfw").items[:8]
    paths = []
    for i, it in enumerate(items):
        p = d / f"{i}.png"
        it.load().convert("RGB").save(p)
        paths.append(p)
    return paths


def test_trace_takes_images_paths_or_tensors_and_returns_layer_numbers_and_groups(tiny, photos):
    pil = [Image.open(p).convert("RGB") for p in photos]
    t_paths = tiny.trace(photos)
    t_pil = tiny.trace(pil)
    x = torch.stack([tiny.eval_transform()(im) for im in pil])
    t_tensor = tiny.trace(x, batch_size=3)  # batched: the same numbers
    torch.testing.assert_close(t_paths.tensor, t_pil.tensor, atol=0, rtol=0)
    torch.testing.assert_close(t_tensor.tensor, tiny.trajectory(x), atol=1e-6, rtol=1e-5)
    assert t_paths.layers == tuple(range(tiny.depth + 1)) and len(t_paths) == 8
    lay = t_paths.layout
    assert t_paths.cls.shape == (8, tiny.depth + 1, lay.n_cls, tiny.dim)
    assert t_paths.patches.shape[2] == lay.n_patches
    torch.testing.assert_close(t_paths.layer(2), t_paths.tensor[:, 2])

    sub = tiny.trace(x, layers=[1, 3], groups=("patches",))
    assert sub.layers == (1, 3) and sub.layout.n_cls == 0 and sub.layout.n_tokens == lay.n_patches
    torch.testing.assert_close(sub.tensor, t_tensor.tensor[:, [1, 3]][:, :, lay.patches], atol=1e-6, rtol=1e-5)
    assert "2 layers" not in repr(sub) and "patches" in repr(sub)

    for bad, needle in (((x, "every"), "layers must be 'all'"), ((x, [0, 99]), "layers must lie in"),
                        ((torch.zeros(2, 1, 28, 28), "all"), "image tensors must be float"),
                        ((["/nonexistent.png"], "all"), "cannot read image")):
        with pytest.raises(RaptorError, match=needle):
            tiny.trace(bad[0], layers=bad[1])
    with pytest.raises(RaptorError, match="unknown token group"):
        tiny.trace(x, groups=("cls", "heads"))
    with pytest.raises(RaptorError, match="was not traced"):
        sub.layer(2)


def test_similarity_equals_raptor_analyze_on_the_same_store(tmp_path):
    """raptor.similarity(store) gives analyze's matrices to 1e-12 and its phases (layer numbers: a planted teacher
    of 2 tied blocks over layers 1-4 / 5-8) and null test."""
    spec = "planted:2,depth=8,base=tiny:dinov2"
    teacher = raptor.load_teacher(spec)
    src = open_source("bundled:lfw").subset(24, 1, "sorted")
    extract(teacher, src, tmp_path / "s.zarr", dtype="float32", chunk_images=8, batch_size=8, progress=False)
    a = run_analyze(AnalyzeConfig(teacher=spec, store=str(tmp_path / "s.zarr"), out=str(tmp_path / "an"),
                                  k_max=3, null_resamples=50), progress=False).analysis
    sim = raptor.similarity(tmp_path / "s.zarr")  # analyze's batch size: the same float32 partial sums
    assert sim.layers == a["layers"] == list(range(1, 9)) and sim.n_images == 24
    assert sim.phases(2) == [[1, 2, 3, 4], [5, 6, 7, 8]]
    for name, m in a["metrics"].items():
        np.testing.assert_allclose(sim.matrix(name), np.array(m["matrix"]), rtol=0, atol=1e-12)
    seg = a["segmentations"]["paper_cosine_distance"]
    assert sim.phases(2) == seg["dp"]["2"]["phases"]
    assert sim.phases() == seg["dp"][str(seg["chosen_k"]["k"])]["phases"]
    assert sim.phases(2, method="maxcut") == seg["maxcut"]["2"]["phases"]
    t = sim.null_test(2, n_resamples=50)
    assert t["phases"] == a["null_tests"]["2"]["phases"] and t["p_value"] == a["null_tests"]["2"]["p_value"]

    # the same images traced live: the same matrices (float32 store = float32 trajectories)
    traj = teacher.trace([it.load() for it in src.items])
    live = raptor.similarity(traj)
    np.testing.assert_allclose(live.matrix(), sim.matrix(), rtol=0, atol=1e-6)
    other_batches = raptor.similarity(tmp_path / "s.zarr", batch_size=5)  # other float32 partial sums
    for name in sim.metrics:
        np.testing.assert_allclose(other_batches.matrix(name), sim.matrix(name), rtol=0, atol=1e-6)
    halves = raptor.similarity([traj.select(traj.layers)] * 1)
    np.testing.assert_allclose(halves.matrix("cka_biased/cls"), live.matrix("cka_biased/cls"), atol=1e-12)
    with pytest.raises(RaptorError, match="unknown metric"):
        sim.matrix("nope")
    with pytest.raises(RaptorError, match="k must lie in 1..8"):
        sim.phases(9)
    ax = sim.plot(phases=sim.phases(2))
    assert ax.get_title().startswith("paper_cosine_distance (24 images)")


def test_fit_returns_a_model_and_writes_nothing_without_out(tmp_path, tiny, monkeypatch):
    """out=None: a RaptorModel back, no directory left behind, no process-wide change (allocator, logging,
    matplotlib backend); with out: the run directory the command writes, and the same weights."""
    import matplotlib

    monkeypatch.setattr(runtime, "_done", False)
    backend, handlers = matplotlib.get_backend(), list(logging.getLogger("raptor").handlers)
    tmp = Path(tempfile.gettempdir())
    before = {p.name for p in tmp.glob("raptor-fit-*")}
    opts = dict(data="bundled:lfw", phases="1-2/3", limit=40, steps1=3, steps2=2, batch_size=4, val_images=8,
                stats_images=16, seed=3)
    model = raptor.fit(tiny, **opts)
    assert isinstance(model, raptor.RaptorModel) and model.cfg.phases == [[1, 2], [3]]
    assert model.fit_metrics["validation"]["autoregressive"]["r2_image_specific_mean"] is not None
    assert {p.name for p in tmp.glob("raptor-fit-*")} == before
    assert runtime._done is False and matplotlib.get_backend() == backend
    assert logging.getLogger("raptor").handlers == handlers

    on_disk = raptor.fit("tiny:dinov2", out=tmp_path / "run", **opts)
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "model.safetensors").is_file()
    for (n, a), (_, b) in zip(model.state_dict().items(), on_disk.state_dict().items()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)

    with pytest.raises(RaptorError, match="unknown fit option 'stepz'"):
        raptor.fit(tiny, data="bundled:lfw", k=2, stepz=3)
    with pytest.raises(RaptorError, match="give data"):
        raptor.fit(tiny, k=2)
    with pytest.raises(RaptorError, match="phases must cover layers"):
        raptor.fit(tiny, data="bundled:lfw", phases=[[1], [2]], steps1=1, steps2=1)


def test_load_teacher_takes_a_teacher_and_refuses_other_objects(tiny):
    assert raptor.load_teacher(tiny, dtype=torch.float64) is tiny
    assert next(tiny.parameters()).dtype == torch.float64
    tiny.to(torch.float32)
    with pytest.raises(RaptorError, match="Teacher.from_modules"):
        raptor.load_teacher(torch.nn.Linear(2, 2))
    with pytest.raises(RaptorError, match="bad teacher spec"):
        raptor.load_teacher("nope")


@pytest.mark.slow
def test_probe_and_dynamics_return_result_objects(tmp_path):
    pr = raptor.probe("tiny:dinov2", task="cls", data="bundled:digits", limit=40, seeds=(0, 1), epochs=2)
    name, mean, std = pr.metric()
    assert name == pr.records[0]["metric"] and len(pr.records) == 2 and 0 <= mean <= 1 and std >= 0
    assert pr.table().startswith("| backbone |") and pr.out is None
    dy = raptor.dynamics("tiny:dinov2", data="bundled:lfw", limit=16, null_draws=0, perturb_images=8,
                         rank_images=8, out=tmp_path / "dyn")
    on_disk = json.loads((tmp_path / "dyn" / "dynamics.json").read_text())["findings"]
    verdicts = lambda f: {who: {c: v["verdict"] for c, v in crit.items()} for who, crit in f.items()}  # noqa: E731
    assert verdicts(dy.findings) == verdicts(on_disk) and verdicts(on_disk)["teacher"]


def test_save_pretrained_round_trips_bit_identically_and_the_card_shows_the_baselines(tmp_path, tiny, monkeypatch):
    """from_pretrained(save_pretrained(dir)) gives bit-identical outputs; the folder reads like a fit run; a Hub id
    under HF_HUB_OFFLINE=1 that is not cached is one RaptorError; the card carries the held-out measures."""
    from raptor.surrogate.run_dir import FitRun

    model = raptor.fit(tiny, data="bundled:lfw", phases="1-2/3", limit=40, steps1=3, steps2=2, batch_size=4,
                       val_images=8, stats_images=16)
    model.save_pretrained(tmp_path / "shared")
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["README.md", "metrics.json",
                                                                       "model.safetensors", "surrogate.json"]
    back = raptor.RaptorModel.from_pretrained(tmp_path / "shared")
    assert back.teacher_spec == "tiny:dinov2" and back.cfg == model.cfg and back.fit_metrics == model.fit_metrics
    x = tiny.trajectory(torch.randn(3, 3, 28, 28), [0])[:, 0]
    for a, b in zip(model(x), back(x)):
        assert torch.equal(a, b)
    assert torch.equal(model.splice(tiny, x, 0, 3, from_images=False), back.splice(tiny, x, 0, 3, from_images=False))
    assert FitRun(tmp_path / "shared").model(tiny).cfg == model.cfg  # readers of fit runs take it as it is

    card = (tmp_path / "shared" / "README.md").read_text()
    ar = model.fit_metrics["validation"]["autoregressive"]
    assert card.startswith("---\nlibrary_name: raptor\n") and "1–2 / 3" in card
    assert f"**{ar['r2_image_specific_mean']:.3f}**" in card and "image-blind per-position mean" in card

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RaptorError, match="cannot fetch nobody/no-such-raptor from the Hugging Face Hub"):
        raptor.RaptorModel.from_pretrained("nobody/no-such-raptor")
    with pytest.raises(RaptorError, match="neither a folder nor a Hub repo id"):
        raptor.RaptorModel.from_pretrained(tmp_path / "missing" / "dir")
    bare = raptor.RaptorModel(model.cfg)
    with pytest.raises(RaptorError, match="does not know its teacher"):
        bare.save_pretrained(tmp_path / "bare")
    bare.teacher_spec = "tiny:dinov2"  # a model without fit metrics: the folder's old metrics.json goes
    bare.save_pretrained(tmp_path / "shared")
    assert not (tmp_path / "shared" / "metrics.json").exists()
    assert raptor.RaptorModel.from_pretrained(tmp_path / "shared").fit_metrics is None
    (tmp_path / "shared" / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(RaptorError, match="not a valid safetensors file"):
        raptor.RaptorModel.from_pretrained(tmp_path / "shared")


@pytest.mark.slow
def test_a_shared_surrogate_is_a_probe_backbone_and_a_dynamics_surrogate(tmp_path, tiny):
    """hf-raptor:<folder> reads a save_pretrained folder wherever a fit run directory is accepted, with the same
    numbers as the run it came from."""
    run = tmp_path / "run"
    model = raptor.fit(tiny, data="bundled:lfw", phases="1-2/3", limit=40, steps1=3, steps2=2, batch_size=4,
                       val_images=8, stats_images=16, out=run)
    model.save_pretrained(tmp_path / "shared")
    kw = dict(task="cls", data="bundled:digits", limit=40, epochs=2)
    from_run = raptor.probe(run, **kw).records[0]
    shared = raptor.probe(f"hf-raptor:{tmp_path / 'shared'}", **kw).records[0]
    assert shared["value"] == from_run["value"] and shared["backbone"] == "raptor k=2 (shared)"
    dy = raptor.dynamics("tiny:dinov2", surrogate=f"hf-raptor:{tmp_path / 'shared'}", data="bundled:lfw", limit=16,
                         null_draws=0, perturb_images=8, rank_images=8)
    assert "surrogate" in dy.findings and dy.data["surrogate"]["phases"] == [[1, 2], [3]]


def test_a_missing_device_is_one_clear_refusal(tmp_path, capsys):
    """--device on analyze (and the notebook's device=): a GPU that is not there is refused before anything is read
    or written; mps likewise where torch sees no Apple GPU."""
    from raptor import cli

    for dev, needle in (("cuda", "sees no CUDA GPU"), ("mps", "sees no Apple GPU"), ("tpu", "bad --device 'tpu'")):
        assert cli.run(["analyze", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--device", dev, "--out",
                        str(tmp_path / dev)]) == 2
        assert needle in capsys.readouterr().err and not (tmp_path / dev).exists()
    with pytest.raises(RaptorError, match="sees no CUDA GPU"):
        raptor.load_teacher("tiny:dinov2", device="cuda")
    x = raptor.load_teacher("tiny:dinov2").trace(torch.randn(4, 3, 28, 28))
    np.testing.assert_array_equal(raptor.similarity(x, device="cpu").matrix(), raptor.similarity(x).matrix())


def test_a_teacher_cast_by_load_teacher_traces_in_its_dtype(tmp_path):
    t = raptor.load_teacher("tiny:dinov2", dtype=torch.float64)
    traj = t.trace(torch.randn(2, 3, 28, 28))
    assert traj.tensor.dtype == torch.float32 and torch.isfinite(traj.tensor).all()
    with pytest.raises(RaptorError, match="sees no CUDA GPU"):
        raptor.similarity(traj, device="cuda")
