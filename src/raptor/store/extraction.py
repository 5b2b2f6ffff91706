"""Extraction into a trajectory store: argument and ``--out`` checks, creating or resuming a store, and the
loader -> forward -> writer pipeline that fills it (with its thread-priority and I/O-thread settings)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from raptor.data.sampling import check_sample_order
from raptor.data.sources import open_source
from raptor.data.stream import ChunkDataset, _put_until, loader
from raptor.data.transforms import check_transform
from raptor.distributed import claim_on_main, current, setup
from raptor.errors import RaptorError, check_positive
from raptor.outputs import LOCK_NAME, only_lock_inside
from raptor.progress import progress_bar
from raptor.store.format import (
    _STORAGE,
    COMPRESSIONS,
    DTYPES,
    PENDING,
    SKIPPED,
    STORE_VERSION,
    STORED,
    StoreSettings,
    _compressors,
    _dir_bytes,
    _refuse_other_version,
    _to_storage,
    chunks_done,
    encode,
    package_versions,
    store_sample,
)
from raptor.store.reader import TrajectoryStore
from raptor.teachers import load_teacher
from raptor.teachers.base import check_autocast
from raptor.versions import require


@dataclass
class ExtractSummary:
    store: str
    n_images: int
    n_extracted: int
    skipped: list[str]
    chunks_done_before: int
    chunks_written: int
    seconds: float
    images_per_s: float
    bytes_stored: int
    complete: bool
    extra: dict = field(default_factory=dict)


def _lower_thread_priority() -> None:
    """Let the forward pass's compute threads win the cores: I/O helper threads run at nice 19 (Linux).

    On 2 cores, a writer competing at equal priority slows torch's OpenMP threads (barrier waits) by more than
    the writer's own CPU time; at low priority it fills the gaps instead.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):
        pass


def _open_or_create(path: Path, settings: StoreSettings, meta: dict, ids: list[str], labels: np.ndarray,
                    shape: tuple[int, ...]):
    """Open the store at ``path`` to resume it, or create it. Creation marks the metadata ``created`` last: a store
    without the mark was interrupted while being created (nothing extracted yet) and is created again. Never uses
    zarr's overwrite mode on the group, which would empty the directory, lock file included."""
    import zarr

    fp = settings.fingerprint()
    if (path / "zarr.json").is_file():
        try:
            old = json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("raptor")
        except (OSError, ValueError, AttributeError):
            old = None
        ours = isinstance(old, dict)
        if ours and (old.get("created") or old.get("version") != STORE_VERSION):  # a store to resume
            _refuse_other_version(path, old.get("version"), "resume")
            if old.get("fingerprint") != fp:
                _refuse_other_settings(path, old.get("settings", {}), settings.__dict__, always=True)
            return zarr.open_group(str(path), mode="r+")
        # an interrupted creation: ours only if it carries our attributes
        if not ours and not {p.name for p in path.iterdir()} <= {"zarr.json", "trajectories", "valid", "labels",
                                                                  "ids", LOCK_NAME}:
            raise RaptorError(f"{path} exists and is not a Raptor store; choose another --out")
        for p in path.iterdir():
            if p.name != LOCK_NAME:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    elif path.exists() and not only_lock_inside(path):
        raise RaptorError(f"{path} exists, is not empty and is not a Raptor store; choose another --out")
    attrs = {**meta, "fingerprint": fp, "complete": False}
    g = zarr.open_group(str(path), mode="a", attributes={"raptor": attrs})
    storage = _STORAGE[settings.dtype]
    g.create_array("trajectories", shape=shape, dtype=storage,
                   chunks=(settings.chunk_images, 1, shape[2], shape[3]),
                   compressors=_compressors(settings.compression, np.dtype(storage).itemsize), fill_value=0,
                   dimension_names=["image", "layer", "token", "dim"], attributes={"logical_dtype": settings.dtype},
                   overwrite=True)
    # chunked like the trajectories: a store chunk's status is one chunk file, written after its trajectory chunks
    g.create_array("valid", shape=(shape[0],), dtype="uint8", chunks=(settings.chunk_images,), fill_value=PENDING,
                   dimension_names=["image"], overwrite=True)
    lab = g.create_array("labels", shape=(shape[0],), dtype="int64", chunks=(max(1, shape[0]),), fill_value=-1,
                         dimension_names=["image"], overwrite=True)
    lab[:] = labels
    id_arr = g.create_array("ids", shape=(shape[0],), dtype=str, chunks=(max(1, shape[0]),),
                            dimension_names=["image"], overwrite=True)
    id_arr[:] = np.array(ids, dtype=object)
    g.attrs["raptor"] = {**attrs, "created": True}  # last: creation finished
    return g


