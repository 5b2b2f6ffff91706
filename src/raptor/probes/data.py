"""Labelled data for the probes: one :class:`ProbeData` per task (``cls``, ``seg``, ``depth``) with fixed
``train`` / ``val`` / ``test`` splits, read lazily from real dataset layouts or bundled real data.

Data specs (``--data``):

- classification: ``bundled:digits`` (sklearn digits, 10 classes), ``bundled:lfw`` (scikit-image ``lfw_subset``:
  face / non-face), ``imagenet:<root>`` or ``<root>``: class-per-folder ``train/`` and ``val/`` (ImageNet layout;
  an optional ``test/``);
- segmentation: ``bundled:digit-seg`` (two real digits pasted on a 112 px canvas; 11 classes: background + 10
  digits), ``ade20k:<root>`` (the ADEChallengeData2016 / SceneParse150 release: ``images/{training,validation}/
  *.jpg``, ``annotations/{training,validation}/*.png``; raw 0 = background -> ignored, 1..150 -> 0..149);
- depth: ``bundled:motorcycle`` (Middlebury 2014 motorcycle from scikit-image, ground-truth disparity turned into
  metres; train and test crops from disjoint column ranges), ``bundled:scenes`` (procedurally rendered scenes with
  exact depth), ``nyud:<root>`` (the layout of the official code: ``data/nyu2_train.csv`` and
  ``data/nyu2_test.csv``, rows ``rgb path,depth path`` relative to the root; train depth 8-bit scaled to 10 m,
  test depth 16-bit millimetres; Eigen crop) and ``paired:<root>`` (``rgb/*.png`` + ``depth/*.png`` in
  millimetres, matched by file stem, either in ``train/`` and ``test/`` subfolders or one folder split 80/20).

Where a release has no validation split (ADE20k, NYUd, ImageNet without ``test/``) the validation split is a fixed
10 % of the training split, and the release's own evaluation split is the test split: learning rate and epoch are
chosen on validation, the metric is reported on test.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from raptor.data.sources import array_loader, digits_uint8, file_loader, lfw_uint8
from raptor.errors import RaptorError

TASKS = ("cls", "seg", "depth")
SPLITS = ("train", "val", "test")
IGNORE = 255  # ignored label in segmentation targets
EIGEN_CROP = (45, 471, 41, 601)  # rows [45, 471), cols [41, 601) of a 480 x 640 NYUd depth map
PROBE_DATA_HELP = {
    "cls": "bundled:digits | bundled:lfw | imagenet:<root> (class-per-folder train/ val/ [test/])",
    "seg": "bundled:digit-seg | ade20k:<root> (images/{training,validation}, annotations/{training,validation})",
    "depth": "bundled:motorcycle | bundled:scenes | nyud:<root> (data/nyu2_{train,test}.csv) | "
             "paired:<root> (rgb/*.png + depth/*.png in mm)",
}


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


def _const(v) -> Callable[[], object]:
    return lambda: v


def _split_ids(n: int, n_val: int, n_test: int, seed: int = 0) -> dict[str, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return {"test": np.sort(order[:n_test]), "val": np.sort(order[n_test:n_test + n_val]),
            "train": np.sort(order[n_test + n_val:])}


def _carve_val(train: list[Sample], frac: float = 0.1, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """A fixed ``frac`` of a training split held out for validation (at least one item, never all)."""
    if len(train) < 2:
        raise RaptorError(f"the training split has {len(train)} item(s): need at least 2 to hold out validation")
    n_val = min(len(train) - 1, max(1, int(round(frac * len(train)))))
    ids = _split_ids(len(train), n_val, 0, seed)
    return [train[i] for i in ids["train"]], [train[i] for i in ids["val"]]


# ---- classification ---------------------------------------------------------------------------------------------

def bundled_digits() -> ProbeData:
    imgs, y = digits_uint8()
    ids = _split_ids(len(imgs), 297, 500)
    splits = {s: [Sample(f"digits/{i:04d}", array_loader(lambda a=imgs[i]: a), _const(int(y[i]))) for i in ids[s]]
              for s in SPLITS}
    return ProbeData("bundled:digits", "cls", splits, 10, [str(c) for c in range(10)], image_size=112,
                     recipe={"batch_size": 128, "epochs": 30},
                     about="sklearn digits (1,797 real 8x8 handwritten digits, 10 classes), fixed split "
                           "1,000 / 297 / 500, shown at 112 px")


def bundled_lfw() -> ProbeData:
    a = lfw_uint8()
    y = np.array([0] * 100 + [1] * 100)
    splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for c in (0, 1):  # stratified: 50 / 20 / 30 per class
        idx = np.flatnonzero(y == c)
        ids = _split_ids(len(idx), 20, 30, seed=c)
        for s in SPLITS:
            splits[s] += [Sample(f"lfw/{idx[i]:03d}", array_loader(lambda x=a[idx[i]]: x), _const(c))
                          for i in ids[s]]
    return ProbeData("bundled:lfw", "cls", splits, 2, ["face", "non-face"], image_size=112,
                     recipe={"batch_size": 32, "epochs": 40},
                     about="scikit-image lfw_subset (200 real 25x25 grey crops: 100 faces, 100 non-faces), "
                           "stratified split 100 / 40 / 60, shown at 112 px")


def class_folders(root: Path, spec: str) -> ProbeData:
    """ImageNet layout: ``root/{train,val[,test]}/<class>/*.jpg``; classes from ``train``."""
    from raptor.data.sources import folder_source

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
        return [Sample(f"{split}/{it.id}", it.load, _const(index[src.class_names[it.label]])) for it in src.items]

    splits = {"train": read("train"), "val": read("val")}
    if (root / "test").is_dir():
        splits["test"] = read("test")
    else:
        splits["test"] = splits["val"]
        splits["train"], splits["val"] = _carve_val(splits["train"])
    if len(names) < 2:
        raise RaptorError(f"{spec}: train/ holds {len(names)} class folder(s); a classifier needs at least 2")
    return ProbeData(spec, "cls", splits, len(names), names,
                     about=f"class-per-folder images under {root}" + ("" if (root / "test").is_dir() else
                                                                       " (val = 10 % of train; test = val/)"))


# ---- segmentation -----------------------------------------------------------------------------------------------

def _digit_canvas(d1: np.ndarray, d2: np.ndarray, y1: int, y2: int, rng: np.random.Generator,
                  size: int = 112, cell: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Two digits (8x8, 0..255) upscaled to ``cell`` px, pasted in the left and right halves at random heights."""
    canvas = (rng.normal(40, 12, (size, size)).clip(0, 255)).astype(np.float32)
    mask = np.zeros((size, size), np.uint8)
    for k, (dig, lab) in enumerate(((d1, y1), (d2, y2))):
        big = np.asarray(Image.fromarray(dig).resize((cell, cell), Image.BICUBIC), dtype=np.float32)
        x0 = int(rng.integers(k * size // 2, (k + 1) * size // 2 - cell + 1))
        y0 = int(rng.integers(0, size - cell + 1))
        fg = big > 96
        region = canvas[y0:y0 + cell, x0:x0 + cell]
        region[fg] = big[fg]
        mask[y0:y0 + cell, x0:x0 + cell][fg] = lab + 1
    rgb = np.repeat(canvas.round().clip(0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return rgb, mask


def bundled_digit_seg() -> ProbeData:
    imgs, y = digits_uint8()
    n = len(imgs) // 2
    pairs = np.random.default_rng(1).permutation(len(imgs))[: 2 * n].reshape(n, 2)
    ids = _split_ids(n, 100, 200, seed=2)

    def sample(i: int) -> Sample:
        a, b = pairs[i]
        cache: dict = {}

        def make():
            if not cache:
                cache["v"] = _digit_canvas(imgs[a], imgs[b], int(y[a]), int(y[b]), np.random.default_rng(1000 + i))
            return cache["v"]
        return Sample(f"digit-seg/{i:03d}", lambda: Image.fromarray(make()[0]), lambda: make()[1])

    splits = {s: [sample(int(i)) for i in ids[s]] for s in SPLITS}
    return ProbeData("bundled:digit-seg", "seg", splits, 11, ["background"] + [str(c) for c in range(10)],
                     image_size=112,
                     recipe={"batch_size": 32, "epochs": 15, "lrs": (3e-3, 1e-2, 3e-2)},
                     about="two real sklearn digits per 112 px canvas (upscaled to 48 px, random positions, noisy "
                           "background); per-pixel labels background / digit 0..9 (11 classes); 898 canvases, "
                           "split 598 / 100 / 200, every digit image used once")


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
    train, val = _carve_val(train)
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

# calibration of scikit-image's 4x down-sampled Middlebury motorcycle (its docstring): depth = f * B / (d + doffs)
MOTORCYCLE_F, MOTORCYCLE_BASELINE_M, MOTORCYCLE_DOFFS = 994.978, 0.193001, 31.086


def motorcycle_depth() -> tuple[np.ndarray, np.ndarray]:
    """The left image and its ground-truth depth in metres (0 where the disparity is unknown)."""
    import skimage.data as skd

    left, _, disp = skd.stereo_motorcycle()
    disp = np.asarray(disp, np.float64)
    ok = np.isfinite(disp)
    depth = np.zeros(disp.shape, np.float32)
    depth[ok] = MOTORCYCLE_F * MOTORCYCLE_BASELINE_M / (disp[ok] + MOTORCYCLE_DOFFS)
    return left, depth


def bundled_motorcycle(crop: int = 140) -> ProbeData:
    left, depth = motorcycle_depth()
    h, w = depth.shape
    split_col = int(0.6 * w)  # train/val crops from columns [0, 0.6 w), test crops from [0.6 w + gap, w)
    gap = 16
    rng = np.random.default_rng(0)

    def crops(n: int, c0: int, c1: int, tag: str) -> list[Sample]:
        out = []
        for i in range(n):
            y0 = int(rng.integers(0, h - crop + 1))
            x0 = int(rng.integers(c0, c1 - crop + 1))
            im, d = left[y0:y0 + crop, x0:x0 + crop], depth[y0:y0 + crop, x0:x0 + crop]
            out.append(Sample(f"motorcycle/{tag}{i:03d}@{y0},{x0}", array_loader(lambda a=im: a),
                              _const(np.ascontiguousarray(d))))
        return out

    splits = {"train": crops(256, 0, split_col, "train"), "val": crops(48, 0, split_col, "val"),
              "test": crops(96, split_col + gap, w, "test")}
    return ProbeData("bundled:motorcycle", "depth", splits, depth_range=(0.5, 6.0), image_size=112,
                     recipe={"batch_size": 32, "epochs": 20, "lrs": (3e-3, 1e-2, 3e-2)},
                     about="Middlebury 2014 motorcycle (scikit-image, 500x741): ground-truth disparity as metric "
                           "depth (2.1-5.0 m), 140 px crops shown at 112 px; train/val crops from the left 60 % of "
                           "columns, test crops from the rest (disjoint regions)")


def render_scene(rng: np.random.Generator, size: int = 112) -> tuple[np.ndarray, np.ndarray]:
    """A procedural scene with exact depth: a textured floor receding to a back wall, and 1-3 boxes standing on
    the floor (nearer boxes larger, occluding farther ones); shading fades with distance (aerial perspective)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    horizon = size * rng.uniform(0.3, 0.45)
    cam_h, f = 1.5, size * 0.9  # camera height (m), focal length (px)
    wall = rng.uniform(7.0, 9.5)
    depth = np.full((size, size), wall)
    below = yy > horizon + 1e-6
    floor = cam_h * f / np.maximum(yy - horizon, 1e-6)
    depth[below] = np.minimum(floor[below], wall)
    # floor / wall texture: checkerboard in world coordinates
    xw = (xx - size / 2) * depth / f
    tex = ((np.floor(xw * 1.5) + np.floor(depth * 1.5)) % 2) * 0.25 + 0.55
    colour = np.stack([tex * c for c in rng.uniform(0.6, 1.0, 3)], axis=-1)
    objects = sorted(((rng.uniform(2.0, wall - 1.0), rng.uniform(-2.0, 2.0), rng.uniform(0.5, 1.2),
                       rng.uniform(0.6, 1.6), rng.uniform(0.2, 1.0, 3)) for _ in range(rng.integers(1, 4))),
                     key=lambda o: -o[0])
    for z, x, half_w, height, col in objects:  # far to near: nearer boxes paint over
        c0, c1 = size / 2 + (x - half_w) * f / z, size / 2 + (x + half_w) * f / z
        r1 = horizon + cam_h * f / z
        r0 = r1 - height * f / z
        box = (xx >= c0) & (xx < c1) & (yy >= r0) & (yy < r1)
        depth[box] = z
        stripes = 0.85 + 0.15 * np.sign(np.sin((yy - r0) * z * 0.9))
        colour[box] = col[None, :] * stripes[box][:, None]
    fog = np.exp(-depth / 12.0)[..., None]
    img = colour * fog + 0.75 * (1 - fog)
    img = (img * 255 + rng.normal(0, 3, img.shape)).clip(0, 255).astype(np.uint8)
    return img, depth.astype(np.float32)


def bundled_scenes(n: int = 300, size: int = 112) -> ProbeData:
    def sample(i: int) -> Sample:
        def make():
            return render_scene(np.random.default_rng(10_000 + i), size)
        return Sample(f"scenes/{i:03d}", lambda: Image.fromarray(make()[0]), lambda: make()[1])

    ids = _split_ids(n, n // 7, n // 5, seed=3)
    splits = {s: [sample(int(i)) for i in ids[s]] for s in SPLITS}
    return ProbeData("bundled:scenes", "depth", splits, depth_range=(0.5, 10.0), image_size=size,
                     recipe={"batch_size": 32, "epochs": 20, "lrs": (3e-3, 1e-2, 3e-2)},
                     about=f"{n} procedurally rendered {size} px scenes (floor, back wall, boxes; aerial perspective) "
                           f"with exact depth 0.9-9.5 m")


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
    train, val = _carve_val(train)
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
        ids = _split_ids(len(allx), 0, max(1, len(allx) // 5), seed=4)
        train, test = [allx[i] for i in ids["train"]], [allx[i] for i in ids["test"]]
    train, val = _carve_val(train)
    return ProbeData(spec, "depth", {"train": train, "val": val, "test": test}, depth_range=(0.001, 10.0),
                     about=f"paired rgb/ + depth/ (mm) folders at {root}")


BUNDLED = {"digits": bundled_digits, "lfw": bundled_lfw, "digit-seg": bundled_digit_seg,
           "motorcycle": bundled_motorcycle, "scenes": bundled_scenes}
ROOTED = {"imagenet": class_folders, "ade20k": ade20k, "nyud": nyud, "paired": paired}


def open_probe_data(spec: str, task: str) -> ProbeData:
    """Parse a probe data spec for ``task`` (see the module doc); refuses a spec of another task."""
    if task not in TASKS:
        raise RaptorError(f"unknown --task {task!r} (use cls, seg or depth)")
    kind, sep, target = spec.partition(":")
    if sep and kind == "bundled":
        if target not in BUNDLED:
            raise RaptorError(f"unknown bundled probe data {target!r} (available: {', '.join(BUNDLED)})")
        data = BUNDLED[target]()
    elif sep and kind in ROOTED:
        root = Path(target).expanduser()
        if not root.is_dir():
            raise RaptorError(f"{spec}: folder {root} not found")
        data = ROOTED[kind](root, spec)
    elif Path(spec).is_dir() and task == "cls":
        data = class_folders(Path(spec), spec)
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
