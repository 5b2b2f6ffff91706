"""Scale: streaming images (DataLoader workers), bounded memory, torchrun (2 gloo processes) for extract and fit."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from clirun import ENV, one_error_line, raptor
from raptor.data import open_source
from raptor.data.stream import ChunkDataset, TrainBatchDataset, even_bounds, loader
from raptor.distributed import Dist
from raptor.errors import RaptorError
from raptor.store import TrajectoryStore
from raptor.surrogate.batches import OnlineBatches
from raptor.teachers.hf import build_tiny_teacher

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def torchrun(*args, timeout=300):
    cmd = TORCHRUN + ["-m", "raptor.cli"] + [str(a) for a in args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


# ---- streaming --------------------------------------------------------------------------------------------------

def _keys(n):
    return [("stage1/block0", s, 0, 1) for s in range(n)] + [("stage2", s, 0, 3) for s in range(n)]


def test_train_batches_are_a_function_of_seed_and_step_not_of_workers_or_ranks():
    t = build_tiny_teacher("dinov2")
    items = open_source("bundled:lfw").items[:60]
    ob = lambda w, dist=None: OnlineBatches(t, items, 28, seed=3, crops=True, workers=w, dist=dist)  # noqa: E731
    keys = _keys(4)
    ref = list(ob(0).stream(keys, 8))
    got = list(ob(2).stream(keys, 8))
    assert all(torch.equal(a, b) for a, b in zip(ref, got)) and len(got) == len(keys)
    # a resumed run asks for the tail of the plan and gets exactly the same batches
    tail = list(ob(2).stream(keys[5:], 8))
    assert all(torch.equal(a, b) for a, b in zip(ref[5:], tail))
    # rank shares put together are the whole batch; 1-process batches differ between steps and seeds
    shares = [list(ob(1, Dist(r, 2)).stream(keys, 8)) for r in range(2)]
    assert all(torch.equal(torch.cat([s0, s1]), a) for s0, s1, a in zip(shares[0], shares[1], ref))
    assert not torch.equal(ref[0], ref[1])
    other = next(OnlineBatches(t, items, 28, seed=4, crops=True, workers=0).stream(keys[:1], 8))
    assert not torch.equal(other, ref[0])
    # the images are what the dataset's own (seed, tag, step) draw names
    ds = TrainBatchDataset(items, [("stage2", 1)], 8, 3, None, t.eval_transform(28), crops=False)
    idx = ds.indices("stage2", 1)
    x, bad = ds[0]
    assert bad == [] and torch.equal(x, torch.stack([t.eval_transform(28)(items[i].load()) for i in idx]))


def test_unreadable_training_image_is_replaced_and_named_once(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    (tmp_path / "im2.png").write_bytes(b"not a png")
    t = build_tiny_teacher("dinov2")
    data = OnlineBatches(t, open_source(str(tmp_path)).items, 28, seed=0, crops=True, workers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = list(data.stream([("stage2", s, 0, 3) for s in range(12)], 6))
    assert all(o.shape[0] == 6 and torch.isfinite(o).all() for o in out)
    named = [str(w.message) for w in caught if "im2.png" in str(w.message)]
    assert len(named) == 1 and "skipping unreadable image" in named[0]


def test_chunks_stream_in_order_with_skips_named():
    t = build_tiny_teacher("dinov2")
    items = open_source("bundled:lfw").items[:50]
    tf = t.eval_transform(28)
    got = list(loader(ChunkDataset(items, tf, even_bounds(50, 8)), 2))
    assert [g[0] for g in got] == list(range(7))
    assert torch.equal(torch.cat([g[1] for g in got]), torch.stack([tf(it.load()) for it in items]))


RSS_SCRIPT = """
import resource, sys
from raptor.cli import run
argv = sys.argv[1:]
cut = argv.index("--then")
rc = run(argv[:cut]) or run(argv[cut + 1:])
peak = lambda who: resource.getrusage(who).ru_maxrss
print("RSS", rc, peak(resource.RUSAGE_SELF), peak(resource.RUSAGE_CHILDREN))
"""


@pytest.mark.slow
def test_peak_memory_is_flat_from_200_to_2000_images(tmp_path):
    """Decoded, the 2,000 images are 2000 x 256 x 256 x 3 B = 375 MiB (an in-memory cache of them: +340 MiB over
    200 images). Streamed (extract, then an online fit, in one process), neither the main process nor any worker
    grows by more than 40 MiB."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
    for n in (200, 2000):
        (tmp_path / f"d{n}").mkdir()
    for i in range(2000):
        Image.fromarray(np.roll(base, i, axis=1)).save(tmp_path / "d2000" / f"{i:04d}.jpg", quality=80)
        if i < 200:
            shutil.copy(tmp_path / "d2000" / f"{i:04d}.jpg", tmp_path / "d200" / f"{i:04d}.jpg")
    peaks = {}
    for n in (200, 2000):
        args = ["extract", "--teacher", "tiny:dinov2", "--data", tmp_path / f"d{n}", "--workers", "2",
                "--no-progress", "--out", tmp_path / f"store{n}", "--then",
                "fit", "--teacher", "tiny:dinov2", "--data", tmp_path / f"d{n}", "--k", "1", "--steps1", "20",
                "--steps2", "20", "--batch-size", "8", "--val-images", "8", "--stats-images", "16",
                "--probe-data", "none", "--workers", "2", "--no-progress", "--out", tmp_path / f"fit{n}"]
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT] + [str(a) for a in args], env=ENV,
                           capture_output=True, text=True, timeout=300)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RSS")]
        assert line and line[0].split()[1] == "0", r.stderr[-2000:]
        peaks[n] = tuple(int(x) // 1024 for x in line[0].split()[2:])
    grow = [b - a for a, b in zip(peaks[200], peaks[2000])]
    print("peak RSS MiB (main process, largest worker):", peaks)
    assert max(grow) < 40, f"peak RSS MiB (main process, largest worker): {peaks}"


# ---- torchrun: 2 gloo processes ---------------------------------------------------------------------------------

EXTRACT = ["extract", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--limit", "100", "--chunk-images", "8",
           "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def store_and_fit(tmp_path_factory):
    """A store of 100 LFW images and the 1-process fit on it (shared by the 2-process fits)."""
    root = tmp_path_factory.mktemp("scale")
    r = raptor(*EXTRACT, "--out", root / "s")
    assert r.returncode == 0, r.stderr[-2000:]
    r = raptor(*FIT, "--store", root / "s", "--out", root / "one")
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "s", root / "one"


def _same_store(a, b):
    sa, sb = TrajectoryStore(a), TrajectoryStore(b)
    assert sa.complete and sb.complete
    assert np.array_equal(np.asarray(sa.array[:]), np.asarray(sb.array[:]))
    assert np.array_equal(sa.valid_indices, sb.valid_indices) and np.array_equal(sa.labels, sb.labels)
    assert sa.ids == sb.ids and sa.manifest == sb.manifest
    assert {p.name for p in sb.path.iterdir()} == {"zarr.json", "trajectories", "valid", "labels", "ids"}  # only zarr
    assert {k: v for k, v in sa.meta.items() if k != "packages"} == {k: v for k, v in sb.meta.items()
                                                                      if k != "packages"}


@pytest.mark.slow
def test_two_process_extract_writes_the_one_process_store(tmp_path, store_and_fit):
    one = store_and_fit[0]
    r = torchrun(*EXTRACT, "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    _same_store(one, tmp_path / "two")
    # resumable per rank: a 2-process run stopped when both ranks had finished some of their chunks (0..8, each
    # rank's recorded in its own chunks of the status array) is finished by the next run
    import zarr

    part = tmp_path / "part"
    shutil.copytree(tmp_path / "two", part)
    status = zarr.open_array(str(part / "valid"), mode="r+")
    status[9 * 8:] = 0  # chunks 9..12 not extracted yet (all-zero chunks are not stored: as if never written)
    assert TrajectoryStore(part).manifest["done"] == list(range(9))
    for c in range(9, 13):  # chunks nobody recorded are redone: zero them so a skipped redo would show
        shutil.rmtree(part / "trajectories" / "c" / str(c), ignore_errors=True)
    zj = json.loads((part / "zarr.json").read_text())
    zj["attributes"]["raptor"]["complete"] = False
    (part / "zarr.json").write_text(json.dumps(zj))
    assert not TrajectoryStore(part).complete
    r = torchrun(*EXTRACT, "--out", part)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout[r.stdout.index("{"):])
    assert info["this_run"]["chunks_already_done"] == 9 and info["this_run"]["chunks_written"] == 2  # rank 0's 2
    _same_store(one, part)


FIT = ["fit", "--teacher", "tiny:dinov2", "--k", "2", "--steps1", "8", "--steps2", "8", "--batch-size", "8",
       "--val-images", "10", "--stats-images", "32", "--probe-data", "none", "--no-progress", "--lr", "1e-3",
       "--sigma", "0.01", "--device", "cpu"]


def _same_fit(one, two):
    a, b = (json.loads((d / "metrics.json").read_text())["loss_history"] for d in (one, two))
    assert a.keys() == b.keys() == {"stage1/block0", "stage1/block1", "stage2"}
    for k in a:
        la, lb = np.array(a[k])[:, 1], np.array(b[k])[:, 1]
        assert len(la) == 8 and np.allclose(la, lb, rtol=1e-4, atol=1e-7), (k, la, lb)
    wa, wb = (load_file(str(d / "model.safetensors")) for d in (one, two))
    # atol: a key bias has an exactly-zero gradient (softmax ignores it), so Adam turns rounding noise into
    # lr-sized steps there (1e-5 measured); every other weight agrees to ~1e-6
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-3, atol=5e-5) for k in wa)


