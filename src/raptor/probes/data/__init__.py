"""Labelled data for the probes: the types a probe set is made of -- :class:`Sample`, :class:`ProbeData` with fixed
``train`` / ``val`` / ``test`` splits, the split helpers -- and the one registry of probe data specs (``--data``),
:data:`REGISTRY`, that :func:`open_probe_data` reads.

A row of the registry (:class:`ProbeSet`) names a spec, its task (``cls``, ``seg``, ``depth``), the function that
builds it, the image source of :mod:`raptor.data.sources` it draws its images from (the probe set
``bundled:digits`` is the image source ``bundled:digits`` plus its labels and a fixed split) and one line of help;
the usage text :data:`PROBE_DATA_HELP` and the errors for unknown specs are made from it. The builders live in
:mod:`raptor.probes.data.bundled` (sets that load offline: real data shipped with scikit-learn / scikit-image, and
rendered scenes) and :mod:`raptor.probes.data.readers` (real dataset layouts under a root folder). Images and
targets are read lazily.

Where a release has no validation split (ADE20k, NYUd, ImageNet without ``test/``) the validation split is a fixed
10 % of the training split (:func:`carve_val`), and the release's own evaluation split is the test split: learning
rate and epoch are chosen on validation, the metric is reported on test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from raptor.data.sources import open_source
from raptor.errors import RaptorError

TASKS = ("cls", "seg", "depth")
SPLITS = ("train", "val", "test")
IGNORE = 255  # ignored label in segmentation targets


@dataclass(frozen=True)
class Sample:
    """One example: ``image()`` -> PIL image; ``target()`` -> class index (cls), (H, W) uint8 labels with 255 =
    ignore (seg) or (H, W) float32 depth in metres with 0 = invalid (depth)."""

    id: str
    image: Callable[[], Image.Image] = field(repr=False, compare=False)
    target: Callable[[], object] = field(repr=False, compare=False)


@dataclass
class ProbeData:
    spec: str
    task: str
    splits: dict[str, list[Sample]]
    n_classes: int = 0                      # cls / seg
    class_names: list[str] = field(default_factory=list)
    depth_range: tuple[float, float] = (0.001, 10.0)  # depth: valid range and the bins' span, metres
    eigen_crop: bool = False                # depth: evaluate inside the Eigen crop (480 x 640 targets)
    image_size: int | None = None           # natural input size (None: the teacher's; dense: native + padding)
    recipe: dict = field(default_factory=dict)  # recommended overrides of the task's default recipe
    about: str = ""

    def describe(self) -> dict:
        return {"spec": self.spec, "task": self.task, "sizes": {k: len(v) for k, v in self.splits.items()},
                "n_classes": self.n_classes, "depth_range": list(self.depth_range), "eigen_crop": self.eigen_crop,
                "image_size": self.image_size, "about": self.about}


def constant(v) -> Callable[[], object]:
    return lambda: v


def split_ids(n: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed seeded split of ``range(n)``: ``n_test`` test and ``n_val`` validation positions, the rest train."""
    order = np.random.default_rng(seed).permutation(n)
    return {"test": np.sort(order[:n_test]), "val": np.sort(order[n_test:n_test + n_val]),
            "train": np.sort(order[n_test + n_val:])}