def check_extract_args(*, dtype: str, compression: str, batch_size: int, chunk_images: int,
                       image_size: int | None = None, autocast: str | None = None, limit: int | None = None,
                       workers: int = 0) -> None:
    """Every cheap check of extract's arguments, done before any teacher, data or output is touched."""
    require("zarr")
    if dtype not in DTYPES:
        raise RaptorError(f"unknown --dtype {dtype!r} (use {', '.join(DTYPES)})")
    if compression not in COMPRESSIONS:
        raise RaptorError(f"unknown --compression {compression!r} (use {', '.join(COMPRESSIONS)})")
    check_positive(batch_size=batch_size, chunk_images=chunk_images, image_size=image_size, limit=limit)
    if batch_size > chunk_images:
        raise RaptorError(f"--batch-size {batch_size} exceeds --chunk-images {chunk_images}: one forward pass covers "
                          f"at most one store chunk, so the batch would silently shrink to {chunk_images}; raise "
                          f"--chunk-images (left unset it follows --batch-size)")
    if not workers >= 0:
        raise RaptorError(f"--workers must be >= 0, got {workers}")
    check_autocast(autocast)


def batch_and_chunk(batch_size: int | None, chunk_images: int | None) -> tuple[int, int]:
    """The forward batch and the store chunk, each defaulting to the other: an unset chunk is the larger of 32 and
    the batch, an unset batch the smaller of 16 and the chunk (one forward covers at most one chunk)."""
    if chunk_images is None:
        chunk_images = max(32, batch_size) if batch_size is not None and batch_size > 0 else 32
    if batch_size is None:
        batch_size = min(16, chunk_images) if chunk_images > 0 else 16
    return batch_size, chunk_images


