"""``--transform paper|model``: the model's own preprocessing read from its processor config, against a reference
written here with PIL alone; the paper's where a teacher has none; the option on the command line."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from clirun import one_error_line
from raptor.cli import run
from raptor.data.transforms import EvalTransform, ModelTransform
from raptor.errors import RaptorError
from raptor.teachers import load_teacher
from raptor.teachers.hf import CLIP_MEAN, CLIP_STD, build_tiny_teacher

CLIP_PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 256},
                  "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
                  "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
                  "image_std": list(CLIP_STD), "do_convert_rgb": True}


def _reference(img: Image.Image, short=256, crop=224, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """transformers' CLIP image processor written out: shorter side to ``short`` (bicubic, the longer one
    int(short * long / short side)), center crop with offsets rounded down, /255, (x - mean) / std; CHW."""
    img = img.convert("RGB")
    w, h = img.size
    nw, nh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((nw, nh), Image.BICUBIC)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    a = np.asarray(img.crop((left, top, left + crop, top + crop)), dtype=np.float64) / 255.0
    return ((a - np.array(mean)) / np.array(std)).transpose(2, 0, 1)


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A local HF model dir (a tiny DINOv2) that came with a CLIP-style processor config."""
    d = tmp_path_factory.mktemp("hf") / "m"
    build_tiny_teacher("dinov2", seed=0).model.save_pretrained(d)
    (d / "preprocessor_config.json").write_text(json.dumps(CLIP_PROCESSOR))
    return d


def test_model_transform_matches_a_pil_reference_of_the_processor(clip_dir):
    t = load_teacher(f"hf:{clip_dir}")
    tf = t.eval_transform(kind="model")
    assert isinstance(tf, ModelTransform) and tf.size == 224
    assert tf.describe()["kind"] == "model" and tf.describe()["center_crop"] == 224
    assert tf.describe()["interpolation"] == "bicubic" and tf.describe()["mean"] == pytest.approx(CLIP_MEAN)
    for w, h in [(500, 341), (341, 500), (640, 427), (256, 256), (300, 1000)]:
        img = _photo(w, h, seed=w)
        ours = tf(img)
        assert ours.dtype == torch.float32 and ours.shape == (3, 224, 224)
        assert np.abs(ours.numpy() - _reference(img)).max() <= 1e-5, (w, h)
    # the paper's differs: resize 256 bicubic too, but the crop offset of 500 x 341 rounds (75.5 -> 76), not down
    paper = t.eval_transform(224)
    img = _photo(500, 341)
    assert isinstance(paper, EvalTransform)
    assert not torch.allclose(paper(img), tf(img), atol=1e-3)


def test_model_transform_at_another_size_and_processor_variants(clip_dir):
    t = load_teacher(f"hf:{clip_dir}")
    tf = t.eval_transform(112, "model")  # scaled: shorter side 128, crop 112
    assert (tf.shortest_edge, tf.crop_hw, tf.size) == (128, (112, 112), 112)
    img = _photo(500, 341)
    assert np.abs(tf(img).numpy() - _reference(img, 128, 112)).max() <= 1e-5
    with pytest.raises(RaptorError, match="patch size"):
        t.eval_transform(100, "model")
    # a fixed (height, width) resize and no crop (SigLIP / DINOv3 style); bilinear; no normalisation
    sq = ModelTransform.from_processor({"size": {"height": 28, "width": 28}, "resample": 2, "do_normalize": False})
    ref = np.asarray(_photo(50, 30).resize((28, 28), Image.BILINEAR), dtype=np.float64) / 255.0
    assert sq.size == 28 and np.abs(sq(_photo(50, 30)).numpy() - ref.transpose(2, 0, 1)).max() <= 1e-6
    with pytest.raises(RaptorError, match="not square"):
        ModelTransform.from_processor({"size": {"shortest_edge": 224}, "do_center_crop": False})
    with pytest.raises(RaptorError, match="unknown (--)?transform 'foo'"):
        t.eval_transform(kind="foo")


def test_model_equals_paper_without_a_processor_config(bundled_teacher):
    for t in (bundled_teacher, build_tiny_teacher("dinov3"), load_teacher("planted:2,base=tiny:dinov2")):
        assert t.processor_config is None
        assert t.eval_transform(kind="model") == t.eval_transform(kind="paper") == t.eval_transform()
        assert t.eval_transform(28, "model") == t.eval_transform(28)


def test_cli_transform_option(clip_dir, tmp_path, capsys):
    out = tmp_path / "store.zarr"
    assert run(["extract", "--teacher", f"hf:{clip_dir}", "--data", "bundled:lfw", "--limit", "2", "--out", str(out),
                "--transform", "model", "--image-size", "28", "--layers", "0,1", "--no-progress"]) == 0
    settings = json.loads((out / "zarr.json").read_text())["attributes"]["raptor"]["settings"]
    assert settings["transform"]["kind"] == "model" and settings["transform"]["center_crop"] == 28
    assert settings["transform"]["resize_shorter"] == 32  # 256 scaled as 224 -> 28
    capsys.readouterr()
    an = tmp_path / "an"
    assert run(["analyze", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--limit", "4", "--out", str(an),
                "--transform", "model", "--null-resamples", "0", "--no-progress"]) == 0
    analysis = json.loads((an / "analysis.json").read_text())
    assert "transform: model" in (an / "config.yaml").read_text()
    assert json.dumps(analysis).count('"kind": "eval"') >= 1  # tiny: no processor config, so the paper's
    for argv, needle in [(["analyze", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--out",
                           str(tmp_path / "x"), "--transform", "foo"], "--transform"),
                         (["analyze", "--store", str(out), "--out", str(tmp_path / "y"), "--transform", "model"],
                          "--transform is for live data"),
                         (["ablation", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--k", "2", "--out",
                           str(tmp_path / "z"), "--transform", "foo"], "--transform")]:
        capsys.readouterr()
        assert run(argv) == 2
        one_error_line(capsys.readouterr().err, needle)
