"""Image transforms in PIL + torch (no torchvision here).

``EvalTransform`` is the paper's eval transform: resize the shorter side to 256 (bicubic), center crop 224,
ImageNet mean/std -- parametrised by crop size (resize = crop * 256 / 224) and mean/std so it serves any teacher.
PIL's bicubic resize is what torchvision's ``Resize`` uses on PIL images, so results match it.
``ModelTransform`` is a model's own preprocessing as its HF processor config (``preprocessor_config.json``) states
it (``--transform model``), with the arithmetic of transformers' PIL image processors.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from raptor.errors import RaptorError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: transparency over white, palettes expanded, CMYK/YCbCr converted, and high bit
    depths (16-bit "I;16*", 32-bit "I", float "F") scaled into 0..255 rather than clipped (PIL's own
    ``convert("RGB")`` clips a 16-bit image to white)."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if img.mode.startswith("I;16"):
            a = a / 65535.0
        elif img.mode == "F" and a.size and a.min() >= 0 and a.max() <= 1:
            pass
        elif img.mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535:
            a = a / (65535.0 if a.max() > 255 else 255.0)
        else:  # other integer or float ranges: stretch what is there
            lo, hi = (float(np.nanmin(a)), float(np.nanmax(a))) if a.size else (0.0, 1.0)
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
        img = Image.fromarray(np.nan_to_num(a * 255.0).round().clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "P", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB")


def resize_shorter(img: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    return img.resize((nw, nh), resample)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if w < size or h < size:  # pad like torchvision does for too-small images
        canvas = Image.new("RGB", (max(w, size), max(h, size)))
        canvas.paste(img, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        img, (w, h) = canvas, canvas.size
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Image.Image, mean, std) -> torch.Tensor:
    a = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (a - m) / s


@dataclass(frozen=True)
class EvalTransform:
    """Resize shorter side to ``resize`` (bicubic) -> center crop ``crop`` -> normalize."""

    crop: int = 224
    resize: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.crop <= 0 or self.resize < self.crop:
            raise RaptorError(f"bad transform sizes: crop={self.crop}, resize={self.resize} (need resize >= crop > 0)")

    @classmethod
    def for_size(cls, crop: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> "EvalTransform":
        return cls(crop=crop, resize=int(round(crop * 256 / 224)), mean=tuple(mean), std=tuple(std))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = center_crop(resize_shorter(to_rgb(img), self.resize), self.crop)
        return to_tensor(img, self.mean, self.std)

    @property
    def size(self) -> int:
        """The side of the (square) output."""
        return self.crop

    def describe(self) -> dict:
        return {"kind": "eval", "resize_shorter": self.resize, "interpolation": "bicubic",
                "center_crop": self.crop, "mean": list(self.mean), "std": list(self.std)}


TRANSFORM_KINDS = ("paper", "model")
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL codes


def check_transform(kind: str) -> None:
    """Refuse an unknown ``--transform`` up front."""
    if kind not in TRANSFORM_KINDS:
        raise RaptorError(f"unknown --transform {kind!r} (use {' or '.join(TRANSFORM_KINDS)})")


def _hw(value, what: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, dict) and set(value) >= {"height", "width"}:
        return int(value["height"]), int(value["width"])
    raise RaptorError(f"--transform model: unsupported processor {what} {value!r} (use --transform paper)")


@dataclass(frozen=True)
class ModelTransform:
    """An HF image processor's eval preprocessing: resize (the shorter side to ``shortest_edge``, aspect kept, or to
    exactly ``resize_hw``), center crop ``crop_hw`` (offsets rounded down, as transformers), ``x * rescale_factor``
    then ``(x - mean) / std``. The output must be square (the token layout is a square grid)."""

    shortest_edge: int | None = None
    resize_hw: tuple[int, int] | None = None
    crop_hw: tuple[int, int] | None = None
    resample: int = 3
    rescale_factor: float | None = 1 / 255
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    source: str = "preprocessor_config.json"

    def __post_init__(self):
        if self.resample not in RESAMPLE_NAMES:
            raise RaptorError(f"--transform model: unknown processor resample code {self.resample!r}")
        out = self.crop_hw or self.resize_hw
        if out is None:
            raise RaptorError("--transform model: the processor keeps the aspect ratio without a center crop, so "
                              "its outputs are not square (use --transform paper)")
        if out[0] != out[1] or out[0] <= 0:
            raise RaptorError(f"--transform model: the processor's output {out[0]} x {out[1]} is not a square "
                              f"(use --transform paper)")

    @classmethod
    def from_processor(cls, d: dict, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       source: str = "preprocessor_config.json") -> "ModelTransform":
        """Read a processor config (``size``, ``crop_size``, ``do_center_crop``, ``resample``, ``do_rescale`` /
        ``rescale_factor``, ``do_normalize`` / ``image_mean`` / ``image_std``); ``mean``/``std`` where it names
        none."""
        shortest = hw = crop = None
        size = d.get("size")
        if d.get("do_resize", True) and size is not None:
            if isinstance(size, dict) and "shortest_edge" in size and not size.get("longest_edge"):
                shortest = int(size["shortest_edge"])
            else:
                hw = _hw(size, "size")  # an int is a square, as transformers' get_size_dict
        if d.get("do_center_crop", "crop_size" in d) and d.get("crop_size") is not None:
            crop = _hw(d["crop_size"], "crop_size")
        rescale = float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else None
        if d.get("do_normalize", True):
            mean, std = tuple(d.get("image_mean") or mean), tuple(d.get("image_std") or std)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(shortest, hw, crop, int(d.get("resample", 3)), rescale, tuple(float(x) for x in mean),
                   tuple(float(x) for x in std), source)

    @property
    def size(self) -> int:
        """The side of the (square) output."""
        return (self.crop_hw or self.resize_hw)[0]

    def at_size(self, size: int) -> "ModelTransform":
        """The same preprocessing scaled to another output side (resize and crop in the same proportion)."""
        if size == self.size:
            return self
        f = size / self.size
        scale = (lambda hw: None if hw is None else (int(round(hw[0] * f)), int(round(hw[1] * f))))  # noqa: E731
        return replace(self, shortest_edge=None if self.shortest_edge is None else int(round(self.shortest_edge * f)),
                       resize_hw=scale(self.resize_hw), crop_hw=None if self.crop_hw is None else (size, size))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = to_rgb(img)
        if self.shortest_edge is not None:
            img = resize_shorter(img, self.shortest_edge, self.resample)
        elif self.resize_hw is not None:
            img = img.resize((self.resize_hw[1], self.resize_hw[0]), self.resample)
        if self.crop_hw is not None:
            ch, cw = self.crop_hw
            w, h = img.size
            if w < cw or h < ch:  # pad (zeros) around the image first
                canvas = Image.new("RGB", (max(w, cw), max(h, ch)))
                canvas.paste(img, ((max(w, cw) - w) // 2, (max(h, ch) - h) // 2))
                img, (w, h) = canvas, canvas.size
            top, left = (h - ch) // 2, (w - cw) // 2
            img = img.crop((left, top, left + cw, top + ch))
        a = np.asarray(img, dtype=np.uint8)
        a = (a.astype(np.float64) * self.rescale_factor if self.rescale_factor is not None else a).astype(np.float32)
        a = (a - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))

    def describe(self) -> dict:
        d = {"kind": "model", "source": self.source, "interpolation": RESAMPLE_NAMES[self.resample]}
        if self.shortest_edge is not None:
            d["resize_shorter"] = self.shortest_edge
        if self.resize_hw is not None:
            d["resize"] = list(self.resize_hw)
        return {**d, "center_crop": self.size, "crop": self.crop_hw is not None,
                "rescale_factor": self.rescale_factor, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class TrainTransform:
    """RandomResizedCrop(scale, ratio, bicubic) + horizontal flip + normalize (torchvision's algorithm)."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def crop_box(self, w: int, h: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = w * h
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            ar = math.exp(rng.uniform(*log_ratio))
            cw = int(round(math.sqrt(target * ar)))
            ch = int(round(math.sqrt(target / ar)))
            if 0 < cw <= w and 0 < ch <= h:
                return rng.randint(0, w - cw), rng.randint(0, h - ch), cw, ch
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            cw, ch = w, int(round(w / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            ch, cw = h, int(round(h * self.ratio[1]))
        else:
            cw, ch = w, h
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random.Random()
        img = to_rgb(img)
        x, y, cw, ch = self.crop_box(*img.size, rng)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=(x, y, x + cw, y + ch))
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img, self.mean, self.std)

    def describe(self) -> dict:
        return {"kind": "train", "random_resized_crop": self.size, "scale": list(self.scale),
                "ratio": list(self.ratio), "flip": self.flip, "mean": list(self.mean), "std": list(self.std)}
