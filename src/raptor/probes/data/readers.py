"""Readers of real dataset layouts under a root folder (``<reader>:<root>``), the release's files read lazily:

- ``imagenet:<root>`` or ``<root>`` (cls): class-per-folder ``train/`` and ``val/`` (ImageNet layout; an optional
  ``test/``);
- ``ade20k:<root>`` (seg): the ADEChallengeData2016 / SceneParse150 release: ``images/{training,validation}/
  *.jpg``, ``annotations/{training,validation}/*.png``; raw 0 = background -> ignored, 1..150 -> 0..149;
- ``nyud:<root>`` (depth): the layout of the official code: ``data/nyu2_train.csv`` and ``data/nyu2_test.csv``,
  rows ``rgb path,depth path`` relative to the root; train depth 8-bit scaled to 10 m, test depth 16-bit
  millimetres; Eigen crop;
- ``paired:<root>`` (depth): ``rgb/*.png`` + ``depth/*.png`` in millimetres, matched by file stem, either in
  ``train/`` and ``test/`` subfolders or one folder split 80/20.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from raptor.data.sources import file_loader, folder_source
from raptor.errors import RaptorError
from raptor.probes.data import IGNORE, ProbeData, Sample, carve_val, constant, split_ids

EIGEN_CROP = (45, 471, 41, 601)  # rows [45, 471), cols [41, 601) of a 480 x 640 NYUd depth map


# ---- classification ---------------------------------------------------------------------------------------------

def class_folders(root: Path, spec: str) -> ProbeData:
    """ImageNet layout: ``root/{train,val[,test]}/<class>/*.jpg``; classes from ``train``."""
    for s in ("train", "val"):
        if not (root / s).is_dir():
            raise RaptorError(f"{spec}: missing split folder {root / s} (expected class-per-folder train/ and val/)")
    sources = {"train": folder_source(root / "train", spec, with_classes=True)}  # scanned once: it names the classes
    names = sources["train"].class_names
    index = {n: i for i, n in enumerate(names)}

    def read(split: str) -> list[Sample]:
        src = sources.get(split) or folder_source(root / split, spec, with_classes=True)
        extra = sorted(set(src.class_names) - set(names))
        if extra:
            raise RaptorError(f"{spec}: {split}/ has classes that train/ lacks: {extra[:5]}")
        return [Sample(f"{split}/{it.id}", it.load, constant(index[src.class_names[it.label]])) for it in src.items]

    splits = {"train": read("train"), "val": read("val")}
    if (root / "test").is_dir():
        splits["test"] = read("test")
    else:
        splits["test"] = splits["val"]
        splits["train"], splits["val"] = carve_val(splits["train"])
    if len(names) < 2:
        raise RaptorError(f"{spec}: train/ holds {len(names)} class folder(s); a classifier needs at least 2")
    return ProbeData(spec, "cls", splits, len(names), names,
                     about=f"class-per-folder images under {root}" + ("" if (root / "test").is_dir() else
                                                                       " (val = 10 % of train; test = val/)"))


# ---- segmentation -----------------------------------------------------------------------------------------------

def ade20k(root: Path, spec: str) -> ProbeData:
    def read(split: str) -> list[Sample]:
        idir, adir = root / "images" / split, root / "annotations" / split
        if not idir.is_dir() or not adir.is_dir():
            raise RaptorError(f"{spec}: missing split {split!r}: expected {idir} and {adir} (the ADE20k release "
                              f"layout images/{{training,validation}}, annotations/{{training,validation}})")
        images = sorted(p for p in idir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not images:
            raise RaptorError(f"{spec}: no images in {idir}")
        out = []
        for p in images:
            m = next((q for q in (adir / f"{p.stem}.png", adir / f"{p.stem}_seg.png") if q.is_file()), None)
            if m is None:
                raise RaptorError(f"{spec}: image {p.name} has no annotation {adir / (p.stem + '.png')}")
            out.append(Sample(f"{split}/{p.stem}", file_loader(p), _ade_mask(m)))
        return out

    train, test = read("training"), read("validation")
    train, val = carve_val(train)
    return ProbeData(spec, "seg", {"train": train, "val": val, "test": test}, 150, image_size=518,
                     about=f"ADE20k (SceneParse150) at {root}; val = 10 % of training, test = validation")


def _ade_mask(p: Path) -> Callable[[], np.ndarray]:
    def load():
        with Image.open(p) as im:
            raw = np.asarray(im)
        if raw.ndim != 2:
            raise RaptorError(f"annotation {p} is not a single-channel label image (mode {im.mode})")
        lab = raw.astype(np.int64) - 1  # 0 = background -> -1 -> ignored; 1..150 -> 0..149
        lab[(lab < 0) | (lab >= 150)] = IGNORE
        return lab.astype(np.uint8)
    return load


# ---- depth ------------------------------------------------------------------------------------------------------

def _depth_png(p: Path, scale_m: float) -> Callable[[], np.ndarray]:
    def load():
        with Image.open(p) as im:
            a = np.asarray(im)
        if a.ndim != 2:
            raise RaptorError(f"depth map {p} is not single-channel (mode {im.mode})")
        return (a.astype(np.float32) * scale_m).astype(np.float32)
    return load


def nyud(root: Path, spec: str) -> ProbeData:
    def read(name: str, scale: float) -> list[Sample]:
        f = root / "data" / name
        if not f.is_file():
            raise RaptorError(f"{spec}: missing split file {f} (the layout of the official NYUd probe: "
                              f"data/nyu2_train.csv and data/nyu2_test.csv)")
        out = []
        with open(f, newline="") as fh:
            for row in csv.reader(fh):
                if not row or not row[0].strip():
                    continue
                if len(row) < 2:
                    raise RaptorError(f"{f}: row {row} needs two columns: rgb path, depth path")
                rgb, dep = root / row[0].strip(), root / row[1].strip()
                for p in (rgb, dep):
                    if not p.is_file():
                        raise RaptorError(f"{f}: file {p} not found")
                out.append(Sample(row[0].strip(), file_loader(rgb), _depth_png(dep, scale)))
        if not out:
            raise RaptorError(f"{f} lists no images")
        return out

    train = read("nyu2_train.csv", 10.0 / 255.0)   # 8-bit, 255 = 10 m
    test = read("nyu2_test.csv", 1.0 / 1000.0)     # 16-bit millimetres
    train, val = carve_val(train)
    return ProbeData(spec, "depth", {"train": train, "val": val, "test": test}, depth_range=(0.001, 10.0),
                     eigen_crop=True, image_size=None,
                     about=f"NYUd v2 (official probe's CSV layout) at {root}; native 480x640 padded to the patch "
                           f"size; val = 10 % of train; RMSE in the Eigen crop")


def paired(root: Path, spec: str) -> ProbeData:
    def read(d: Path) -> list[Sample]:
        rgb_dir, dep_dir = d / "rgb", d / "depth"
        if not rgb_dir.is_dir() or not dep_dir.is_dir():
            raise RaptorError(f"{spec}: expected {rgb_dir} and {dep_dir}")
        depth = {p.stem: p for p in dep_dir.iterdir() if p.suffix.lower() == ".png"}
        out = []
        for p in sorted(q for q in rgb_dir.iterdir() if q.suffix.lower() in (".png", ".jpg", ".jpeg")):
            if p.stem not in depth:
                raise RaptorError(f"{spec}: {p.name} has no depth map {dep_dir / (p.stem + '.png')}")
            out.append(Sample(f"{d.name}/{p.stem}", file_loader(p), _depth_png(depth[p.stem], 1e-3)))
        if not out:
            raise RaptorError(f"{spec}: no images in {rgb_dir}")
        return out

    if (root / "train").is_dir():
        if not (root / "test").is_dir():
            raise RaptorError(f"{spec}: has train/ but no test/ split")
        train, test = read(root / "train"), read(root / "test")
    else:
        allx = read(root)
        ids = split_ids(len(allx), 0, max(1, len(allx) // 5), seed=4)
        train, test = [allx[i] for i in ids["train"]], [allx[i] for i in ids["test"]]
    train, val = carve_val(train)
    return ProbeData(spec, "depth", {"train": train, "val": val, "test": test}, depth_range=(0.001, 10.0),
                     about=f"paired rgb/ + depth/ (mm) folders at {root}")
