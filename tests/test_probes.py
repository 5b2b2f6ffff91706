"""Probes: head maths against independent references, the grid = separate runs, the real dataset readers on
fabricated ADE20k / NYUd / ImageNet layouts, feature caching and resume, results lines, the table, bad input."""

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clirun import one_error_line, raptor
from raptor.errors import RaptorError
from raptor.probes import heads
from raptor.probes.data import IGNORE, open_probe_data
from raptor.probes.data.bundled import render_scene
from raptor.probes.data.readers import EIGEN_CROP
from raptor.probes.run import ProbeConfig, read_results, run_probe
from raptor.probes.train import DenseGeometry, Recipe, train_probe

TINY = "tiny:dinov2_with_registers"


# ---- head maths -------------------------------------------------------------------------------------------------

def test_depth_head_conv_before_upsampling_equals_the_official_order():
    g = torch.Generator().manual_seed(0)
    head = heads.GridHead(1, 2 * 8, heads.N_BINS, g)
    torch.nn.init.normal_(head.biases[0], generator=g)
    patches, cls = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 8, generator=g)
    ours = heads.depth_logits(head, 0, patches, cls)
    # official: [patch || cls] as an image -> bilinear x4 -> Conv2d 1x1
    feat = torch.cat([patches, cls[:, None, None].expand(-1, 3, 5, -1)], -1).permute(0, 3, 1, 2)
    up = F.interpolate(feat, scale_factor=4, mode="bilinear", align_corners=False)
    ref = F.conv2d(up, head.weights[0].t()[:, :, None, None], head.biases[0])
    assert ours.shape == (2, heads.N_BINS, 12, 20)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_silog_bins_and_eigen_crop():
    gt = torch.rand(2, 10, 10) * 5 + 1
    mask = torch.ones_like(gt, dtype=torch.bool)
    c = 1.7  # a global scale error: SI-log = (1 - 0.85) * log(c)^2 when the 1e-3 offset is negligible
    assert heads.silog(gt * c, gt, mask).item() == pytest.approx(0.15 * np.log(c) ** 2, rel=2e-3)
    assert heads.silog(gt, gt, mask).item() == pytest.approx(0.0, abs=1e-7)
    d = torch.tensor([0.0, 0.001, 5.0, 9.99, 10.0, 12.0, float("nan")])
    b = heads.depth_bins(d, (0.001, 10.0))
    edges = np.linspace(0.001, 10.0, 257)
    assert b.tolist() == [-100, 0, int(np.searchsorted(edges, 5.0, "right") - 1), 255, 255, -100, -100]
    depth = torch.full((480, 640), 3.0)
    depth[0, 0] = 0.0
    depth[100, 100] = 0.0  # invalid inside the crop
    r0, r1, c0, c1 = EIGEN_CROP
    assert int(heads.eval_mask(depth, (0.001, 10.0), True).sum()) == (r1 - r0) * (c1 - c0) - 1
    assert int(heads.eval_mask(depth, (0.001, 10.0), False).sum()) == 480 * 640 - 2


def test_miou_matches_sklearn_jaccard_and_ignores_255():
    from sklearn.metrics import jaccard_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, (3, 20, 20))
    p = np.where(rng.random(y.shape) < 0.6, y, rng.integers(0, 4, y.shape))
    y_ign = y.copy()
    y_ign[:, :5] = IGNORE
    cm = heads.confusion(torch.from_numpy(p), torch.from_numpy(y_ign).to(torch.uint8), 4)
    keep = y_ign != IGNORE
    assert int(cm.sum()) == int(keep.sum())
    ref = jaccard_score(y_ign[keep], p[keep], average="macro")
    assert heads.miou(cm) == pytest.approx(ref, abs=1e-9)


def test_a_grid_of_learning_rates_trains_each_head_as_if_alone():
    rng = np.random.default_rng(0)
    n, d = 120, 6
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    split = {"pooled": x, "labels": y, "valid": np.ones(n, bool)}
    arrays = {"train": split, "val": split, "test": split}
    init = (torch.zeros(2, d), torch.zeros(2))
    grid = train_probe("cls", arrays, Recipe((1e-3, 1e-1), 10, 32, 1e-2, 4, 1e-6), 0, n_classes=2, init=init)
    for g, lr in enumerate((1e-3, 1e-1)):
        alone = train_probe("cls", arrays, Recipe((lr,), 10, 32, 1e-2, 4, 1e-6), 0, n_classes=2, init=init)
        np.testing.assert_allclose(grid.history["val"][g], alone.history["val"][0])
    assert grid.best["val"] >= 0.9  # a linearly separable task is learnt


