"""Reading a trajectory store: :class:`TrajectoryStore` opens a store (refusing a damaged one or one of a newer
format), checks it against a teacher, and reads rows, layer ranges and shuffled, prefetched batches."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from raptor.data.sampling import sample_rows
from raptor.data.stream import prefetched
from raptor.errors import RaptorError
from raptor.store.format import (
    _STORAGE,
    DTYPES,
    PENDING,
    SKIPPED,
    STORED,
    _dir_bytes,
    _read_json,
    _read_legacy_manifest,
    _refuse_other_version,
    chunks_done,
    decode,
)
from raptor.teachers.base import TokenLayout
from raptor.versions import require


class TrajectoryStore:
    """Read access to a store made by :func:`extract`."""

    def __init__(self, path: str | Path):
        import zarr

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
