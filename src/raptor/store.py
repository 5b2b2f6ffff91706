"""Trajectory store (zarr v3): every image's trajectory, shape (N, layers, tokens, dim).

Layout of a store directory::

    STORE/zarr.json            group; attrs["raptor"] = metadata (teacher, layout, transform, dtype, versions, ...)
    STORE/trajectories/        (N, n_layers, T, D), chunks (chunk_images, 1, T, D): a layer range of a batch of
                               images is a handful of whole-chunk reads
    STORE/valid/               (N,) uint8 status, chunks (chunk_images,): 0 = not extracted yet, 1 = stored,
                               2 = image unreadable (skipped)
    STORE/labels/              (N,) int64 (-1 = no label)
    STORE/ids/                 (N,) variable-length UTF-8 strings: image ids in row order

Nothing else lives in the directory (plain zarr lists the hierarchy without warnings; the run's lock file is removed
when the run ends). ``bfloat16`` is stored as its raw 16-bit pattern (uint16; zarr has no bfloat16) with the logical
dtype in the metadata (and in the ``trajectories`` attribute ``logical_dtype``); readers return float32.

Extraction is resumable: a store chunk counts as done once its ``valid`` chunk is written (every status non-zero),
which happens only after all its trajectory chunks are; zarr writes each chunk file atomically (temp file + rename),
so a SIGKILL at any moment followed by the same command gives arrays equal to an uninterrupted run. Creation is
finished once the metadata carries ``created``; ``complete`` turns true only at the very end. Under torchrun each rank
writes only its own chunks of ``trajectories`` and ``valid`` (rank 0 creates the store), so no file is shared.
Format 1 stores (``ids.json`` and ``manifest.json`` beside the arrays) are still read, but not resumed or extended.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from raptor.errors import RaptorError, check_positive
from raptor.outputs import LOCK_NAME, only_lock_inside
from raptor.teachers.base import TokenLayout

STORE_VERSION = 2  # 2: ids and chunk progress are zarr arrays (1: ids.json + manifest.json side files)
PENDING, STORED, SKIPPED = 0, 1, 2  # per-image status in the ``valid`` array
DTYPES = ("bfloat16", "float16", "float32")
COMPRESSIONS = ("lz4", "zstd", "none")
_STORAGE = {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}


def encode(x: torch.Tensor, dtype: str) -> np.ndarray:
    """float tensor -> a new numpy array (never a view of ``x``) in the store's storage dtype."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if dtype == "float16":
        return x.to(torch.float16).numpy()
    return x.to(torch.float32).numpy().copy()


