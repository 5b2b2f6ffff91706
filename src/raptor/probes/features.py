"""Probe inputs computed **once** per (backbone, data, split, transform) and cached on disk, then reused by every
head, learning rate and seed.

A cached split is a directory ``<cache>/<backbone id>/<task>-<data>-<split>-<hash>/`` of ``.npy`` arrays (read back
memory-mapped) plus ``key.json`` (what was computed) and ``meta.json``, written **last**: a directory without
``meta.json`` is unfinished. Arrays are filled batch by batch and ``progress.json`` records how many images are
done, so an interrupted pass resumes where it stopped.

What is stored (all after the teacher's final norm):

- ``cls`` task: ``pooled`` (N, 2D) = [cls || mean patch] (mean patch alone for cls-less teachers), ``labels`` (N,);
- ``seg`` / ``depth``: ``patches`` (N, gh, gw, D) and ``cls`` (N, D) in float16, and the targets at the evaluation
  resolution: ``masks`` (N, H, W) uint8 (255 = ignore) or ``depth`` (N, H, W) float32 metres (0 = invalid);
- ``valid`` (N,): False for an image that could not be read (skipped with a warning, never silently).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from raptor.config import atomic_write_text
from raptor.data.sources import ImageLoadWarning
from raptor.data.transforms import EvalTransform, to_rgb, to_tensor
from raptor.distributed import current
from raptor.errors import RaptorError
from raptor.outputs import safe_name
from raptor.probes.data import IGNORE, ProbeData, Sample

FEATURE_VERSION = 1


@dataclass(frozen=True)
class DenseTransform:
    """Image and target together. ``size``: both resized to size x size (image bilinear, target nearest: the ADE20k
    protocol); ``None``: native resolution, the image centre-padded with zeros (after normalisation) to a multiple
    of the patch size and the target left as it is (the NYUd protocol; predictions are cropped back)."""

    size: int | None
    patch: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, img: Image.Image, target: np.ndarray, sid: str) -> tuple[torch.Tensor, np.ndarray]:
        img = to_rgb(img)
        if tuple(target.shape) != (img.size[1], img.size[0]):
            raise RaptorError(f"{sid}: target size {target.shape[1]}x{target.shape[0]} differs from the image size "
                              f"{img.size[0]}x{img.size[1]} (width x height); masks and depth maps must match their "
                              f"images pixel for pixel")
        if self.size is not None:
            img = img.resize((self.size, self.size), Image.BILINEAR)
            target = np.asarray(Image.fromarray(target).resize((self.size, self.size), Image.NEAREST))
        x = to_tensor(img, self.mean, self.std)
        top, left = self.padding(x.shape[1], x.shape[2])
        hp, wp = self.padded(x.shape[1]), self.padded(x.shape[2])
        if (hp, wp) != tuple(x.shape[1:]):
            x = F.pad(x, (left, wp - x.shape[2] - left, top, hp - x.shape[1] - top))
        return x, np.ascontiguousarray(target)

    def padded(self, n: int) -> int:
        return -(-n // self.patch) * self.patch

    def padding(self, h: int, w: int) -> tuple[int, int]:
        return (self.padded(h) - h) // 2, (self.padded(w) - w) // 2

    def describe(self) -> dict:
        return {"kind": "dense", "size": self.size, "patch": self.patch, "mean": list(self.mean),
                "std": list(self.std), "image_resample": "bilinear", "target_resample": "nearest",
                "padding": "centre, zeros after normalisation"}


def transform_for(task: str, data: ProbeData, teacher, size: int | None, kind: str = "paper"):
    """The input transform of a task: the eval crop for ``cls`` (``kind``: paper | model, as
    :meth:`Teacher.eval_transform`; at the data set's size unless ``size``), :class:`DenseTransform` for dense
    tasks."""
    if task == "cls":
        crop = teacher.image_size(size if size is not None else data.image_size)
        if hasattr(teacher, "eval_transform"):  # not the raw-pixel baseline
            return teacher.eval_transform(crop, kind)
        return EvalTransform.for_size(crop, teacher.image_mean, teacher.image_std)
    size = size if size is not None else data.image_size
    if size is not None:
        teacher.image_size(size)  # a multiple of the patch size
    return DenseTransform(size, teacher.patch_size, teacher.image_mean, teacher.image_std)


class ArraySet:
    """A resumable set of equally long ``.npy`` arrays in a directory (module doc)."""

    def __init__(self, root: Path, key: dict):
        self.root, self.key = Path(root), key

    @property
    def complete(self) -> bool:
        return (self.root / "meta.json").is_file()

    def open(self) -> dict[str, np.ndarray]:
        meta = json.loads((self.root / "meta.json").read_text())
        return {n: np.load(self.root / f"{n}.npy", mmap_mode="r") for n in meta["arrays"]}

    def done(self) -> int:
        kf, pf = self.root / "key.json", self.root / "progress.json"
        try:
            if json.loads(kf.read_text()) != json.loads(json.dumps(self.key)):
                return 0
            return int(json.loads(pf.read_text())["done"])
        except (OSError, ValueError, KeyError):
            return 0

    def fill(self, n: int, batches, progress_bar=None) -> dict[str, np.ndarray]:
        """``batches(start)`` yields (start, {name: array batch}) from image ``start`` on; resumes after a crash."""
        start = self.done()
        if start == 0:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root.mkdir(parents=True)
            atomic_write_text(self.root / "key.json", json.dumps(self.key, indent=1))
        arrays: dict[str, np.ndarray] = {}
        if start:
            names = json.loads((self.root / "progress.json").read_text())["arrays"]
            arrays = {a: np.load(self.root / f"{a}.npy", mmap_mode="r+") for a in names}
            if progress_bar is not None:
                progress_bar.advance(start)
        for s, batch in batches(start):
            if not arrays:
                for a, v in batch.items():
                    arrays[a] = np.lib.format.open_memmap(self.root / f"{a}.npy", mode="w+", dtype=v.dtype,
                                                          shape=(n, *v.shape[1:]))
            for a, v in batch.items():
                if v.shape[1:] != arrays[a].shape[1:]:
                    raise RaptorError(f"{a} of images {s}..{s + len(v) - 1} has shape {v.shape[1:]}, earlier "
                                      f"images {arrays[a].shape[1:]}: all images of a split must give the same "
                                      f"size (pass --image-size)")
                arrays[a][s:s + len(v)] = v
            for a in arrays.values():
                a.flush()
            atomic_write_text(self.root / "progress.json", json.dumps({"done": s + len(v), "arrays": list(arrays)}))
            if progress_bar is not None:
                progress_bar.advance(len(v))
        atomic_write_text(self.root / "meta.json", json.dumps({"arrays": list(arrays), "n": n,
                                                               "version": FEATURE_VERSION}))
        return self.open()


def split_key(backbone_id: dict, data: ProbeData, task: str, split: str, transform) -> dict:
    samples = data.splits[split]
    ids = hashlib.sha1("\n".join(s.id for s in samples).encode()).hexdigest()
    return {"version": FEATURE_VERSION, "backbone": backbone_id, "task": task, "data": data.spec, "split": split,
            "n": len(samples), "ids_sha1": ids, "transform": transform.describe()}


def cache_dir(cache: Path, key: dict) -> Path:
    h = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache) / key["backbone"]["id"] / f"{key['task']}-{safe_name(key['data'])}-{key['split']}-{h}"


def _load(sample: Sample, task: str, transform):
    img = sample.image()
    tgt = sample.target()
    if task == "cls":
        return transform(img), np.int64(tgt)
    tgt = np.asarray(tgt)
    tgt = tgt.astype(np.uint8) if task == "seg" else np.nan_to_num(tgt.astype(np.float32), nan=0.0, posinf=0.0)
    return transform(img, tgt, sample.id)


@torch.no_grad()
def split_features(backbone, data: ProbeData, task: str, split: str, transform, cache: Path, batch: int = 32,
                   progress: bool = True) -> dict[str, np.ndarray]:
    """The cached arrays of one split (computed on the first call, resumed if interrupted; module doc)."""
    from raptor.progress import progress_bar

    key = split_key(backbone.identity(), data, task, split, transform)
    aset = ArraySet(cache_dir(cache, key), key)
    if aset.complete:
        return aset.open()
    samples = data.splits[split]
    layout_cache: dict = {}

    def one(s: int) -> dict:
        chunk = samples[s:s + batch]
        xs, ts, ok = [], [], []
        for smp in chunk:
            try:
                x, t = _load(smp, task, transform)
            except RaptorError:
                raise
            except Exception as e:  # noqa: BLE001 - an unreadable image is skipped and named
                warnings.warn(f"skipping unreadable image {smp.id}: {type(e).__name__}: {str(e)[:120]}",
                              ImageLoadWarning, stacklevel=2)
                x, t = None, None
            xs.append(x)
            ts.append(t)
            ok.append(x is not None)
        if not any(ok):
            raise RaptorError(f"none of images {s}..{s + len(chunk) - 1} of the {split} split could be read")
        good = next(i for i, v in enumerate(ok) if v)
        xs = [x if x is not None else torch.zeros_like(xs[good]) for x in xs]
        ts = [t if t is not None else np.zeros_like(ts[good]) for t in ts]
        tokens = backbone.final_tokens(torch.stack(xs))
        hw = tuple(xs[good].shape[1:])
        if hw not in layout_cache:
            layout_cache[hw] = backbone.teacher.layout(hw)
        out = backbone.features(tokens, layout_cache[hw], task)
        tgt = np.stack(ts)
        if task == "seg":
            tgt[~np.array(ok)] = IGNORE
        out.update({"labels" if task == "cls" else ("masks" if task == "seg" else "depth"): tgt,
                    "valid": np.array(ok)})
        return out

    def batches(start: int):
        for s in range(start, len(samples), batch):
            yield s, one(s)

    dist = current()
    if dist.active:  # torchrun: each rank computes every world-th batch, rank 0 writes them all in order
        mine = {s: one(s) for s in list(range(aset.done(), len(samples), batch))[dist.rank::dist.world]}
        parts = dist.gather_to_main(mine)  # between our own ranks (never from a file), through the CPU
        if dist.main:
            merged = {s: v for p in parts for s, v in p.items()}
            aset.fill(len(samples), lambda start: ((s, merged[s]) for s in sorted(merged) if s >= start))
        dist.wait_all()
        return aset.open()

    with progress_bar(len(samples), f"features {backbone.label} · {split}", "img", enabled=progress) as bar:
        return aset.fill(len(samples), batches, bar)
