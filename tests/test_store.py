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
    assert st.ids[0] == "lfw/000" and st.labels.tolist() == lfw40.labels.tolist()
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


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    """A subprocess running the real CLI is SIGKILLed mid-extraction; the same command then finishes the store."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "raptor.cli", "extract", "--teacher", "bundled:dinov2-s", "--data", "bundled:lfw",
            "--limit", "96", "--chunk-images", "8", "--batch-size", "8", "--image-size", "56", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(base + ["--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    manifest = killed / "manifest.json"
    deadline = time.time() + 120
    done_at_kill = 0
    while time.time() < deadline:
        if manifest.exists():
            try:
                done_at_kill = len(json.loads(manifest.read_text())["done"])
            except (ValueError, OSError):
                done_at_kill = 0
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
