import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from raptor.data import EvalTransform, TrainTransform, load_images, open_source
from raptor.data.sources import ImageLoadWarning
from raptor.errors import RaptorError


def test_eval_transform_matches_reference_pipeline():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    x = EvalTransform()(img)
    assert x.shape == (3, 224, 224)
    # reference: shorter side 300 -> 256 (bicubic), long side 400*256/300 = 341, center crop 224
    ref = img.resize((341, 256), Image.BICUBIC)
    left, top = int(round((341 - 224) / 2)), int(round((256 - 224) / 2))
    ref = np.asarray(ref.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    ref = (ref - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.abs(x.permute(1, 2, 0).numpy() - ref).max() < 1e-5


def test_eval_transform_sizes_and_grey_input():
    t = EvalTransform.for_size(112)
    assert (t.crop, t.resize) == (112, 128)
    g = Image.fromarray(np.full((8, 8), 128, dtype=np.uint8))
    x = t(g)
    assert x.shape == (3, 112, 112)
    assert torch.allclose(x[0], torch.full((112, 112), (128 / 255 - 0.485) / 0.229), atol=1e-4)
    with pytest.raises(RaptorError):
        EvalTransform(crop=300, resize=256)


def test_train_transform_is_random_but_seeded():
    import random

    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 260, 3), dtype=np.uint8))
    t = TrainTransform(size=64)
    a, b = t(img, random.Random(3)), t(img, random.Random(3))
    c = t(img, random.Random(4))
    assert a.shape == (3, 64, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_bundled_sets_load_offline():
    photos = open_source("bundled:photos")
    assert len(photos) == 25
    im = photos.items[0].load()
    assert im.size[0] >= 100
    digits = open_source("bundled:digits")
    assert len(digits) == 1797 and sorted(set(digits.labels.tolist())) == list(range(10))
    lfw = open_source("bundled:lfw")
    assert len(lfw) == 200 and lfw.labels[:100].tolist() == [0] * 100 and lfw.class_names == ["face", "non-face"]
    assert EvalTransform.for_size(56)(lfw.items[5].load()).shape == (3, 56, 56)


def _write_folder(root, corrupt=True):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    if corrupt:
        (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_class_folder_labels_and_corrupt_image_is_skipped_and_named(tmp_path):
    src = open_source(str(_write_folder(tmp_path / "imgs")))
    assert src.class_names == ["cats", "dogs"]
    assert len(src) == 7 and src.labels.tolist().count(1) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tensors, kept, skipped = load_images(src.items, EvalTransform.for_size(28))
    assert skipped == ["dogs/broken.jpg"]
    assert len(tensors) == 6 and len(kept) == 6
    assert any("dogs/broken.jpg" in str(w.message) and w.category is ImageLoadWarning for w in caught)


def test_flat_folder_and_bad_specs(tmp_path):
    root = _write_folder(tmp_path / "x", corrupt=False)
    flat = open_source(f"folder:{root}")
    assert len(flat) == 6 and set(flat.labels.tolist()) == {-1}
    for bad in ["bundled:cifar", "nope:thing", str(tmp_path / "missing")]:
        with pytest.raises(RaptorError):
            open_source(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RaptorError, match="no images"):
        open_source(f"folder:{tmp_path / 'empty'}")


def _write_idx(path, arr):
    import gzip

    arr = np.asarray(arr, dtype=np.uint8)
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(head + arr.tobytes())


def test_fashion_mnist_reads_idx_files_gzipped_or_not(tmp_path):
    """fashion-mnist:<dir> reads the four IDX files of the MNIST format (here written by the test: gzipped training
    files, plain test files), pairs images with labels, and names what is missing or broken in one line."""
    from raptor.data import open_source
    from raptor.data.sources import read_idx

    rng = np.random.default_rng(0)
    xtr, ytr = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 10, 7)
    xte, yte = rng.integers(0, 256, (3, 28, 28)), rng.integers(0, 10, 3)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", xtr)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", ytr)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", xte)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", yte)
    src = open_source(f"fashion-mnist:{tmp_path}")
    assert [it.id for it in src.items] == [f"train/{i:05d}" for i in range(7)] + [f"test/{i:05d}" for i in range(3)]
    assert src.labels.tolist() == ytr.tolist() + yte.tolist() and src.class_names[9] == "ankle boot"
    assert np.array_equal(np.asarray(src.items[8].load()), xte[1])
    assert src.subset(4).labels.size == 4  # sampled like any labelled set
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(RaptorError, match="no t10k-images-idx3-ubyte"):
        open_source(f"fashion-mnist:{tmp_path}")
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
    with pytest.raises(RaptorError, match="not an IDX file of unsigned bytes"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05ab")
    with pytest.raises(RaptorError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "head").write_bytes(b"\x00\x00\x08\x03\x00\x00")  # the header itself cut short
    with pytest.raises(RaptorError, match="truncated"):
        read_idx(tmp_path / "head")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 20)  # a gzip header, corrupt data
    with pytest.raises(RaptorError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")
