"""The bundled probe sets, which load offline: fixed splits and per-pixel targets made from real data shipped with
scikit-learn / scikit-image, and procedurally rendered scenes.

- ``bundled:digits`` (cls): the image source ``bundled:digits`` (sklearn digits, 1,797 images, 10 classes) with a
  fixed 1,000 / 297 / 500 split;
- ``bundled:lfw`` (cls): the image source ``bundled:lfw`` (scikit-image ``lfw_subset``: face / non-face), split
  stratified by class;
- ``bundled:digit-seg`` (seg): two of the ``bundled:digits`` images pasted on a 112 px canvas; 11 classes:
  background + 10 digits;
- ``bundled:motorcycle`` (depth): Middlebury 2014 motorcycle from scikit-image, ground-truth disparity turned into
  metres; train and test crops from disjoint column ranges;
- ``bundled:scenes`` (depth): procedurally rendered scenes with exact depth.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from raptor.data.sources import ImageSource, array_loader
from raptor.probes.data import SPLITS, ProbeData, Sample, constant, split_ids

# ---- classification ---------------------------------------------------------------------------------------------


def bundled_digits(source: ImageSource) -> ProbeData:
    """The image source ``bundled:digits`` (its items, ids and labels) with a fixed 1,000 / 297 / 500 split."""
    items = source.items
    ids = split_ids(len(items), 297, 500)
    splits = {s: [Sample(items[i].id, items[i].load, constant(items[i].label)) for i in ids[s]] for s in SPLITS}
    return ProbeData("bundled:digits", "cls", splits, 10, [str(c) for c in range(10)], image_size=112,
                     recipe={"batch_size": 128, "epochs": 30},
                     about="sklearn digits (1,797 real 8x8 handwritten digits, 10 classes), fixed split "
                           "1,000 / 297 / 500, shown at 112 px")


def bundled_lfw(source: ImageSource) -> ProbeData:
    """The image source ``bundled:lfw`` (100 faces, 100 non-faces) split 50 / 20 / 30 per class."""
    items, y = source.items, source.labels
    splits: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for c in (0, 1):  # stratified: 50 / 20 / 30 per class
        idx = np.flatnonzero(y == c)
        ids = split_ids(len(idx), 20, 30, seed=c)
        for s in SPLITS:
            splits[s] += [Sample(items[idx[i]].id, items[idx[i]].load, constant(c)) for i in ids[s]]
    return ProbeData("bundled:lfw", "cls", splits, 2, ["face", "non-face"], image_size=112,
                     recipe={"batch_size": 32, "epochs": 40},
                     about="scikit-image lfw_subset (200 real 25x25 grey crops: 100 faces, 100 non-faces), "
                           "stratified split 100 / 40 / 60, shown at 112 px")


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


def bundled_digit_seg(source: ImageSource) -> ProbeData:
    """Canvases of two images of the image source ``bundled:digits`` each (every image used once)."""
    imgs = [np.asarray(it.load()) for it in source.items]  # the 8x8 uint8 arrays the source is made of
    y = source.labels
    n = len(imgs) // 2
    pairs = np.random.default_rng(1).permutation(len(imgs))[: 2 * n].reshape(n, 2)
    ids = split_ids(n, 100, 200, seed=2)

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
                              constant(np.ascontiguousarray(d))))
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

    ids = split_ids(n, n // 7, n // 5, seed=3)
    splits = {s: [sample(int(i)) for i in ids[s]] for s in SPLITS}
    return ProbeData("bundled:scenes", "depth", splits, depth_range=(0.5, 10.0), image_size=size,
                     recipe={"batch_size": 32, "epochs": 20, "lrs": (3e-3, 1e-2, 3e-2)},
                     about=f"{n} procedurally rendered {size} px scenes (floor, back wall, boxes; aerial perspective) "
                           f"with exact depth 0.9-9.5 m")