@pytest.mark.slow
def test_two_process_fit_from_a_store_matches_one_process_fit(tmp_path, store_and_fit):
    store, one = store_and_fit
    r = torchrun(*FIT, "--store", store, "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # rank 0 alone reports and writes
    _same_fit(one, tmp_path / "two")


@pytest.mark.slow
def test_two_process_online_fit_matches_one_process_fit(tmp_path):
    data = ["--data", "bundled:lfw", "--limit", "100", "--workers", "1"]
    r = raptor(*FIT, *data, "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr[-2000:]
    r = torchrun(*FIT, *data, "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    _same_fit(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_distributed_refusals_are_one_error_line(tmp_path, capsys):
    r = torchrun(*FIT, "--data", "bundled:lfw", "--limit", "100", "--batch-size", "7", "--out", tmp_path / "x")
    assert r.returncode != 0 and "must be a multiple of the number of processes (2)" in r.stderr
    assert not (tmp_path / "x").exists()
    from raptor.cli import run

    def refused(*argv, needle):
        capsys.readouterr()
        assert run([str(a) for a in argv]) == 2
        one_error_line(capsys.readouterr().err, needle)
        assert not (tmp_path / "y").exists()

    if not torch.cuda.is_available():
        refused(*EXTRACT, "--device", "cuda", "--out", tmp_path / "y", needle="sees no CUDA GPU")
    refused(*EXTRACT, "--device", "tpu", "--out", tmp_path / "y", needle="bad --device")
    refused(*EXTRACT, "--workers", "-1", "--out", tmp_path / "y", needle="--workers must be >= 0")
    refused(*FIT, "--data", "bundled:lfw", "--workers", "-1", "--out", tmp_path / "y", needle="--workers must be >= 0")
    refused(*FIT, "--data", "bundled:lfw", "--device", "tpu", "--out", tmp_path / "y", needle="bad --device")
    refused("probe", "--task", "cls", "--backbone", "tiny:dinov2", "--data", "bundled:digits", "--device", "tpu",
            "--out", tmp_path / "y", needle="bad --device")
    # a torchrun job aimed at a directory another process holds: rank 0's refusal ends both ranks at once
    from raptor.outputs import OutputLock

    (tmp_path / "held").mkdir()
    lock = OutputLock(tmp_path / "held").acquire()
    try:
        r = torchrun(*EXTRACT, "--out", tmp_path / "held", timeout=120)
    finally:
        lock.release()
    assert r.returncode != 0 and "another raptor process" in r.stderr and "rank 0 could not prepare" in r.stderr
    assert os.listdir(tmp_path / "held") == []


@pytest.mark.slow
def test_parallel_stage1_blocks_on_two_ranks_match_the_sequential_fit(tmp_path, store_and_fit):
    store, one = store_and_fit
    r = torchrun(*FIT, "--store", store, "--parallel-blocks", "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    _same_fit(one, tmp_path / "two")  # block 1 was trained by rank 1 alone, block 0 by rank 0
    assert not list((tmp_path / "two" / "checkpoints").glob("block*"))  # folded into the stage-2 checkpoint


def test_parallel_stage1_resumes_from_block_checkpoints(tmp_path):
    """One process, --parallel-blocks: blocks are checkpointed per block; a run stopped inside block 1 resumes
    there (block 0 is not retrained) and ends with the weights of the sequential run."""
    from raptor.errors import RaptorError
    from raptor.surrogate.config import FitConfig
    from raptor.surrogate.fit import run_fit

    def cfg(out, **kw):
        return FitConfig(**{**dict(teacher="tiny:dinov2", data="bundled:lfw", limit=60, k=2, steps1=6, steps2=4,
                                   batch_size=4, ckpt_every=2, probe_data=None, lr=1e-3, val_images=10,
                                   stats_images=16, workers=0, device="cpu"), **kw, "out": str(out)})

    run_fit(cfg(tmp_path / "seq"), progress=False)

    class Stop(Exception):
        pass

    seen = []

    def stop_at(item, step, loss):
        seen.append((item.name, step))
        if item.name == "stage1/block1" and step == 3:
            raise Stop
        return loss

    with pytest.raises(Stop):
        run_fit(cfg(tmp_path / "par", parallel_blocks=True), progress=False, on_step=stop_at)
    assert sorted(p.name for p in (tmp_path / "par" / "checkpoints").iterdir()) == ["block0", "block1"]
    with pytest.raises(RaptorError, match="already holds a run .*; pass resume to continue it"):
        run_fit(cfg(tmp_path / "par", parallel_blocks=True), progress=False)
    with pytest.raises(RaptorError, match="other settings"):
        run_fit(cfg(tmp_path / "par"), resume=True, progress=False)
    seen.clear()
    run_fit(cfg(tmp_path / "par", parallel_blocks=True), resume=True, progress=False, on_step=lambda i, s, l: (
        seen.append((i.name, s)), l)[1])
    assert seen[0] == ("stage1/block1", 2) and not any(n == "stage1/block0" for n, _ in seen)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("seq", "par"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text())["loss_history"] for d in ("seq", "par"))
    assert ma == mb


class _DiesInWorker(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        if i == 2:
            os.kill(os.getpid(), 9)  # what the kernel's OOM killer does to a worker
        return torch.zeros(1)


def test_a_killed_worker_is_one_clear_error():
    from raptor.errors import RaptorError

    with pytest.raises(RaptorError, match="image-loading worker process died.*lower workers") as caught:
        list(loader(_DiesInWorker(), 1))
    assert caught.tb is not None  # the traceback (and the loader's frame) stay alive, as in pytest's own reporting
    # the dead worker is unregistered at once: torch's SIGCHLD handler must not raise later, in unrelated code,
    # when some other child process exits
    import subprocess

    torch._C._error_if_any_worker_fails()
    subprocess.run(["true"], check=True)
    torch._C._error_if_any_worker_fails()


def test_store_batches_from_disk_equal_the_cached_ones(tmp_path):
    """--store-cache-gb 0: every batch is read from the store (prefetched in a thread), equal to the RAM cache."""
    from raptor.store import extract
    from raptor.surrogate.batches import StoreBatches

    extract(build_tiny_teacher("dinov2"), open_source("bundled:lfw").subset(40), tmp_path / "s", chunk_images=8,
            progress=False)
    st = TrajectoryStore(tmp_path / "s")
    rows = np.arange(3, 37)
    keys = _keys(5)
    cached, disk = StoreBatches(st, rows, 1), StoreBatches(st, rows, 1, cache_bytes=0)
    assert cached.cache is not None and disk.cache is None
    a, b = list(cached.stream(keys, 6)), list(disk.stream(keys, 6))
    assert len(a) == len(b) == len(keys) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (6, 2, 5, 32) and a[-1].shape == (6, 4, 5, 32)


def test_chunk_sampling_reads_whole_chunks_and_is_a_function_of_the_key(tmp_path):
    """--store-sampling chunks: a batch's rows come from ceil(batch / chunk) whole chunks (here at most 2 chunks of 8
    for 6 rows, against ~5 for independent rows), are training rows only, drawn without replacement, the same for any
    cache and on every rank (the ranks' shares make up the batch); disk and cache give the same tensors."""
    from raptor.store import extract
    from raptor.surrogate.batches import StoreBatches

    extract(build_tiny_teacher("dinov2"), open_source("bundled:lfw").subset(64), tmp_path / "s", chunk_images=8,
            progress=False)
    st = TrajectoryStore(tmp_path / "s")
    rows = np.setdiff1d(np.arange(64), [5, 17, 40])  # three held-out rows inside chunks
    cached = StoreBatches(st, rows, 1, sampling="chunks")
    disk = StoreBatches(st, rows, 1, cache_bytes=0, sampling="chunks")
    indep = StoreBatches(st, rows, 1)
    spans_chunks, spans_rows = [], []
    for step in range(40):
        pick = cached.pick("stage2", step, 6)
        assert np.array_equal(pick, disk.pick("stage2", step, 6))  # the key alone decides
        assert len(set(pick.tolist())) == 6 and set(pick.tolist()) <= set(rows.tolist())
        spans_chunks.append(len(set((pick // 8).tolist())))
        spans_rows.append(len(set((indep.pick("stage2", step, 6) // 8).tolist())))
        shares = [cached.get("stage2", step, 6, 0, 1, share=(r, 2)) for r in range(2)]
        assert torch.equal(torch.cat(shares), cached.get("stage2", step, 6, 0, 1, share=(0, 1)))
    assert max(spans_chunks) <= 2 and np.mean(spans_rows) > 4, (spans_chunks, spans_rows)
    keys = _keys(4)
    assert all(torch.equal(x, y) for x, y in zip(cached.stream(keys, 6), disk.stream(keys, 6)))
    small = StoreBatches(st, rows[:4], 1, sampling="chunks")  # fewer training rows than a batch: with replacement
    assert set(small.pick("stage2", 0, 6).tolist()) <= set(rows[:4].tolist())
    with pytest.raises(RaptorError, match="unknown store_sampling .shards."):
        StoreBatches(st, rows, 1, sampling="shards")
    from raptor.surrogate.config import FitConfig
    from raptor.surrogate.fit import run_fit

    m = run_fit(FitConfig(teacher="tiny:dinov2", store=str(tmp_path / "s"), data=None, phases=[[1], [2, 3]], steps1=2,
                          steps2=2, batch_size=6, val_images=8, stats_images=16, probe_data=None,
                          store_sampling="chunks", store_cache_gb=0, out=str(tmp_path / "fit")), progress=False)
    assert m["config"]["store_sampling"] == "chunks" and np.isfinite(m["validation"]["autoregressive"]["r2_mean"])
    with pytest.raises(RaptorError, match="draws store chunks: use it with store"):
        FitConfig(data="bundled:lfw", k=2, store_sampling="chunks").check()


@pytest.mark.slow
@pytest.mark.parametrize("task,data", [("seg", "bundled:digit-seg")])
def test_two_process_probe_features_equal_the_one_process_ones(tmp_path, task, data):
    """torchrun probe: the ranks share the feature passes (every other batch), rank 0 gathers them into the same
    cache and trains the same probes: the same arrays, the same results line."""
    args = ["probe", "--task", task, "--backbone", "tiny:dinov2", "--data", data, "--seeds", "0", "--epochs", "2",
            "--image-size", "28", "--limit", "40", "--no-progress"]
    r = raptor(*args, "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr[-2000:]
    r = torchrun(*args, "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("appended to") == 1
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "features").rglob("*.npy"))
    assert files and files == sorted(p.relative_to(tmp_path / "two") for p in
                                     (tmp_path / "two" / "features").rglob("*.npy"))
    for f in files:
        a, b = np.load(tmp_path / "one" / f), np.load(tmp_path / "two" / f)
        assert a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-5), f
    ra, rb = ((tmp_path / d / "results.jsonl").read_text().splitlines() for d in ("one", "two"))
    va, vb = (json.loads(x[0]) for x in (ra, rb))
    assert len(ra) == len(rb) == 1 and abs(va["value"] - vb["value"]) < 1e-3
