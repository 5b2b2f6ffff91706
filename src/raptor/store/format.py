"""The trajectory store's on-disk format: the format version, per-image statuses, dtypes and their storage encoding,
compressors, the settings that fingerprint a store, and the helpers that read (or refuse) what is on disk: json side
files and the manifest of format-1 stores, a store of another format version, the store's size."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raptor.errors import RaptorError

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


def _to_storage(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """A device trajectory as CPU tensor in the storage precision: the cast runs on the GPU and only half the bytes
    cross the bus for 16-bit stores."""
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    return x.to(table[dtype]).cpu()


def _compressors(name: str, itemsize: int):
    from zarr.codecs import BloscCodec

    if name == "none":
        return None
    if name not in COMPRESSIONS:
        raise RaptorError(f"unknown compression {name!r} (use {', '.join(COMPRESSIONS)})")
    # bit-shuffle groups the (slowly varying) exponent bits of neighbouring floats: on bf16 trajectories LZ4
    # then compresses better than raw writes at a fraction of zstd's time (figures: docs/benchmarks.md)
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
