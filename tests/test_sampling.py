"""--limit N is a seeded random sample, stratified by class, recorded next to every output (not the first N in
folder order, which on a class-sorted folder keeps the first classes only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from raptor.cli import run
from raptor.data import open_source
from raptor.data.sampling import sample_positions, sample_rows


@pytest.fixture(scope="module")
def class_folders(tmp_path_factory):
    """10 class folders x 5 images (sorted folder order: class 0's five first)."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"class{c}").mkdir()
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12), frac=st.floats(0.01, 1.0),
       seed=st.integers(0, 3))
def test_stratified_sample_properties(sizes, frac, seed):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    np.random.default_rng(seed).shuffle(labels)
    n = len(labels)
    limit = max(1, int(round(frac * n)))
    pos = sample_positions(n, limit, labels, seed)
    assert len(pos) == min(limit, n) and len(set(pos.tolist())) == len(pos) and (np.diff(pos) > 0).all()
    counts = np.bincount(labels[pos], minlength=len(sizes))
    share = np.array(sizes) / n * limit
    if limit >= len(sizes):
        assert (counts >= 1).all()  # every class is represented
    # proportional: within one image of the class's share, except where a small class was raised to 1
    assert (np.abs(counts - share) <= np.maximum(1, 1 - share + 1e-9) + 1e-9).all(), (counts, share)
    assert (sample_positions(n, limit, labels, seed) == pos).all()  # seeded: reproducible


def test_unlabelled_sample_is_seeded_and_uniform():
    a, b = sample_positions(1000, 100, None, seed=1), sample_positions(1000, 100, None, seed=2)
    assert len(a) == 100 and not np.array_equal(a, b) and np.array_equal(a, sample_positions(1000, 100, None, 1))
    assert a.min() < 100 and a.max() > 900  # spread over the set, not its head
    assert np.array_equal(sample_positions(1000, 10, None, order="sorted"), np.arange(10))
    rows = np.array([3, 5, 8, 13, 21, 34])
    labels = np.zeros(40, np.int64)
    labels[[13, 21, 34]] = 1
    got = sample_rows(rows, 2, labels)
    assert set(labels[got]) == {0, 1}


def test_image_source_limit_covers_every_class(class_folders):
    src = open_source(str(class_folders))
    sub = src.subset(10)
    assert sorted(sub.labels.tolist()) == list(range(10))  # one per class (the first 10 would be classes 0 and 1)
    assert sub.sample["seed"] == 1 and sub.sample["order"] == "random" and len(sub.sample["ids"]) == 10
    assert sorted(set(src.subset(10, order="sorted").labels.tolist())) == [0, 1]
    assert [it.id for it in src.subset(10, seed=5).items] != [it.id for it in sub.items]


def test_extract_limit_stores_every_class_and_records_the_sample(class_folders, tmp_path, capsys):
    out = tmp_path / "s"
    assert run(["extract", "--teacher", "tiny:dinov2", "--data", str(class_folders), "--limit", "10",
                "--image-size", "28", "--out", str(out), "--no-progress"]) == 0
    from raptor.store import TrajectoryStore

    st_ = TrajectoryStore(out)
    assert sorted(st_.labels.tolist()) == list(range(10))
    assert st_.meta["settings"]["sample"] == {"limit": 10, "order": "random", "seed": 1}
    # the same --out with another sample is refused, one line, before anything is touched
    capsys.readouterr()
    assert run(["extract", "--teacher", "tiny:dinov2", "--data", str(class_folders), "--limit", "10",
                "--sample", "sorted", "--image-size", "28", "--out", str(out), "--no-progress"]) == 2
    assert "sample" in capsys.readouterr().err
    sorted_out = tmp_path / "sorted"
    assert run(["extract", "--teacher", "tiny:dinov2", "--data", str(class_folders), "--limit", "10",
                "--sample", "sorted", "--image-size", "28", "--out", str(sorted_out), "--no-progress"]) == 0
    assert sorted(set(TrajectoryStore(sorted_out).labels.tolist())) == [0, 1]


@pytest.mark.slow
def test_analyze_and_dynamics_record_the_chosen_ids(class_folders, tmp_path):
    out = tmp_path / "a"
    assert run(["analyze", "--teacher", "tiny:dinov2", "--data", str(class_folders), "--limit", "12",
                "--sample-seed", "3", "--image-size", "28", "--out", str(out), "--no-progress"]) == 0
    sample = json.loads((out / "analysis.json").read_text())["data"]["sample"]
    assert sample["seed"] == 3 and sample["limit"] == 12 and len(sample["ids"]) == 12
    assert len({i.split("/")[0] for i in sample["ids"]}) == 10  # every class folder
    d = tmp_path / "d"
    assert run(["dynamics", "--teacher", "tiny:dinov2", "--data", str(class_folders), "--limit", "10",
                "--image-size", "28", "--perturb-images", "2", "--rank-images", "2", "--out", str(d),
                "--no-progress"]) == 0
    sample = json.loads((d / "dynamics.json").read_text())["data"]["sample"]
    assert len({i.split("/")[0] for i in sample["ids"]}) == 10


def test_store_limit_samples_rows_by_class(class_folders, tmp_path):
    """analyze --store --limit draws rows (stratified by the store's labels), not the first rows."""
    store = tmp_path / "all"
    assert run(["extract", "--teacher", "tiny:dinov2", "--data", str(class_folders), "--image-size", "28",
                "--out", str(store), "--no-progress"]) == 0
    out = tmp_path / "a"
    assert run(["analyze", "--store", str(store), "--limit", "10", "--out", str(out), "--no-progress"]) == 0
    ids = json.loads((out / "analysis.json").read_text())["data"]["sample"]["ids"]
    assert len({i.split("/")[0] for i in ids}) == 10