def carve_val(train: list[Sample], frac: float = 0.1, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """A fixed ``frac`` of a training split held out for validation (at least one item, never all)."""
    if len(train) < 2:
        raise RaptorError(f"the training split has {len(train)} item(s): need at least 2 to hold out validation")
    n_val = min(len(train) - 1, max(1, int(round(frac * len(train)))))
    ids = split_ids(len(train), n_val, 0, seed)
    return [train[i] for i in ids["train"]], [train[i] for i in ids["val"]]


# ---- the registry -----------------------------------------------------------------------------------------------
# Imported here, after the types: the builders' modules import them from this one. (Importing either of them first
# still works: a package's __init__ always runs before its submodules.)
from raptor.probes.data.bundled import (  # noqa: E402
    bundled_digit_seg,
    bundled_digits,
    bundled_lfw,
    bundled_motorcycle,
    bundled_scenes,
)
from raptor.probes.data.readers import ade20k, class_folders, nyud, paired  # noqa: E402

ROOT = "<root>"


@dataclass(frozen=True)
class ProbeSet:
    """One probe data spec. ``spec`` is ``bundled:<name>`` or ``<reader>:<root>`` (a release layout under a folder).
    ``build`` is called as ``build(open_source(source))`` where there is a ``source``, ``build()`` for the other
    bundled sets and ``build(root, spec)`` for a reader. ``source``: the :mod:`raptor.data.sources` spec whose
    images (and labels) the set is made of; None where its images come from elsewhere (rendered here, read with
    their ground truth from scikit-image, or the files under ``<root>``)."""

    spec: str
    task: str
    build: Callable[..., ProbeData]
    source: str | None
    help: str

    @property
    def kind(self) -> str:
        return self.spec.partition(":")[0]

    @property
    def name(self) -> str:
        return self.spec.partition(":")[2]

    @property
    def rooted(self) -> bool:
        return self.name == ROOT


REGISTRY: tuple[ProbeSet, ...] = (
    ProbeSet("bundled:digits", "cls", bundled_digits, "bundled:digits",
             "sklearn digits, 10 classes; fixed split 1,000 / 297 / 500"),
    ProbeSet("bundled:lfw", "cls", bundled_lfw, "bundled:lfw",
             "scikit-image lfw_subset, face / non-face; stratified split 100 / 40 / 60"),
    ProbeSet(f"imagenet:{ROOT}", "cls", class_folders, None, "class-per-folder train/ val/ [test/]"),
    ProbeSet("bundled:digit-seg", "seg", bundled_digit_seg, "bundled:digits",
             "two digits per 112 px canvas, 11 classes (background + 10 digits); split 598 / 100 / 200"),
    ProbeSet(f"ade20k:{ROOT}", "seg", ade20k, None,
             "images/{training,validation}, annotations/{training,validation}"),
    ProbeSet("bundled:motorcycle", "depth", bundled_motorcycle, None,
             "Middlebury 2014 motorcycle (scikit-image) with ground-truth depth; crops 256 / 48 / 96"),
    ProbeSet("bundled:scenes", "depth", bundled_scenes, None,
             "300 rendered scenes with exact depth; split 198 / 42 / 60"),
    ProbeSet(f"nyud:{ROOT}", "depth", nyud, None, "data/nyu2_{train,test}.csv"),
    ProbeSet(f"paired:{ROOT}", "depth", paired, None, "rgb/*.png + depth/*.png in mm"),
)
_BUNDLED = {p.name: p for p in REGISTRY if p.kind == "bundled"}
_ROOTED = {p.kind: p for p in REGISTRY if p.rooted}
# the usage line per task: every spec; a reader's with the layout it expects
PROBE_DATA_HELP = {t: " | ".join(f"{p.spec} ({p.help})" if p.rooted else p.spec for p in REGISTRY if p.task == t)
                   for t in TASKS}


def open_probe_data(spec: str, task: str) -> ProbeData:
    """Parse a probe data spec for ``task`` (see :data:`REGISTRY`; a bare folder is ``imagenet:<folder>``); refuses
    a spec of another task."""
    if task not in TASKS:
        raise RaptorError(f"unknown --task {task!r} (use cls, seg or depth)")
    kind, sep, target = spec.partition(":")
    if sep and kind == "bundled":
        if target not in _BUNDLED:
            raise RaptorError(f"unknown bundled probe data {target!r} (available: {', '.join(_BUNDLED)})")
        entry = _BUNDLED[target]
        data = entry.build(open_source(entry.source)) if entry.source else entry.build()
    elif sep and kind in _ROOTED:
        root = Path(target).expanduser()
        if not root.is_dir():
            raise RaptorError(f"{spec}: folder {root} not found")
        data = _ROOTED[kind].build(root, spec)
    elif Path(spec).is_dir() and task == "cls":
        data = _ROOTED["imagenet"].build(Path(spec), spec)
    else:
        raise RaptorError(f"bad --data {spec!r} for --task {task}: expected {PROBE_DATA_HELP[task]}")
    if data.task != task:
        raise RaptorError(f"--data {spec} is {data.task} data, not {task} (for {task}: {PROBE_DATA_HELP[task]})")
    for s in SPLITS:
        if not data.splits.get(s):
            raise RaptorError(f"{spec}: the {s} split is empty")
    if task in ("cls", "seg") and data.n_classes < 2:
        raise RaptorError(f"{spec}: {data.n_classes} class(es); a classifier needs at least 2")
    return data