# ---- the probe data registry ------------------------------------------------------------------------------------

def test_the_registry_names_each_bundled_sets_source_and_split():
    from raptor.data.sources import open_source
    from raptor.probes.data import PROBE_DATA_HELP, REGISTRY

    for p in REGISTRY:
        assert p.spec in PROBE_DATA_HELP[p.task]
        if p.rooted:
            continue
        data = open_probe_data(p.spec, p.task)
        sizes = " / ".join(f"{len(data.splits[s]):,}" for s in ("train", "val", "test"))
        assert sizes in p.help, (p.spec, sizes, p.help)
        if p.task == "cls":  # the image source's items, ids and labels, split three ways
            items = sorted((x.id, x.target()) for split in data.splits.values() for x in split)
            assert items == sorted((it.id, it.label) for it in open_source(p.source).items), p.spec


# ---- readers on fabricated release layouts ----------------------------------------------------------------------

def _save(a, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _seg_pair(rng, size=56):
    """Left/right halves of two random classes (raw ADE labels 1..3) with 0 = background stripes; the colour says
    the class."""
    colours = {1: (220, 30, 30), 2: (30, 220, 30), 3: (30, 30, 220)}
    img = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    a, b = rng.choice([1, 2, 3], 2, replace=False)
    for lab, cols in ((a, slice(0, size // 2)), (b, slice(size // 2, size))):
        img[:, cols] = colours[lab]
        mask[:, cols] = lab
    mask[:4] = 0  # background: ignored
    img[:4] = 128
    return img, mask


@pytest.fixture
def ade_root(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "ADEChallengeData2016"
    for split, n in (("training", 40), ("validation", 12)):
        for i in range(n):
            img, mask = _seg_pair(rng)
            _save(img, root / "images" / split / f"ADE_{split}_{i:08d}.jpg")
            _save(mask, root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


def test_ade20k_reader_maps_background_to_ignore(ade_root):
    data = open_probe_data(f"ade20k:{ade_root}", "seg")
    assert data.n_classes == 150 and len(data.splits["test"]) == 12
    assert len(data.splits["train"]) + len(data.splits["val"]) == 40 and len(data.splits["val"]) == 4
    s = data.splits["test"][0]
    raw = np.asarray(Image.open(ade_root / "annotations" / "validation" / (s.id.split("/")[1] + ".png")))
    lab = s.target()
    assert (lab[raw == 0] == IGNORE).all()
    assert (lab[raw > 0] == raw[raw > 0] - 1).all()


@pytest.mark.slow
def test_segmentation_probe_learns_fabricated_ade20k(ade_root, tmp_path):
    recs = run_probe(ProbeConfig("seg", TINY, f"ade20k:{ade_root}", str(tmp_path / "out"), seeds=(0,),
                                 lrs=(3e-3, 1e-2), epochs=15, batch_size=8, image_size=56), progress=False)
    r = recs[0]
    assert r["metric"] == "miou" and r["n_images"] == {"train": 36, "val": 4, "test": 12}
    # 3 colour-coded classes: the probe finds which and where (a constant prediction scores <= 33 %)
    assert r["value"] >= 60, r["best"]
    assert r["value"] > r["prior_baseline"] + 20


@pytest.fixture
def nyud_root(tmp_path):
    """The official CSV layout: 8-bit train depth (255 = 10 m), 16-bit millimetre test depth at 480 x 640 whose
    values outside the Eigen crop are deliberately wild."""
    rng = np.random.default_rng(0)
    root = tmp_path / "nyu"
    rows = {"train": [], "test": []}
    for split, n, hw in (("train", 12, (56, 70)), ("test", 3, (480, 640))):
        for i in range(n):
            img, depth = render_scene(rng, size=max(hw))
            img, depth = img[: hw[0], : hw[1]], depth[: hw[0], : hw[1]]
            rgb = f"data/nyu2_{split}/{i}.jpg"
            dep = f"data/nyu2_{split}/{i}.png"
            _save(img, root / rgb)
            if split == "train":
                Image.fromarray((depth / 10 * 255).round().clip(0, 255).astype(np.uint8)).save(root / dep)
            else:
                mm = (depth * 1000).round().astype(np.uint16)
                mm[:40] = 9000  # outside the Eigen crop (rows < 45): must not count
                Image.fromarray(mm).save(root / dep)
            rows[split].append((rgb, dep))
    for split in rows:
        with open(root / "data" / f"nyu2_{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows[split])
    return root


def test_nyud_reader_scales_and_eigen_crop(nyud_root):
    data = open_probe_data(f"nyud:{nyud_root}", "depth")
    assert data.eigen_crop and data.image_size is None
    te = data.splits["test"][0].target()
    raw = np.asarray(Image.open(nyud_root / "data/nyu2_test/0.png")).astype(np.float64)
    np.testing.assert_allclose(te, raw / 1000, rtol=1e-6)
    tr = data.splits["train"][0]
    raw8 = np.asarray(Image.open(nyud_root / f"{tr.id[:-4]}.png")).astype(np.float64)
    np.testing.assert_allclose(tr.target(), raw8 / 255 * 10, rtol=1e-6)


def test_depth_probe_on_fabricated_nyud_native_resolution_and_eigen_crop(nyud_root, tmp_path):
    from raptor.probes.features import DenseTransform

    # train images are 56x70, test 480x640: one size per run is required, so bring them to 112 x 112
    recs = run_probe(ProbeConfig("depth", TINY, f"nyud:{nyud_root}", str(tmp_path / "o"), seeds=(0,), lrs=(1e-2,),
                                 epochs=2, batch_size=4, image_size=112), progress=False)
    assert np.isfinite(recs[0]["value"])
    # native resolution (the NYUd protocol): 480x640 padded to 490x644, predictions cropped back, Eigen crop
    t = DenseTransform(None, 14, (0.5,) * 3, (0.5,) * 3)
    x, tgt = t(Image.new("RGB", (640, 480)), np.ones((480, 640), np.float32), "a")
    assert tuple(x.shape) == (3, 490, 644) and t.padding(480, 640) == (5, 2) and tgt.shape == (480, 640)
    with pytest.raises(RaptorError, match="differs from the image size"):
        t(Image.new("RGB", (640, 480)), np.ones((479, 640), np.float32), "bad")
    # the prior baseline's RMSE counts only the Eigen crop: the wild rows above it change nothing
    from raptor.probes.train import prior_baseline

    tr_d = np.stack([render_scene(np.random.default_rng(i), 60)[1][:48, :60] for i in range(4)])
    te_d = np.full((2, 480, 640), 4.0, np.float32)
    te_d[:, :40] = 9.0
    arr = {"train": {"depth": tr_d, "valid": np.ones(4, bool)}, "test": {"depth": te_d, "valid": np.ones(2, bool)}}
    geo = DenseGeometry(14, (0, 0), (480, 640), depth_range=(0.001, 10.0), eigen=True)
    arr["train"]["depth"] = np.full((4, 480, 640), 3.0, np.float32)
    assert prior_baseline("depth", arr, geo) == pytest.approx(1.0)


def test_depth_probe_learns_fabricated_paired_folders(tmp_path):
    """The paired-folder layout (rgb/ + depth/ in millimetres, train/ and test/): depth is a monotone function of
    each 14 px block's grey level, random per image, so a prior that never looks at the image cannot know it."""
    rng = np.random.default_rng(0)
    root = tmp_path / "paired"
    for split, n in (("train", 48), ("test", 16)):
        for i in range(n):
            g = np.kron(rng.random((4, 4)), np.ones((14, 14)))
            _save(np.repeat((g * 255).astype(np.uint8)[..., None], 3, 2), root / split / "rgb" / f"{i}.png")
            _save(((1 + 8 * g) * 1000).astype(np.uint16), root / split / "depth" / f"{i}.png")
    data = open_probe_data(f"paired:{root}", "depth")
    assert data.splits["test"][0].target().max() <= 9.0 + 1e-3
    r = run_probe(ProbeConfig("depth", TINY, f"paired:{root}", str(tmp_path / "o"), seeds=(0,), lrs=(1e-2, 3e-2),
                              epochs=15, batch_size=8, image_size=56), progress=False)[0]
    assert r["value"] < 0.6 * r["prior_baseline"], (r["value"], r["prior_baseline"])


@pytest.fixture
def imagenet_root(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imnet"
    for split, n in (("train", 60), ("val", 10)):
        for c, col in enumerate(((200, 40, 40), (40, 40, 200))):
            for i in range(n):
                a = (np.array(col) + rng.normal(0, 25, (40, 40, 3))).clip(0, 255).astype(np.uint8)
                _save(a, root / split / f"n0{c}" / f"{i}.JPEG")
    return root


def test_classification_probe_on_imagenet_layout_caches_features_and_resumes(imagenet_root, tmp_path, monkeypatch):
    from raptor.probes.backbones import Backbone

    calls = []
    orig = Backbone.final_tokens
    monkeypatch.setattr(Backbone, "final_tokens", lambda self, x: calls.append(len(x)) or orig(self, x))
    out = tmp_path / "o"
    cfg = dict(task="cls", backbone=TINY, data=f"imagenet:{imagenet_root}", out=str(out), image_size=28, epochs=5,
               batch_size=16)
    recs = run_probe(ProbeConfig(**cfg, seeds=(0, 1)), progress=False)
    assert sum(calls) == 140  # every image through the backbone exactly once
    assert all(r["value"] >= 0.9 for r in recs), [r["best"] for r in recs]
    assert recs[0]["n_images"] == {"train": 108, "val": 12, "test": 20}
    # more seeds and another grid reuse the cached features: no backbone pass at all
    run_probe(ProbeConfig(**cfg, seeds=(0, 1, 2)), progress=False)
    run_probe(ProbeConfig(**cfg, seeds=(0,), lrs=(1e-3,)), progress=False)
    assert sum(calls) == 140
    lines = read_results(out / "results.jsonl")
    assert [r["seed"] for r in lines] == [0, 1, 2, 0]  # seeds 0 and 1 were not redone by the second run
    # a torn last line (a killed run) is ignored, never half-read
    with open(out / "results.jsonl", "a") as f:
        f.write('{"backbone": "x", "met')
    assert len(read_results(out / "results.jsonl")) == 4


def test_feature_pass_resumes_after_an_interruption(imagenet_root, tmp_path):
    from raptor.probes.backbones import Backbone, parse_backbone
    from raptor.probes.features import ArraySet, cache_dir, split_features, split_key, transform_for

    data = open_probe_data(f"imagenet:{imagenet_root}", "cls")
    bb = Backbone.load(parse_backbone(TINY))
    tf = transform_for("cls", data, bb.teacher, 28)
    ref = split_features(bb, data, "cls", "train", tf, tmp_path / "ref", batch=8, progress=False)
    d = cache_dir(tmp_path / "c", split_key(bb.identity(), data, "cls", "train", tf))
    aset = ArraySet(d, split_key(bb.identity(), data, "cls", "train", tf))
    real = bb.final_tokens
    n = {"k": 0}

    def dying(x):
        n["k"] += 1
        if n["k"] == 3:
            raise KeyboardInterrupt
        return real(x)
    bb.final_tokens = dying
    with pytest.raises(KeyboardInterrupt):
        split_features(bb, data, "cls", "train", tf, tmp_path / "c", batch=8, progress=False)
    assert not aset.complete and aset.done() == 16
    bb.final_tokens = real
    got = split_features(bb, data, "cls", "train", tf, tmp_path / "c", batch=8, progress=False)
    np.testing.assert_allclose(got["pooled"], ref["pooled"], rtol=1e-6)
    np.testing.assert_array_equal(got["labels"], ref["labels"])


def test_backbones_layer_pixels_and_runs(tmp_path):
    from raptor.probes.backbones import Backbone, parse_backbone
    from raptor.surrogate.block import BlockConfig
    from raptor.surrogate.checkpoint import save_tensors
    from raptor.surrogate.model import RaptorModel, SurrogateConfig

    x = torch.randn(2, 3, 28, 28)
    full = Backbone.load(parse_backbone(TINY))
    at = Backbone.load(parse_backbone(TINY, layer=full.teacher.depth))
    torch.testing.assert_close(full.final_tokens(x), at.final_tokens(x))
    early = Backbone.load(parse_backbone(TINY, layer=1))
    torch.testing.assert_close(early.final_tokens(x), full.teacher.run_block(0, full.teacher.embed(x)))
    px = Backbone.load(parse_backbone("pixels:14"))
    tok = px.final_tokens(x)
    assert tok.shape == (2, 5, 588)
    torch.testing.assert_close(tok[0, 2].reshape(3, 14, 14), x[0, :, :14, 14:28])
    torch.testing.assert_close(tok[0, 0].reshape(3, 14, 14), x[0].reshape(3, 14, 2, 14, 2).mean((2, 4)))
    # a run directory: full surrogate and splices
    t = full.teacher
    cfg = SurrogateConfig([[1], [2, 3]], BlockConfig(t.dim, 2))
    run = tmp_path / "run"
    run.mkdir()
    model = RaptorModel(cfg)
    save_tensors(model.state_dict(), run / "model.safetensors")
    (run / "surrogate.json").write_text(json.dumps({"surrogate": cfg.to_dict(), "teacher": TINY}))
    sp = Backbone.load(parse_backbone(str(run), splice="1:3"))
    assert sp.label == "raptor k=2 (run) splice 1:3"
    torch.testing.assert_close(sp.final_tokens(x), model.splice(t, x, 1, 3))
    with pytest.raises(RaptorError, match="^layer reads a teacher at an inner layer; for a surrogate run use splice"):
        parse_backbone(str(run), layer=2)
    with pytest.raises(RaptorError, match="covers layers 0..3"):
        parse_backbone(str(run), splice="0:5")
    (run / "surrogate.json").write_text(json.dumps({"surrogate": cfg.to_dict(), "teacher": "tiny:vit"}))
    other = parse_backbone(str(run))
    tv = Backbone.load(parse_backbone("tiny:vit")).teacher
    if tv.dim == t.dim and tv.depth == t.depth:  # same shape: loads (the weights fit)
        Backbone.load(other)


def test_table_aggregates_seeds_and_percent_of_teacher(tmp_path):
    from raptor.probes.run import append_line
    from raptor.probes.table import write_table

    vals = {"T": [0.90, 0.92, 0.94], "R": [0.80, 0.82, 0.81]}
    rmse = {"T": [0.50, 0.52, 0.54], "R": [0.60, 0.61, 0.62]}
    for who, kind in (("T", "teacher"), ("R", "raptor")):
        for s in range(3):
            spec = {"id": who, "kind": kind, "layer": None}
            base = {"backbone": who, "backbone_spec": spec, "teacher": "t", "seed": s}
            append_line(tmp_path / "results.jsonl", {**base, "task": "cls", "data": "d", "metric": "top1",
                                                     "value": vals[who][s], "prior_baseline": 0.1})
            append_line(tmp_path / "results.jsonl", {**base, "task": "depth", "data": "n", "metric": "rmse",
                                                     "value": rmse[who][s], "prior_baseline": 1.0})
    md, md_path, csv_path = write_table([tmp_path])
    rows = list(csv.DictReader(open(csv_path)))
    r_cls = next(r for r in rows if r["backbone"] == "R" and r["metric"] == "top1")
    assert float(r_cls["mean"]) == pytest.approx(100 * np.mean(vals["R"]))
    assert float(r_cls["std"]) == pytest.approx(100 * np.std(vals["R"], ddof=1))
    assert float(r_cls["pct_of_teacher"]) == pytest.approx(100 * np.mean(vals["R"]) / np.mean(vals["T"]), rel=1e-3)
    r_d = next(r for r in rows if r["backbone"] == "R" and r["metric"] == "rmse")
    assert float(r_d["pct_of_teacher"]) == pytest.approx(100 * np.mean(rmse["T"]) / np.mean(rmse["R"]), rel=1e-3)
    assert "| T | 92.0 ± 2.0 | 100.0 % |" in md and "training-set prior" in md


def test_table_gives_the_share_of_the_teachers_gain_over_raw_pixels(tmp_path):
    """Raw pixels at 0.88 and a teacher at 0.92: a surrogate at 0.90 is 97.8 % of the teacher but only 50 % of the
    teacher's gain over pixels (RMSE: the gain is measured downwards); the strongest pixel baseline is the
    reference."""
    from raptor.probes.run import append_line
    from raptor.probes.table import write_table

    top1 = {"T": 0.92, "R": 0.90, "P14": 0.88, "P28": 0.80}
    rmse = {"T": 0.50, "R": 0.60, "P14": 0.70, "P28": 0.90}
    for who in top1:
        kind = {"T": "teacher", "R": "raptor"}.get(who, "pixels")
        spec = {"id": who, "kind": kind, "layer": None}
        base = {"backbone": who, "backbone_spec": spec, "teacher": "t" if kind != "pixels" else who, "seed": 0}
        append_line(tmp_path / "results.jsonl", {**base, "task": "cls", "data": "d", "metric": "top1",
                                                 "value": top1[who]})
        append_line(tmp_path / "results.jsonl", {**base, "task": "depth", "data": "n", "metric": "rmse",
                                                 "value": rmse[who]})
    md, _, csv_path = write_table([tmp_path])
    rows = {(r["backbone"], r["metric"]): r for r in csv.DictReader(open(csv_path))}
    assert float(rows["R", "top1"]["pct_of_teacher"]) == pytest.approx(100 * 0.90 / 0.92, rel=1e-3)
    assert float(rows["R", "top1"]["gain_over_pixels_pct"]) == pytest.approx(50.0)
    assert float(rows["T", "top1"]["gain_over_pixels_pct"]) == pytest.approx(100.0)
    assert float(rows["R", "rmse"]["gain_over_pixels_pct"]) == pytest.approx(50.0)
    assert "share of the teacher's gain over pixels" in md
    # a teacher within its seed noise of the pixels (or below them) gives no share: a ratio over noise
    (tmp_path / "noisy").mkdir()
    for seed, (t, r, p) in enumerate(((0.90, 0.80, 0.91), (0.94, 0.85, 0.91))):
        for who, v in (("T", t), ("R", r), ("P14", p)):
            kind = {"T": "teacher", "R": "raptor"}.get(who, "pixels")
            append_line(tmp_path / "noisy" / "results.jsonl",
                        {"backbone": who, "backbone_spec": {"id": who, "kind": kind, "layer": None},
                         "teacher": "t" if kind != "pixels" else who, "seed": seed, "task": "cls", "data": "e",
                         "metric": "top1", "value": v})
    md2, _, csv2 = write_table([tmp_path / "noisy"])
    rows2 = {(r["backbone"], r["metric"]): r for r in csv.DictReader(open(csv2))}
    assert rows2["R", "top1"]["gain_over_pixels_pct"] == "" and "teacher ≈ pixels" in md2


# ---- bundled data and the real teacher --------------------------------------------------------------------------

def test_bundled_probe_data_are_real_and_split_disjointly():
    digits = open_probe_data("bundled:digits", "cls")
    ids = {s: {x.id for x in v} for s, v in digits.splits.items()}
    assert [len(ids[s]) for s in ("train", "val", "test")] == [1000, 297, 500]
    assert not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    seg = open_probe_data("bundled:digit-seg", "seg")
    img, mask = seg.splits["train"][0].image(), seg.splits["train"][0].target()
    assert img.size == (112, 112) and mask.shape == (112, 112)
    assert set(np.unique(mask)) - {0} and (np.unique(mask) <= 10).all()
    moto = open_probe_data("bundled:motorcycle", "depth")
    d = moto.splits["test"][0].target()
    assert d.shape == (140, 140) and 2.0 < d[d > 0].min() and d.max() < 5.1
    cols = lambda s: {int(x.id.split(",")[1]) for x in moto.splits[s]}  # noqa: E731
    assert max(cols("train")) + 140 <= min(cols("test"))  # train crops end left of every test crop


@pytest.mark.slow
def test_real_teacher_classifies_lfw_faces_far_above_raw_pixels(tmp_path):
    out = str(tmp_path / "o")
    kw = dict(seeds=(0,), lrs=(1e-3, 1e-2), epochs=20)
    teacher = run_probe(ProbeConfig("cls", "bundled:dinov2-s", "bundled:lfw", out, **kw), progress=False)[0]
    pixels = run_probe(ProbeConfig("cls", "pixels:14", "bundled:lfw", out, **kw), progress=False)[0]
    assert teacher["value"] >= 0.9 and teacher["value"] > pixels["value"] > teacher["prior_baseline"]


# ---- bad input: one line, exit 2 --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["missing_split", "mask_size", "no_classes", "unknown_backbone", "wrong_task",
                                  "splice_on_teacher", "bad_seeds"])
@pytest.mark.slow
def test_bad_input_is_one_error_line(case, tmp_path, ade_root, imagenet_root):
    import shutil

    args = ["probe", "--out", tmp_path / "o", "--backbone", TINY, "--seeds", "0", "--epochs", "1"]
    needle = ""
    if case == "missing_split":
        shutil.rmtree(ade_root / "images" / "validation")
        args += ["--task", "seg", "--data", f"ade20k:{ade_root}"]
        needle = "missing split 'validation'"
    elif case == "mask_size":
        m = ade_root / "annotations" / "training"
        for p in m.iterdir():
            Image.fromarray(np.ones((30, 56), np.uint8)).save(p)
        args += ["--task", "seg", "--data", f"ade20k:{ade_root}"]
        needle = "differs from the image size"
    elif case == "no_classes":
        empty = tmp_path / "flat"
        for s in ("train", "val"):
            (empty / s).mkdir(parents=True)
            Image.new("RGB", (28, 28)).save(empty / s / "x.png")
        args += ["--task", "cls", "--data", f"imagenet:{empty}"]
        needle = "no class subfolders"
    elif case == "unknown_backbone":
        args[args.index(TINY)] = "resnet50"
        args += ["--task", "cls", "--data", "bundled:lfw"]
        needle = "unknown backbone"
    elif case == "wrong_task":
        args += ["--task", "depth", "--data", "bundled:lfw"]
        needle = "is cls data, not depth"
    elif case == "splice_on_teacher":
        args += ["--task", "cls", "--data", "bundled:lfw", "--splice", "0:2"]
        needle = "--splice needs a raptor fit run"
    elif case == "bad_seeds":
        args[args.index("0")] = "0,x"
        args += ["--task", "cls", "--data", "bundled:lfw"]
        needle = "bad --seeds"
    r = raptor(*args)
    assert r.returncode == 2, r.stderr
    one_error_line(r.stderr, needle)
    if case != "mask_size":  # refused before any output was created
        assert not (tmp_path / "o").exists()


def test_init_head_from_an_official_linear_head_file(tmp_path):
    """``--init-head FILE``: every head of the grid starts from the file's map, so the epoch-0 validation score is
    that map's accuracy on the cached features."""
    from raptor.probes.backbones import Backbone, parse_backbone
    from raptor.probes.features import cache_dir, split_key, transform_for

    bb = Backbone.load(parse_backbone(TINY))
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(2, 2 * bb.teacher.dim, generator=g), torch.randn(2, generator=g)
    torch.save({"weight": w, "bias": b}, tmp_path / "head.pth")
    out = tmp_path / "o"
    r = run_probe(ProbeConfig("cls", TINY, "bundled:lfw", str(out), seeds=(0,), lrs=(1e-3, 1e-2), epochs=1,
                              image_size=28, init_head=str(tmp_path / "head.pth")), progress=False)[0]
    data = open_probe_data("bundled:lfw", "cls")
    key = split_key(bb.identity(), data, "cls", "val", transform_for("cls", data, bb.teacher, 28))
    feats = np.load(cache_dir(out / "features", key) / "pooled.npy")
    labels = np.load(cache_dir(out / "features", key) / "labels.npy")
    expect = float(((torch.from_numpy(feats) @ w.t() + b).argmax(1).numpy() == labels).mean())
    assert r["history"]["val"][0][0] == pytest.approx(expect) and r["history"]["val"][1][0] == pytest.approx(expect)
    torch.save({"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(RaptorError, match="input features"):
        run_probe(ProbeConfig("cls", TINY, "bundled:lfw", str(tmp_path / "o2"), seeds=(0,), epochs=1, image_size=28,
                              init_head=str(tmp_path / "bad.pth")), progress=False)
