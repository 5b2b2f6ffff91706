"""Activation store: contents equal the teacher's trajectories, resume = uninterrupted (incl. SIGKILL),
settings mismatch refused, reader covers every valid row."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from raptor.data import EvalTransform, open_source
from raptor.errors import RaptorError
from raptor.store import TrajectoryStore, extract
from raptor.teachers.hf import build_tiny_teacher


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_teacher("dinov2_with_registers", seed=0)


@pytest.fixture(scope="module")
def lfw40():
    return open_source("bundled:lfw").subset(40)


def chunks_on_disk(store) -> int:
    """Finished chunks of a store being written: its ``valid`` status chunk files (one per finished chunk, each
    written atomically once the chunk's trajectories are), counted without opening the store."""
    try:
        return sum(p.name.isdigit() for p in (store / "valid" / "c").iterdir())
    except OSError:
        return 0


def _expected(teacher, source, size=28):
    tf = EvalTransform.for_size(size, teacher.image_mean, teacher.image_std)
    x = torch.stack([tf(it.load()) for it in source.items])
    return teacher.trajectory(x)


def test_float32_store_equals_teacher_trajectory(tmp_path, tiny, lfw40):
    s = extract(tiny, lfw40, tmp_path / "s", dtype="float32", chunk_images=16, batch_size=8, progress=False)
    assert s.complete and s.n_extracted == 40 and s.chunks_written == 3
    st = TrajectoryStore(tmp_path / "s")
    ref = _expected(tiny, lfw40)
    assert st.array.shape == (40, tiny.depth + 1, st.layout.n_tokens, tiny.dim)
    assert torch.allclose(st.read(slice(None)), ref, atol=1e-6)
    assert st.ids == [it.id for it in lfw40.items] and st.labels.tolist() == lfw40.labels.tolist()
    assert st.meta["settings"]["teacher"] == "tiny:dinov2_with_registers" and st.complete
    assert st.layout.n_registers == 2 and "torch" in st.meta["packages"]


def test_bfloat16_store_is_bf16_rounding_and_half_the_bytes(tmp_path, tiny, lfw40):
    extract(tiny, lfw40, tmp_path / "b", dtype="bfloat16", compression="none", progress=False)
    extract(tiny, lfw40, tmp_path / "f", dtype="float32", compression="none", progress=False)
    ref = _expected(tiny, lfw40)
    got = TrajectoryStore(tmp_path / "b").read(slice(None))
    assert torch.equal(got, ref.to(torch.bfloat16).float())
    nb = TrajectoryStore(tmp_path / "b").summary()["bytes"]
    nf = TrajectoryStore(tmp_path / "f").summary()["bytes"]
    assert nb / nf <= 0.52


def test_layer_subset_and_range_reads(tmp_path, tiny, lfw40):
    extract(tiny, lfw40, tmp_path / "s", dtype="float32", layers=[1, 2, 3], progress=False)
    st = TrajectoryStore(tmp_path / "s")
    ref = _expected(tiny, lfw40)
    assert st.layers == [1, 2, 3]
    assert torch.allclose(st.read(np.array([3, 7]), layers=(2, 3)), ref[[3, 7]][:, 2:4], atol=1e-6)
    with pytest.raises(RaptorError, match="not in this store"):
        st.read(slice(0, 2), layers=(0, 1))


def test_resume_after_partial_run_equals_uninterrupted(tmp_path, tiny, lfw40):
    extract(tiny, lfw40, tmp_path / "full", chunk_images=8, progress=False)
    part = extract(tiny, lfw40, tmp_path / "part", chunk_images=8, progress=False, stop_after_chunks=2)
    assert not part.complete and not TrajectoryStore(tmp_path / "part").complete
    rest = extract(tiny, lfw40, tmp_path / "part", chunk_images=8, progress=False)
    assert rest.chunks_done_before == 2 and rest.chunks_written == 3 and rest.complete
    a = np.asarray(TrajectoryStore(tmp_path / "full").array[:])
    b = np.asarray(TrajectoryStore(tmp_path / "part").array[:])
    assert np.array_equal(a, b)
    again = extract(tiny, lfw40, tmp_path / "part", chunk_images=8, progress=False)
    assert again.chunks_written == 0


def test_other_settings_are_refused_with_one_clear_line(tmp_path, tiny, lfw40):
    extract(tiny, lfw40, tmp_path / "s", progress=False, stop_after_chunks=1)
    with pytest.raises(RaptorError, match="dtype: store has 'bfloat16', this run 'float32'") as e:
        extract(tiny, lfw40, tmp_path / "s", dtype="float32", progress=False)
    assert "\n" not in str(e.value)
    other = build_tiny_teacher("vit", seed=0)
    with pytest.raises(RaptorError, match="teacher"):
        extract(other, lfw40, tmp_path / "s", progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(RaptorError, match="not a Raptor store"):
        extract(tiny, lfw40, tmp_path / "junk", progress=False)


def test_resuming_a_store_with_a_damaged_status_array_is_one_line(tmp_path, tiny, lfw40):
    extract(tiny, lfw40, tmp_path / "s", chunk_images=16, progress=False, stop_after_chunks=1)
    meta = tmp_path / "s" / "valid" / "zarr.json"
    meta.write_text(meta.read_text()[:90])
    with pytest.raises(RaptorError, match="is damaged") as e:
        extract(tiny, lfw40, tmp_path / "s", chunk_images=16, progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "s" / ".raptor.lock").exists()


def test_corrupt_images_are_skipped_counted_and_masked(tmp_path, tiny):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(root / f"{i}.png")
    (root / "2b.png").write_bytes(b"garbage")
    src = open_source(str(root))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = extract(tiny, src, tmp_path / "s", chunk_images=4, progress=False)
    assert s.skipped == ["2b.png"] and s.n_extracted == 5 and s.complete
    st = TrajectoryStore(tmp_path / "s")
    assert st.valid_indices.tolist() == [0, 1, 2, 4, 5] and st.summary()["skipped"] == 1
    assert st.manifest == {"done": [0, 1], "skipped": ["2b.png"]} and st.meta["skipped"] == ["2b.png"]
    assert np.asarray(st.group["valid"][:]).tolist() == [1, 1, 1, 2, 1, 1]  # 2 = skipped
    seen = np.concatenate([i for _, i in st.batches(2, shuffle=True)])
    assert sorted(seen.tolist()) == [0, 1, 2, 4, 5]


def test_reader_batches_shuffle_and_cover_every_row_once(tmp_path, tiny, lfw40):
    extract(tiny, lfw40, tmp_path / "s", dtype="float32", chunk_images=8, progress=False)
    st = TrajectoryStore(tmp_path / "s")
    full = st.read(slice(None))
    batches = list(st.batches(6, layers=(1, 2), shuffle=True, seed=0))
    idx = np.concatenate([i for _, i in batches])
    assert sorted(idx.tolist()) == list(range(40)) and idx.tolist() != list(range(40))
    for x, i in batches:
        assert x.shape[1:] == (2,) + full.shape[2:]
        assert torch.equal(x, full[i][:, 1:3])
    two = list(st.batches(8, shuffle=True, seed=1, epochs=2, drop_last=True))
    assert all(len(i) == 8 for _, i in two) and len(two) == 10
    sub = np.concatenate([i for _, i in st.batches(4, rows=np.arange(10, 20))])
    assert sorted(sub.tolist()) == list(range(10, 20))
    det1 = [i.tolist() for _, i in st.batches(5, seed=7)]
    det2 = [i.tolist() for _, i in st.batches(5, seed=7)]
    assert det1 == det2


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A subprocess running the real CLI is SIGKILLed mid-extraction; the same command then finishes the store."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "raptor.cli", "extract", "--teacher", "bundled:dinov2-s", "--data", "bundled:lfw",
            "--limit", "96", "--chunk-images", "8", "--batch-size", "8", "--image-size", "56", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(base + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done_at_kill = 0
    while time.time() < deadline:
        done_at_kill = chunks_on_disk(killed)
        if done_at_kill >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= done_at_kill < 12, f"kill landed at {done_at_kill}/12 chunks"
    assert not TrajectoryStore(killed).complete
    r = subprocess.run(base + ["--out", str(killed)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)
    assert info["complete"] and info["this_run"]["chunks_already_done"] >= 2
    ref = tmp_path / "ref"
    r2 = subprocess.run(base + ["--out", str(ref)], env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    a, b = TrajectoryStore(killed), TrajectoryStore(ref)
    assert np.array_equal(np.asarray(a.array[:]), np.asarray(b.array[:]))
    assert np.array_equal(a.valid_indices, b.valid_indices)


STORE_MEMBERS = {"trajectories", "valid", "labels", "ids"}


def _read_with_plain_zarr(path) -> dict:
    """Every array of the store, read by plain zarr with every warning an error."""
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = zarr.open_group(str(path), mode="r")
        members = dict(g.members(max_depth=None))
        return {name: np.asarray(a[:]) for name, a in members.items()}


def test_plain_zarr_reads_finished_and_interrupted_stores_without_warnings(tmp_path, tiny, lfw40):
    extract(tiny, lfw40, tmp_path / "full", chunk_images=16, progress=False)
    extract(tiny, lfw40, tmp_path / "part", chunk_images=16, progress=False, stop_after_chunks=1)
    for name, done in (("full", [0, 1, 2]), ("part", [0])):
        path = tmp_path / name
        assert {p.name for p in path.iterdir()} == STORE_MEMBERS | {"zarr.json"}  # no side files, no lock left
        arrays = _read_with_plain_zarr(path)
        st = TrajectoryStore(path)
        assert set(arrays) == STORE_MEMBERS
        assert arrays["ids"].tolist() == st.ids == [it.id for it in lfw40.items]
        assert np.array_equal(arrays["labels"], st.labels)
        assert st.manifest == {"done": done, "skipped": []}
        assert np.array_equal(np.flatnonzero(arrays["valid"] == 1), st.valid_indices)
        assert (arrays["valid"] == 0).sum() == 40 - min(40, 16 * len(done))  # 0 = not extracted yet
        assert st.summary()["chunks_done"] == f"{len(done)}/3"


def test_bf16_rows_read_with_ml_dtypes_equal_the_store_reader(tmp_path, tiny, lfw40):
    import ml_dtypes

    extract(tiny, lfw40, tmp_path / "b", dtype="bfloat16", chunk_images=16, progress=False)
    raw = _read_with_plain_zarr(tmp_path / "b")["trajectories"]
    assert raw.dtype == np.uint16  # the raw bfloat16 bit patterns
    rows = raw.view(ml_dtypes.bfloat16).astype(np.float32)
    assert np.array_equal(rows, TrajectoryStore(tmp_path / "b").read(slice(None)).numpy())


def _as_format_1(src, dst):
    """A copy of store ``src`` in the layout raptor wrote before format 2: ids.json + manifest.json beside the
    arrays, valid 1 = extracted / 0 = anything else, no ids array, version 1."""
    import shutil

    import zarr

    shutil.copytree(src, dst)
    st = TrajectoryStore(dst)
    (dst / "ids.json").write_text(json.dumps(st.ids))
    (dst / "manifest.json").write_text(json.dumps(st.manifest))
    v = zarr.open_array(str(dst / "valid"), mode="r+")
    v[:] = (np.asarray(v[:]) == 1).astype(np.uint8)
    shutil.rmtree(dst / "ids")
    g = zarr.open_group(str(dst), mode="r+")
    meta = {k: x for k, x in dict(g.attrs["raptor"]).items() if k != "created"}
    g.attrs["raptor"] = {**meta, "version": 1}
    return dst


def test_a_format_1_store_is_read_but_not_resumed(tmp_path, tiny, lfw40):
    from raptor.store import precheck_store

    extract(tiny, lfw40, tmp_path / "new", chunk_images=16, progress=False, stop_after_chunks=2)
    new = TrajectoryStore(tmp_path / "new")
    old = TrajectoryStore(_as_format_1(tmp_path / "new", tmp_path / "old"))
    assert old.ids == new.ids and old.manifest == new.manifest == {"done": [0, 1], "skipped": []}
    assert np.array_equal(old.valid_indices, new.valid_indices) and old.summary()["chunks_done"] == "2/3"
    assert torch.equal(old.read(slice(0, 32)), new.read(slice(0, 32)))
    for attempt in (lambda: extract(tiny, lfw40, tmp_path / "old", chunk_images=16, progress=False),
                    lambda: precheck_store(tmp_path / "old", teacher=tiny.spec)):
        with pytest.raises(RaptorError, match="made by an older raptor .* re-extract") as e:
            attempt()
        assert "\n" not in str(e.value)
    assert (tmp_path / "old" / "manifest.json").exists() and not (tmp_path / "old" / "ids").exists()  # untouched