def precheck_store(out: str | Path, **settings) -> None:
    """Refuse, before the teacher loads, an ``--out`` that is not a store, or a store made with other values of
    the ``settings`` known without the teacher (teacher, data, n_images, dtype, ...). Cheap: reads zarr.json."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise RaptorError(f"--out {out} exists and is not a directory")
    if not (out / "zarr.json").is_file():
        if not only_lock_inside(out):
            raise RaptorError(f"{out} exists, is not empty and is not a Raptor store; choose another --out")
        return
    try:
        raptor = json.loads((out / "zarr.json").read_text())["attributes"]["raptor"]
        prev = raptor["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RaptorError(f"{out} exists and is not a readable Raptor store; choose another --out or delete it") \
            from None
    _refuse_other_version(out, raptor.get("version"), "resume")
    _refuse_other_settings(out, prev, settings)


def _refuse_other_settings(path: Path, prev: dict, settings: dict, always: bool = False) -> None:
    """One line naming each setting in which this run differs from the store's (``always``: refuse even when
    the named ones agree, e.g. on a fingerprint mismatch)."""
    diffs = [f"{k}: store has {prev.get(k)!r}, this run {v!r}" for k, v in settings.items()
             if prev.get(k) != (list(v) if isinstance(v, tuple) else v)]
    if diffs or always:
        raise RaptorError(f"store {path} was made with other settings ({'; '.join(diffs) or 'fingerprint'}); "
                          f"use another --out or delete it")


def _has_rows(path: Path) -> bool:
    """Durable progress of a store: at least one image extracted (kept when a failed run is cleaned up)."""
    import zarr

    return bool((np.asarray(zarr.open_array(str(path / "valid"), mode="r")[:]) == STORED).any())


def extract(teacher, source, out: str | Path, *, dtype: str = "bfloat16", layers: Sequence[int] | None = None,
            batch_size: int | None = None, chunk_images: int | None = None, image_size: int | None = None,
            compression: str = "lz4", autocast: str | None = None, progress: bool = True,
            stop_after_chunks: int | None = None, workers: int | None = 0, device: torch.device | None = None,
            dist=None, transform: str = "paper") -> ExtractSummary:
    """Write (or resume writing) the trajectories of every image of ``source`` into a store at ``out``.

    The directory is locked for the run (a second writer is refused); a run that fails before extracting any
    image removes the store it created; a source none of whose images can be read is refused, never "complete".
    ``workers``: image-decoding processes (0: a thread; None: :func:`io_plan`'s for the device). Under torchrun
    (``dist``, default: the current process group) rank ``r`` extracts the chunks ``c`` with ``c % world == r``
    into the same store (see :mod:`raptor.distributed`). ``transform``: the eval transform, paper | model
    (:meth:`Teacher.eval_transform`); the store's settings record it."""
    dist = dist or current()
    device = device or torch.device("cpu")
    if workers is None:
        workers = io_plan(device.type, os.cpu_count() or 1, dist.local_world)[1]
    batch_size, chunk_images = batch_and_chunk(batch_size, chunk_images)
    check_extract_args(dtype=dtype, compression=compression, batch_size=batch_size, chunk_images=chunk_images,
                       image_size=image_size, autocast=autocast, workers=workers)
    out = Path(out)
    tf_kind = transform
    transform = teacher.eval_transform(image_size, tf_kind)
    size = transform.size
    layer_list = teacher.resolve_layers(layers)
    layout = teacher.layout(size)
    n = len(source)
    if n < 1:
        raise RaptorError("no images to extract")
    settings = StoreSettings(teacher=teacher.spec, data=source.spec, n_images=n, layers=layer_list, dtype=dtype,
                             transform=transform.describe(), chunk_images=chunk_images, compression=compression,
                             autocast=autocast, sample=store_sample(source.sample))
    meta = {"version": STORE_VERSION, "settings": settings.__dict__, "teacher": teacher.describe(),
            "layout": layout.to_dict(), "class_names": source.class_names, "packages": package_versions(),
            "layer_convention": "layer 0 = embedding output; layer l = output of block l (before final norm)"}
    shape = (n, len(layer_list), layout.n_tokens, teacher.dim)
    precheck_store(out)
    with contextlib.ExitStack() as stack:
        def create():
            _open_or_create(out, settings, meta, [it.id for it in source.items], source.labels, shape)

        claim_on_main(stack, dist, out, _has_rows, create)
        import zarr

        g = zarr.open_group(str(out), mode="r+")
        done, skipped = _progress(g, out, chunk_images)
        n_before = len(done)
        n_chunks = -(-n // chunk_images)
        todo = [c for c in range(n_chunks) if c not in done and c % dist.world == dist.rank]
        if stop_after_chunks is not None:
            todo = todo[:stop_after_chunks]
        with _quiet_io_threads(io_plan(device.type, os.cpu_count() or 1, dist.local_world)[0]):
            seconds, n_run = _run_pipeline(teacher.to(device), source, g, settings, layer_list, shape, todo,
                                           transform, autocast, batch_size, progress, workers)
        if dist.active and not dist.all_ok(True):  # every rank's chunks are written (or a rank failed)
            raise RaptorError("another rank failed (its error line says why)")
        done, skipped = _progress(g, out, chunk_images)
        complete = len(done) == n_chunks and len(skipped) < n  # a store of only unreadable images is never complete
        if complete and dist.main:
            g.attrs["raptor"] = {**dict(g.attrs["raptor"]), "complete": True, "skipped": skipped}
        summary = ExtractSummary(store=str(out), n_images=n, n_extracted=n - len(skipped), skipped=list(skipped),
                                 chunks_done_before=n_before, chunks_written=len(todo), seconds=seconds,
                                 images_per_s=n_run / seconds if seconds > 0 else 0.0,
                                 bytes_stored=_dir_bytes(out), complete=complete)
        if summary.n_extracted == 0 and len(done) == n_chunks:
            raise RaptorError(f"none of the {n} images of {source.spec} could be read (first: {skipped[0]}): "
                              f"nothing to store")
        return summary


def _progress(g, out: Path, chunk_images: int) -> tuple[set[int], list[str]]:
    """(finished chunks, ids of the skipped images in row order) of an open store, as on disk now."""
    try:
        status = np.asarray(g["valid"][:])
        bad = np.flatnonzero(status == SKIPPED)
        ids = np.asarray(g["ids"][:]).tolist() if len(bad) else []
    except Exception as e:  # noqa: BLE001 - a damaged array
        raise RaptorError(f"store {out} is damaged ({type(e).__name__}: {str(e)[:120]}); use another --out or "
                          f"delete it") from None
    return set(chunks_done(status, chunk_images)), [str(ids[i]) for i in bad]


def io_plan(device_type: str, cores: int, local_world: int = 1) -> tuple[int, int]:
    """(codec threads, image-decoding workers) of one extraction rank. On the CPU the cores belong to the forward
    pass: one codec thread and one decoder. On a GPU the forward pass leaves the rank's share of the node's cores to
    compression and JPEG decoding (ViT-B writes ~5 MB per image: one LZ4 thread caps a rank near 400 img/s): half
    of the share each, 1..8."""
    if device_type != "cuda":
        return 1, 1
    share = max(1, cores // max(1, local_world))
    n = max(1, min(8, share // 2))
    return n, n


@contextlib.contextmanager
def _quiet_io_threads(n: int = 1):
    """``n`` codec threads for zarr and blosc during extraction (one on the CPU: the cores belong to the forward
    pass)."""
    import numcodecs.blosc as blosc
    import zarr

    old = blosc.get_nthreads()
    blosc.set_nthreads(n)
    try:
        with zarr.config.set({"threading.max_workers": n}):
            yield
    finally:
        blosc.set_nthreads(old)


def _run_pipeline(teacher, source, g, settings: StoreSettings, layer_list, shape, todo: list[int], transform,
                  autocast, batch_size: int, progress: bool, workers: int = 0) -> tuple[float, int]:
    """loader thread (pulls decoded chunks from ``workers`` DataLoader processes, or decodes them itself) -> main
    thread (forward) -> writer thread (write the trajectory chunks, then the chunk's status, which marks it done).
    Returns (seconds, images this run went through)."""
    arr, valid = g["trajectories"], g["valid"]
    n, c_img, dtype = shape[0], settings.chunk_images, settings.dtype
    load_q: queue.Queue = queue.Queue(maxsize=2)
    write_q: queue.Queue = queue.Queue(maxsize=2)
    errors: list[BaseException] = []
    device = next(teacher.parameters()).device
    pin = device.type == "cuda"

    stop = threading.Event()  # set when the run ends early (an error): no thread may stay blocked on a queue

    def put(q: queue.Queue, item) -> None:
        _put_until(q, item, stop)

    def load():
        _lower_thread_priority()
        try:
            chunks = ChunkDataset(source.items, transform, [(c * c_img, min((c + 1) * c_img, n)) for c in todo])
            for i, x, kept, bad, msgs in loader(chunks, workers, pin_memory=pin):
                if stop.is_set():
                    return
                put(load_q, (todo[i], *chunks.bounds[i], x, kept, bad, msgs))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
        finally:
            put(load_q, None)

    def write(item):
        c, lo, hi, block, kept, bad = item
        arr[lo:hi] = block
        v = np.full(hi - lo, SKIPPED, dtype=np.uint8)
        v[kept] = STORED
        # one chunk file, replaced atomically: only now does the chunk count as done (a kill before redoes it)
        valid[lo:hi] = v

    def writer():
        _lower_thread_priority()
        while (item := write_q.get()) is not None:
            if errors:  # after a failure (disk full, ...) only drain, so the forward loop never blocks on put
                continue
            try:
                write(item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors.append(e)

    t_start = time.perf_counter()
    n_images_run = 0
    buf = None  # reused trajectory buffer
    lt = threading.Thread(target=load, daemon=True, name="raptor-extract-loader")
    wt = threading.Thread(target=writer, daemon=True, name="raptor-extract-writer")
    lt.start()
    wt.start()
    total = sum(min((c + 1) * c_img, n) - c * c_img for c in todo)
    try:
        with progress_bar(total=total, description="extract", unit="img", enabled=progress) as bar:
            while (item := load_q.get()) is not None and not errors:
                c, lo, hi, x, kept, bad, msgs = item
                for m in msgs:
                    bar.warn(m)
                # encode here, not in the writer: torch ops from a second thread would start a second OpenMP
                # team and oversubscribe the cores the forward pass is using
                if bad:
                    block = np.zeros((hi - lo,) + tuple(shape[1:]), dtype=_STORAGE[dtype])
                parts = []
                if x is not None:
                    x = x.to(device, non_blocking=True)
                    for s in range(0, len(x), batch_size):
                        buf = teacher.trajectory(x[s:s + batch_size], layer_list, autocast=autocast, out=buf)
                        parts.append(encode(buf if device.type == "cpu" else _to_storage(buf, dtype), dtype))
                        bar.advance(len(parts[-1]))
                if bad:
                    if parts:
                        block[kept] = np.concatenate(parts)
                else:
                    block = np.concatenate(parts) if len(parts) > 1 else parts[0]
                write_q.put((c, lo, hi, block, kept, bad))
                n_images_run += hi - lo
                bar.advance(len(bad))
    finally:
        stop.set()  # frees a loader blocked on a full queue when the loop ended early
        write_q.put(None)  # the writer drains whatever is queued, so this never blocks for long
        wt.join()
    lt.join(timeout=5)
    if errors:
        raise errors[0]
    return time.perf_counter() - t_start, n_images_run


@dataclass
class ExtractConfig:
    """``raptor extract``'s settings (the command line's options, one field each)."""

    teacher: str = "bundled:dinov2-s"
    data: str = "bundled:photos"
    out: str = "runs/store.zarr"
    dtype: str = "bfloat16"
    limit: int | None = None
    sample: str = "random"
    sample_seed: int = 1
    batch_size: int | None = None
    chunk_images: int | None = None
    layers: list[int] | None = None
    image_size: int | None = None
    transform: str = "paper"
    compression: str = "lz4"
    autocast: str | None = None
    head: str | None = None
    workers: int | None = None
    device: str = "auto"

    def check(self) -> tuple[int, int]:
        """Cheap checks of the settings themselves (before the data, the output or the teacher); returns the
        resolved (batch size, chunk images)."""
        batch_size, chunk_images = batch_and_chunk(self.batch_size, self.chunk_images)
        check_extract_args(dtype=self.dtype, compression=self.compression, batch_size=batch_size,
                           chunk_images=chunk_images, image_size=self.image_size, autocast=self.autocast,
                           limit=self.limit, workers=1 if self.workers is None else self.workers)
        check_transform(self.transform)
        return batch_size, chunk_images


def run_extract(cfg: ExtractConfig, progress: bool = True) -> dict | None:
    """``raptor extract`` end to end: the cheap checks (settings, data, an existing store's settings), then the
    device and the teacher, then :func:`extract`. Returns the store's summary with this run's figures (None on a
    torchrun rank other than 0)."""
    batch_size, chunk_images = cfg.check()
    check_sample_order(cfg.sample)
    source = open_source(cfg.data).subset(cfg.limit, cfg.sample_seed, cfg.sample)
    precheck_store(cfg.out, teacher=cfg.teacher, data=source.spec, n_images=len(source), dtype=cfg.dtype,
                   chunk_images=chunk_images, compression=cfg.compression, autocast=cfg.autocast,
                   sample=store_sample(source.sample))
    dist, dev = setup(cfg.device)
    teacher = load_teacher(cfg.teacher, head=cfg.head)
    s = extract(teacher, source, cfg.out, dtype=cfg.dtype, layers=cfg.layers, batch_size=batch_size,
                chunk_images=chunk_images, image_size=cfg.image_size, compression=cfg.compression,
                autocast=cfg.autocast, progress=progress and dist.main, workers=cfg.workers, device=dev,
                transform=cfg.transform)
    if not dist.main:
        return None
    info = TrajectoryStore(cfg.out).summary()
    info["this_run"] = {"chunks_written": s.chunks_written, "chunks_already_done": s.chunks_done_before,
                        "seconds": round(s.seconds, 2), "images_per_s": round(s.images_per_s, 2),
                        "skipped_images": s.skipped}
    return info