def decode(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Storage array -> float32 tensor."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def _compressors(name: str, itemsize: int):
    from zarr.codecs import BloscCodec

    if name == "none":
        return None
    if name not in COMPRESSIONS:
        raise RaptorError(f"unknown compression {name!r} (use {', '.join(COMPRESSIONS)})")
    # bit-shuffle groups the (slowly varying) exponent bits of neighbouring floats: on bf16 trajectories LZ4
    # then stores 74.5 % of the raw bytes at ~2 GB/s, which beats both raw writes and zstd (78 %, 4x slower)
    return BloscCodec(cname=name, clevel=1 if name == "zstd" else 5, shuffle="bitshuffle", typesize=itemsize)


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for p in ("raptor-brh", "torch", "transformers", "zarr", "numpy"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = "not installed"
    return out


@dataclass
class StoreSettings:
    """Everything that determines a store's contents; a re-run must match it exactly to resume."""

    teacher: str
    data: str
    n_images: int
    layers: list[int]
    dtype: str
    transform: dict
    chunk_images: int
    compression: str
    autocast: str | None = None
    sample: dict | None = None  # --limit: {"limit", "order", "seed"} of the sample (the chosen ids are the store's)

    def fingerprint(self) -> str:
        blob = json.dumps(self.__dict__, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def store_sample(record: dict | None) -> dict | None:
    """The part of a source's --limit record that a store's settings hold (None: every image)."""
    if not record or record.get("ids") is None:
        return None
    return {k: record[k] for k in ("limit", "order", "seed")}


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


def _read_json(store: Path, name: str):
    try:
        return json.loads((store / name).read_text())
    except FileNotFoundError:
        raise RaptorError(f"store {store} is damaged: {name} is missing") from None
    except ValueError as e:
        raise RaptorError(f"store {store} is damaged: {name} is not valid JSON ({e})") from None


def _read_legacy_manifest(store: Path) -> dict:
    """A format-1 store's manifest.json (finished chunks, skipped images), refused with one line when damaged."""
    m = _read_json(store, "manifest.json")
    if not isinstance(m, dict) or not isinstance(m.get("done", []), list) or \
            not isinstance(m.get("skipped", []), list):
        raise RaptorError(f"store {store} is damaged: manifest.json is not a Raptor manifest")
    return m


def chunks_done(status: np.ndarray, chunk_images: int) -> list[int]:
    """The store chunks every image of which has a status (stored or skipped): the finished ones."""
    n_chunks = -(-len(status) // chunk_images)
    full = np.ones(n_chunks * chunk_images, dtype=bool)
    full[:len(status)] = np.asarray(status) != PENDING
    return np.flatnonzero(full.reshape(n_chunks, chunk_images).all(axis=1)).tolist()


def _refuse_other_version(path: Path, version, action: str = "read") -> None:
    """One line for a store of a format this raptor cannot ``action`` (read: newer ones; resume: any other)."""
    if not isinstance(version, int) or version > STORE_VERSION:
        raise RaptorError(f"store {path} has format version {version!r}; this raptor reads up to "
                          f"{STORE_VERSION}: upgrade raptor-brh to read it")
    if action != "read" and version != STORE_VERSION:
        raise RaptorError(f"store {path} was made by an older raptor (store format {version}, this raptor writes "
                          f"{STORE_VERSION}): it can still be read, but not resumed or extended; re-extract into "
                          f"another --out (or delete it)")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _put_until(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first (a thread never stays blocked on a queue nobody reads)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def prefetched(gen: Iterator, depth: int, name: str = "raptor-prefetch") -> Iterator:
    """Run the generator ``gen`` up to ``depth`` items ahead in a daemon thread. Its exceptions surface in the
    consumer; a consumer that stops early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for x in gen:
                if not _put_until(q, (x, None), stop):
                    return
        except BaseException as e:  # noqa: BLE001 - raised in the consumer
            _put_until(q, (end, e), stop)
            return
        _put_until(q, (end, None), stop)

    threading.Thread(target=produce, daemon=True, name=name).start()
    try:
        while True:
            x, err = q.get()
            if err is not None:
                raise err
            if x is end:
                return
            yield x
    finally:
        stop.set()


class TrajectoryStore:
    """Read access to a store made by :func:`extract`."""

    def __init__(self, path: str | Path):
        import zarr

        from raptor.versions import require

        require("zarr")
        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            raise RaptorError(f"not a trajectory store (no zarr.json): {self.path}")
        try:
            self.group = zarr.open_group(str(self.path), mode="r")
            meta = self.group.attrs.get("raptor")
        except Exception as e:  # noqa: BLE001 - zarr raises several kinds on a damaged zarr.json
            raise RaptorError(f"cannot open store {self.path}: its zarr.json is damaged ({type(e).__name__}: "
                              f"{str(e)[:120]})") from None
        if not meta:
            raise RaptorError(f"{self.path} is a zarr group but not a Raptor trajectory store")
        self.meta: dict = dict(meta)
        version = self.meta.get("version")
        _refuse_other_version(self.path, version)
        self._legacy = version < 2  # format 1: ids.json + manifest.json; valid is 1 = extracted, 0 = anything else
        self._ids: list[str] | None = None
        arrays = {}
        for name in ("trajectories", "valid", "labels") + (() if self._legacy else ("ids",)):
            try:
                arrays[name] = self.group[name]
            except KeyError:
                raise RaptorError(f"store {self.path} is damaged or incomplete: its {name} array is missing") \
                    from None
            except Exception as e:  # noqa: BLE001 - zarr raises several kinds on a damaged array zarr.json
                raise RaptorError(f"store {self.path} is damaged: the metadata of its {name} array ({name}/zarr.json) "
                                  f"cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
        self.array = arrays["trajectories"]
        self._status_array = arrays["valid"]
        self._ids_array = arrays.get("ids")
        try:
            s = self.meta["settings"]
            self.dtype: str = s["dtype"]
            self.layers: list[int] = [int(x) for x in s["layers"]]
            self.layout = TokenLayout.from_dict(self.meta["layout"])
            self._valid = self._read_status() == STORED
            self.labels = np.asarray(arrays["labels"][:])
        except RaptorError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise RaptorError(f"store {self.path} is damaged or incomplete (missing {e})") from None
        except Exception as e:  # noqa: BLE001 - a damaged array's zarr.json
            raise RaptorError(f"store {self.path} is damaged ({type(e).__name__}: {str(e)[:120]})") from None
        if self.dtype not in DTYPES:
            raise RaptorError(f"store {self.path} has an unknown dtype {self.dtype!r}")
        if np.dtype(self.array.dtype) != np.dtype(_STORAGE[self.dtype]):
            raise RaptorError(f"store {self.path}: trajectories are {self.array.dtype}, but its metadata says "
                              f"{self.dtype} (stored as {_STORAGE[self.dtype]}); the store is damaged")
        shape = tuple(self.array.shape)
        if len(shape) != 4 or shape[1] != len(self.layers) or shape[2] != self.layout.n_tokens or \
                len(self._valid) != shape[0] or len(self.labels) != shape[0] or \
                (self._ids_array is not None and tuple(self._ids_array.shape) != shape[:1]):
            raise RaptorError(f"store {self.path}: array shape {list(shape)} does not match its metadata "
                              f"({len(self.layers)} layers, {self.layout.n_tokens} tokens); the store is damaged")

    def _read_status(self) -> np.ndarray:
        """The per-image status (PENDING / STORED / SKIPPED) as it is on disk now."""
        try:
            v = np.asarray(self._status_array[:]).astype(np.uint8)
        except Exception as e:  # noqa: BLE001 - a damaged chunk
            raise RaptorError(f"store {self.path} is damaged: its valid array cannot be read ({type(e).__name__}: "
                              f"{str(e)[:120]})") from None
        return np.where(v != 0, STORED, PENDING).astype(np.uint8) if self._legacy else v

    def require_complete(self, why: str = "") -> None:
        """Refuse a store whose extraction has not finished."""
        if not self.complete:
            raise RaptorError(f"store {self.path} is incomplete ({self.summary()['chunks_done']} chunks): finish it "
                              f"first (re-run the same extract command)" + (f"; {why}" if why else ""))

    def require_teacher_spec(self, spec: str) -> None:
        """Refuse a store another teacher wrote (by spec: cheap, before any teacher loads)."""
        made = self.meta["settings"]["teacher"]
        if made != spec:
            raise RaptorError(f"store {self.path} was made with {made}, not {spec}")

    def require_every_layer(self, command: str) -> int:
        """Refuse a store without every layer 0..L; returns L."""
        depth = int(self.meta["teacher"]["depth"])
        missing = sorted(set(range(depth + 1)) - set(self.layers))
        if missing:
            raise RaptorError(f"store {self.path} lacks layers {missing}: {command} needs every layer 0..{depth} "
                              f"(extract without --layers)")
        return depth

    def check_teacher(self, teacher) -> None:
        """Refuse a store that another teacher (or another crop size / dim) wrote."""
        s = self.meta["settings"]
        self.require_teacher_spec(teacher.spec)
        if self.array.shape[3] != teacher.dim:
            raise RaptorError(f"store {self.path} holds dim {self.array.shape[3]}, the teacher has {teacher.dim}")
        size = int(s["transform"]["center_crop"])
        if teacher.layout(size).n_tokens != self.layout.n_tokens:
            raise RaptorError(f"store {self.path} holds {self.layout.n_tokens} tokens per image, the teacher gives "
                              f"{teacher.layout(size).n_tokens} at {size} px")
        if max(self.layers) > teacher.depth:
            raise RaptorError(f"store {self.path} holds layers up to {max(self.layers)}, the teacher has "
                              f"{teacher.depth}")

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def n_images(self) -> int:
        return int(self.array.shape[0])

    @property
    def valid_indices(self) -> np.ndarray:
        return np.flatnonzero(self._valid)

    def sample(self, limit: int | None, seed: int = 1, order: str = "random") -> np.ndarray:
        """``--limit`` of the extracted rows (ascending): a seeded sample stratified by label, or the first N
        (``order="sorted"``), as :meth:`raptor.data.ImageSource.subset` chooses images."""
        from raptor.data.sampling import sample_rows

        return sample_rows(self.valid_indices, limit, self.labels, seed, order)

    @property
    def ids(self) -> list[str]:
        """Image ids in row order (written once, at creation)."""
        if self._ids is None:
            if self._legacy:
                self._ids = _read_json(self.path, "ids.json")
            else:
                try:
                    self._ids = [str(x) for x in np.asarray(self._ids_array[:]).tolist()]
                except Exception as e:  # noqa: BLE001 - a damaged chunk
                    raise RaptorError(f"store {self.path} is damaged: its ids array cannot be read "
                                      f"({type(e).__name__}: {str(e)[:120]})") from None
        return list(self._ids)

    @property
    def manifest(self) -> dict:
        """{"done": finished chunk indices, "skipped": ids of the unreadable images}, as on disk now."""
        if self._legacy:
            return _read_legacy_manifest(self.path)
        status = self._read_status()
        skipped = np.flatnonzero(status == SKIPPED)
        ids = self.ids if len(skipped) else []
        return {"done": chunks_done(status, self.chunk_images), "skipped": [ids[i] for i in skipped]}

    @property
    def chunk_images(self) -> int:
        return int(self.array.chunks[0])

    def layer_positions(self, layers: tuple[int, int] | Sequence[int] | None) -> tuple[int, int]:
        """Stored-axis range [p0, p1) for an inclusive teacher-layer range (first, last)."""
        if layers is None:
            return 0, len(self.layers)
        first, last = (layers[0], layers[-1])
        try:
            p0, p1 = self.layers.index(first), self.layers.index(last)
        except ValueError:
            raise RaptorError(f"layers {first}..{last} not in this store (it holds layers {self.layers})") from None
        if self.layers[p0:p1 + 1] != list(range(first, last + 1)):
            raise RaptorError(f"layer range {first}..{last} is not contiguous in this store ({self.layers})")
        return p0, p1 + 1

    def read(self, rows: slice | np.ndarray, layers: tuple[int, int] | None = None) -> torch.Tensor:
        """float32 (rows, layers, T, D) for a row slice or sorted index array, inclusive layer range."""
        p0, p1 = self.layer_positions(layers)
        if isinstance(rows, slice):
            a = self.array[rows, p0:p1]
        else:
            a = self.array.oindex[np.asarray(rows), slice(p0, p1)]
        return decode(np.asarray(a), self.dtype)

    def batches(self, batch_size: int, layers: tuple[int, int] | None = None, *, shuffle: bool = True,
                seed: int = 0, epochs: int | None = 1, prefetch: int = 4, drop_last: bool = False,
                rows: np.ndarray | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (trajectories (B, layers, T, D) float32, row indices) with background prefetch.

        Reads whole chunk windows (one cheap read per layer chunk) in shuffled order, shuffles within a buffer of
        two windows, and only yields valid rows (optionally restricted to ``rows``). ``epochs=None`` loops forever.
        """
        if batch_size <= 0:
            raise RaptorError("batch size must be positive")
        p0, p1 = self.layer_positions(layers)
        allowed = self._valid.copy()
        if rows is not None:
            mask = np.zeros_like(allowed)
            mask[np.asarray(rows)] = True
            allowed &= mask
        c = self.chunk_images
        windows = [w for w in range(0, self.n_images, c) if allowed[w:w + c].any()]
        if not windows:
            raise RaptorError(f"store {self.path} has no readable rows for this selection")
        yield from prefetched(self._window_batches(windows, allowed, p0, p1, batch_size, shuffle, seed, epochs,
                                                   drop_last), prefetch, "raptor-store-reader")

    def _window_batches(self, windows, allowed, p0: int, p1: int, batch_size: int, shuffle: bool, seed: int,
                        epochs: int | None, drop_last: bool):
        """The batches of :meth:`batches`, read window by window (run in its reader thread)."""
        c = self.chunk_images
        rng = np.random.default_rng(seed)
        epoch = 0
        while epochs is None or epoch < epochs:
            order = rng.permutation(len(windows)) if shuffle else np.arange(len(windows))
            buf_x: list[torch.Tensor] = []
            buf_i: list[np.ndarray] = []
            n_buf = 0
            for k, wi in enumerate(order):
                w0 = windows[wi]
                w1 = min(w0 + c, self.n_images)
                keep = np.flatnonzero(allowed[w0:w1])
                x = decode(np.asarray(self.array[w0:w1, p0:p1]), self.dtype)[keep]
                buf_x.append(x)
                buf_i.append(keep + w0)
                n_buf += len(keep)
                last = k == len(order) - 1
                if n_buf >= 2 * batch_size or last or n_buf >= 2 * c:
                    X = torch.cat(buf_x)
                    I = np.concatenate(buf_i)
                    if shuffle:
                        perm = torch.from_numpy(rng.permutation(len(I)))
                        X, I = X[perm], I[perm.numpy()]
                    n_out = (len(I) // batch_size) * batch_size if not last else len(I)
                    for s in range(0, n_out, batch_size):
                        xb, ib = X[s:s + batch_size], I[s:s + batch_size]
                        if len(ib) < batch_size and drop_last:
                            continue
                        yield xb, ib
                    buf_x, buf_i = ([X[n_out:]], [I[n_out:]]) if n_out < len(I) else ([], [])
                    n_buf = len(I) - n_out
            epoch += 1

    def summary(self) -> dict:
        s = self.meta["settings"]
        man = self.manifest
        n_chunks = -(-self.n_images // self.chunk_images)
        nbytes = _dir_bytes(self.path)
        n_valid = int(self._valid.sum())
        return {
            "store": str(self.path), "complete": self.complete, "teacher": s["teacher"],
            "teacher_name": self.meta["teacher"].get("name"), "data": s["data"], "images": self.n_images,
            "extracted": n_valid, "skipped": len(man.get("skipped", [])),
            "chunks_done": f"{len(man.get('done', []))}/{n_chunks}", "layers": f"{s['layers'][0]}..{s['layers'][-1]}"
            if s["layers"] == list(range(s["layers"][0], s["layers"][-1] + 1)) else s["layers"],
            "shape": list(self.array.shape), "dtype": self.dtype, "compression": s["compression"],
            "layout": self.layout.to_dict(), "bytes": nbytes,
            "bytes_per_image": round(nbytes / max(1, n_valid)),
        }


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
    from raptor.teachers.base import check_autocast
    from raptor.versions import require

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
            dist=None) -> ExtractSummary:
    """Write (or resume writing) the trajectories of every image of ``source`` into a store at ``out``.

    The directory is locked for the run (a second writer is refused); a run that fails before extracting any
    image removes the store it created; a source none of whose images can be read is refused, never "complete".
    ``workers``: image-decoding processes (0: a thread; None: :func:`io_plan`'s for the device). Under torchrun
    (``dist``, default: the current process group) rank ``r`` extracts the chunks ``c`` with ``c % world == r``
    into the same store (see :mod:`raptor.distributed`)."""
    from raptor.distributed import claim_on_main, current

    dist = dist or current()
    device = device or torch.device("cpu")
    if workers is None:
        workers = io_plan(device.type, os.cpu_count() or 1, dist.local_world)[1]
    batch_size, chunk_images = batch_and_chunk(batch_size, chunk_images)
    check_extract_args(dtype=dtype, compression=compression, batch_size=batch_size, chunk_images=chunk_images,
                       image_size=image_size, autocast=autocast, workers=workers)
    out = Path(out)
    size = teacher.image_size(image_size)
    transform = teacher.eval_transform(size)
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
        from raptor.runtime import tune_malloc

        tune_malloc()
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
    from raptor.data.stream import ChunkDataset, loader
    from raptor.progress import progress_bar

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


def _to_storage(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """A device trajectory as CPU tensor in the storage precision: the cast runs on the GPU and only half the bytes
    cross the bus for 16-bit stores."""
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return x.to(table[dtype]).cpu()
