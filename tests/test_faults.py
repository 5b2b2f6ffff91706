"""Fault suite: every defect found by trying the toolkit as a user would, reproduced as a real fault, with
the assertion that nothing earlier is lost. docs/reliability.md maps each guarantee to its test here."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clirun import ENV, faulty, one_error_line, raptor
from faultfs import remount, try_mount_tmpfs, umount
from raptor.cli import run
from raptor.data import load_images, open_source
from raptor.errors import RaptorError
from raptor.store import TrajectoryStore, extract
from raptor.teachers import load_teacher

TINY = ["--teacher", "tiny:dinov2"]


@pytest.fixture(scope="module")
def tiny():
    return load_teacher("tiny:dinov2")


@pytest.fixture(scope="module")
def store40(tmp_path_factory, tiny):
    """A complete tiny-teacher store of 40 LFW images (20 faces, 20 non-faces: two classes for the probes)."""
    out = tmp_path_factory.mktemp("s") / "store"
    src = open_source("bundled:lfw")
    src.items = src.items[80:120]
    extract(tiny, src, out, dtype="float32", chunk_images=8, progress=False)
    return out


def cli(capsys, *args) -> tuple[int, str]:
    """The real CLI in-process: (exit code, stderr)."""
    capsys.readouterr()
    rc = run([str(a) for a in args])
    return rc, capsys.readouterr().err


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


FIT_FAST = ["--k", "2", "--steps1", "4", "--steps2", "4", "--val-images", "5", "--probe-data", "none",
            "--no-progress", "--ckpt-every", "2"]


# ---- 1. data loss --------------------------------------------------------------------------------------------------

def test_refused_fits_leave_a_finished_run_byte_identical(tmp_path, store40, capsys, monkeypatch):
    out = tmp_path / "run"
    rc, err = cli(capsys, "fit", *TINY, "--store", store40, "--out", out, *FIT_FAST)
    assert rc == 0, err
    before = snapshot(out)
    assert {"metrics.json", "config.yaml", "model.safetensors"} <= set(before)
    for extra, needle in (([], "--resume"), (["--resume", "--lr", "1e-3"], "lr 0.003 -> 0.001"),
                          (["--resume", "--probe-data", "bundled:nope"], "unknown bundled data set"),
                          (["--resume", "--batch-size", "0"], "--batch-size must be >= 1")):
        rc, err = cli(capsys, "fit", *TINY, "--store", store40, "--out", out, *FIT_FAST, *extra)
        assert rc == 2
        one_error_line(err, needle)
        assert snapshot(out) == before, extra
    # a re-evaluation (--resume of a finished run) that fails half-way keeps the earlier results too
    import raptor.surrogate.fit as fit_mod

    def boom(*a, **k):
        raise OSError(28, "No space left on device", str(out / "metrics.json"))

    monkeypatch.setattr(fit_mod, "_probes", boom)
    rc, err = cli(capsys, "fit", *TINY, "--store", store40, "--out", out, *FIT_FAST, "--resume")
    assert rc == 2
    one_error_line(err, "no space left on device")
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "config.yaml"} == \
        {k: v for k, v in before.items() if k != "config.yaml"}
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]


@pytest.mark.slow
def test_failed_analyze_keeps_the_earlier_analysis(tmp_path, capsys, monkeypatch):
    out = tmp_path / "an"
    args = ["analyze", *TINY, "--data", "bundled:lfw", "--limit", "12", "--out", out, "--no-progress"]
    rc, err = cli(capsys, *args)
    assert rc == 0, err
    before = snapshot(out)
    import raptor.plots as plots

    def full(*a, **k):
        raise OSError(28, "No space left on device", "x.png")

    monkeypatch.setattr(plots, "cost_curve", full)
    rc, err = cli(capsys, *args)
    assert rc == 2
    one_error_line(err, "no space left")
    assert snapshot(out) == before
    # and a fresh directory that fails is not left behind
    rc, err = cli(capsys, "analyze", *TINY, "--data", "bundled:lfw", "--limit", "12", "--out", tmp_path / "new" / "an",
                  "--no-progress")
    assert rc == 2 and not (tmp_path / "new").exists()


# ---- 2. partial stores ---------------------------------------------------------------------------------------------

def test_fit_and_analyze_refuse_an_incomplete_store(tmp_path, tiny, capsys):
    part = tmp_path / "part"
    extract(tiny, open_source("bundled:lfw").subset(40), part, chunk_images=8, stop_after_chunks=2, progress=False)
    assert not TrajectoryStore(part).complete
    rc, err = cli(capsys, "fit", *TINY, "--store", part, "--out", tmp_path / "f", *FIT_FAST)
    assert rc == 2
    one_error_line(err, "is incomplete (2/5 chunks)")
    rc, err = cli(capsys, "analyze", *TINY, "--store", part, "--out", tmp_path / "a")
    assert rc == 2
    one_error_line(err, "incomplete")
    assert not (tmp_path / "f").exists() and not (tmp_path / "a").exists()


# ---- 3-6. one error line, exit 2, nothing created ------------------------------------------------------------------

def _bad_weights(tmp_path: Path) -> dict[str, Path]:
    import pickle

    marker = tmp_path / "PAYLOAD_RAN"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    files = {"text": tmp_path / "notes.pth", "empty": tmp_path / "empty.pth", "pickle": tmp_path / "evil.pth",
             "torch_pickle": tmp_path / "evil_zip.pth", "tampered": tmp_path / "tampered.safetensors"}
    files["text"].write_text("hello, I am not a checkpoint\n")
    files["empty"].write_bytes(b"")
    with open(files["pickle"], "wb") as f:
        pickle.dump({"w": Payload()}, f)
    torch.save({"w": Payload()}, files["torch_pickle"])
    from safetensors.torch import save_file

    save_file({"cls_token": torch.zeros(1, 1, 8)}, str(files["tampered"]))
    raw = bytearray(files["tampered"].read_bytes())
    raw[9:13] = b"\x00\xff{["  # break the JSON header
    files["tampered"].write_bytes(bytes(raw))
    files["marker"] = marker
    return files


def test_bad_inputs_are_one_line_and_create_nothing(tmp_path, store40, capsys):
    X = tmp_path / "X"
    corrupt_zarr = tmp_path / "corrupt_zarr"
    corrupt_valid, corrupt_ids = tmp_path / "corrupt_valid", tmp_path / "corrupt_ids"
    for d in (corrupt_zarr, corrupt_valid, corrupt_ids):
        import shutil

        shutil.copytree(store40, d)
    (corrupt_zarr / "zarr.json").write_text((corrupt_zarr / "zarr.json").read_text()[:90])
    for d, name in ((corrupt_valid, "valid"), (corrupt_ids, "ids")):  # the arrays that record progress and ids
        (d / name / "zarr.json").write_text((d / name / "zarr.json").read_text()[:90])
    w = _bad_weights(tmp_path)
    ext = ["extract", *TINY, "--data", "bundled:lfw", "--out", X]
    fit_online = ["fit", *TINY, "--data", "bundled:lfw", "--limit", "40", "--out", X, *FIT_FAST]
    fit_store = ["fit", *TINY, "--store", store40, "--out", X, *FIT_FAST]
    cases = [
        (ext + ["--autocast", "bogus"], "unknown --autocast"),
        (ext + ["--limit", "0"], "--limit must be >= 1"),
        (ext + ["--image-size", "0"], "--image-size must be >= 1"),
        (ext + ["--batch-size", "0"], "--batch-size must be >= 1"),
        (ext + ["--chunk-images", "-3"], "--chunk-images must be >= 1"),
        (ext + ["--batch-size", "many"], "invalid value for '--batch-size'"),
        (fit_online + ["--batch-size", "0"], "--batch-size must be >= 1"),
        (fit_store + ["--batch-size", "-2"], "--batch-size must be >= 1"),
        (fit_online + ["--k", "0"], "--k must be >= 1"),
        (fit_store + ["--k", "9"], "--k must lie in 1..3"),
        (fit_online + ["--limit", "0"], "--limit must be >= 1"),
        (fit_online + ["--image-size", "0"], "--image-size must be >= 1"),
        (fit_store + ["--phases", "[]"], "bad --phases"),
        (fit_store + ["--phases", ""], "empty --phases"),
        (fit_store + ["--phases", "[[1, 2], [3, \"x\"]]"], "bad --phases"),
        (fit_store + ["--phases", "[[1], [3]]"], "phases must cover layers"),
        (["analyze", *TINY, "--data", "bundled:lfw", "--out", X, "--limit", "0"], "--limit must be >= 1"),
        (["analyze", *TINY, "--data", "bundled:lfw", "--out", X, "--batch-size", "0"], "--batch-size must be >= 1"),
        (["analyze", *TINY, "--data", "bundled:lfw", "--out", X, "--k-max", "0"], "--k-max must be >= 1"),
        (["info", corrupt_zarr], "zarr.json is damaged"),
        (["info", corrupt_valid], "metadata of its valid array (valid/zarr.json) cannot be read"),
        (["info", corrupt_ids], "metadata of its ids array (ids/zarr.json) cannot be read"),
        (["extract", "--teacher", f"dinov2-pth:{w['text']}", "--data", "bundled:lfw", "--out", X], "is a text file"),
        (["extract", "--teacher", f"dinov2-pth:{w['empty']}", "--data", "bundled:lfw", "--out", X], "empty file"),
        (["extract", "--teacher", f"dinov2-pth:{w['pickle']}", "--data", "bundled:lfw", "--out", X],
         "refuses to unpickle"),
        (["extract", "--teacher", f"dinov2-pth:{w['torch_pickle']}", "--data", "bundled:lfw", "--out", X],
         "refuses to unpickle"),
        (["extract", "--teacher", f"dinov2-pth:{w['tampered']}", "--data", "bundled:lfw", "--out", X], "damaged"),
        (["fit", "--bogus-option"], "no such option"),
        (["nosuchcommand"], "no such command"),
    ]
    for args, needle in cases:
        rc, err = cli(capsys, *args)
        assert rc == 2, (args, err)
        line = one_error_line(err, needle)
        assert "weights_only=False" not in line and "weights_only` set to `False" not in line
        assert not X.exists(), args
    assert not w["marker"].exists(), "a pickle payload ran"


def test_a_corrected_command_is_accepted_after_a_refused_one(tmp_path, capsys):
    """A bad --autocast used to create the store, then refuse the corrected command."""
    out = tmp_path / "s"
    base = ["extract", *TINY, "--data", "bundled:lfw", "--limit", "8", "--out", out, "--no-progress"]
    rc, err = cli(capsys, *base, "--autocast", "bf17")
    assert rc == 2 and not out.exists()
    rc, err = cli(capsys, *base)
    assert rc == 0, err
    assert TrajectoryStore(out).complete


def test_cheap_checks_come_before_the_teacher_loads(tmp_path, store40, capsys, patch_everywhere):
    """Data, k, phases and an existing --out are checked without loading the teacher (20-35 s for the real one)."""
    import raptor.teachers as teachers

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded before a cheap check failed")

    patch_everywhere(teachers, "load_teacher", no_teacher)
    (tmp_path / "notastore").mkdir()
    (tmp_path / "notastore" / "file.txt").write_text("x")
    cases = [
        (["extract", "--data", "/no/such/dir", "--out", tmp_path / "x"], "image folder not found"),
        (["extract", "--data", "bundled:lfw", "--out", tmp_path / "notastore"], "not a raptor store"),
        (["extract", "--data", "bundled:lfw", "--out", store40], "other settings"),
        (["analyze", "--data", "bundled:nope", "--out", tmp_path / "x"], "unknown bundled data set"),
        (["fit", "--data", "bundled:lfw", "--limit", "4", "--k", "2", "--out", tmp_path / "x"], "too few"),
        (["fit", "--store", store40, "--teacher", "bundled:dinov2-s", "--k", "2", "--out", tmp_path / "x"],
         "was made with tiny:dinov2"),
        (["fit", *TINY, "--store", store40, "--phases", "1-2/4", "--out", tmp_path / "x"], "phases must cover"),
        (["fit", *TINY, "--store", store40, "--k", "7", "--out", tmp_path / "x"], "--k must lie in 1..3"),
    ]
    for args, needle in cases:
        rc, err = cli(capsys, *args)
        assert rc == 2, (args, err)
        one_error_line(err, needle)
    assert not (tmp_path / "x").exists()


# ---- 8. file modes ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_outputs_get_umask_modes_not_0600(tmp_path, store40):
    r = raptor("fit", *TINY, "--store", store40, "--out", tmp_path / "fit", *FIT_FAST, umask=0o022)
    assert r.returncode == 0, r.stderr
    r = raptor("extract", *TINY, "--data", "bundled:lfw", "--limit", "8", "--out", tmp_path / "st", "--no-progress",
               umask=0o022)
    assert r.returncode == 0, r.stderr
    r = raptor("analyze", *TINY, "--store", tmp_path / "st", "--out", tmp_path / "an", "--no-progress", umask=0o022)
    assert r.returncode == 0, r.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"metrics.json", "model.safetensors", "config.yaml", "surrogate.json", "zarr.json",
            "analysis.json", "report.md", "optim.safetensors", "state.json"} & names >= {
        "metrics.json", "model.safetensors", "config.yaml", "zarr.json", "analysis.json", "report.md"}
    assert (tmp_path / "st" / "valid" / "c" / "0") in files and (tmp_path / "st" / "ids" / "zarr.json") in files
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


# ---- 10. two writers ----------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_and_a_crashed_one_does_not_block(tmp_path, capsys):
    out = tmp_path / "store"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from raptor.outputs import claim_output\n"
        "with claim_output(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)"), str(out)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for args in (["extract", *TINY, "--data", "bundled:lfw", "--limit", "8", "--out", out],
                     ["fit", *TINY, "--data", "bundled:lfw", "--limit", "40", "--out", out, *FIT_FAST],
                     ["analyze", *TINY, "--data", "bundled:lfw", "--limit", "8", "--out", out]):
            rc, err = cli(capsys, *args)
            assert rc == 2
            one_error_line(err, f"another raptor process (pid {holder.pid}) is writing to")
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock, the lock file stays behind
        holder.wait()
    assert (out / ".raptor.lock").exists()
    rc, err = cli(capsys, "extract", *TINY, "--data", "bundled:lfw", "--limit", "8", "--out", out, "--no-progress")
    assert rc == 0, err
    assert TrajectoryStore(out).complete and not (out / ".raptor.lock").exists()


# ---- 11. unreadable data -------------------------------------------------------------------------------------------

def _image_zoo(d: Path) -> dict[str, str]:
    """Files a real folder holds: broken ones and unusual but valid modes. Returns {name: expected outcome}."""
    from PIL import Image

    d.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    rgb.save(d / "ok.png")
    rgb.save(d / "full.jpg", quality=90)
    (d / "truncated.jpg").write_bytes((d / "full.jpg").read_bytes()[:300])
    (d / "zero.png").write_bytes(b"")
    (d / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((30, 30), 40000, np.uint16)).save(d / "grey16.png")
    p = Image.new("P", (30, 30))
    p.putpalette([0, 0, 255] * 256)
    p.save(d / "palette.png")
    Image.new("RGB", (300, 300), (10, 200, 30)).save(d / "large.png")
    return {"ok.png": "kept", "full.jpg": "kept", "truncated.jpg": "skipped", "zero.png": "skipped",
            "garbage.png": "skipped", "cmyk.jpg": "kept", "grey16.png": "kept", "palette.png": "kept",
            "large.png": "skipped"}


def test_broken_and_unusual_images_are_skipped_or_converted(tmp_path, monkeypatch):
    from PIL import Image

    from raptor.data import EvalTransform
    from raptor.data.sources import ImageLoadWarning

    expected = _image_zoo(tmp_path / "imgs")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300 * 300 // 3)  # "very large": PIL's decompression-bomb guard
    src = open_source(str(tmp_path / "imgs"))
    tf = EvalTransform.for_size(28)
    with pytest.warns(ImageLoadWarning) as caught:
        tensors, kept, skipped = load_images(src.items, tf)
    got = {it.id: ("kept" if i in kept else "skipped") for i, it in enumerate(src.items)}
    assert got == expected
    assert {m for w in caught for m in expected if m in str(w.message)} == {k for k, v in expected.items()
                                                                           if v == "skipped"}
    by_name = {src.items[i].id: t for i, t in zip(kept, tensors)}
    un = torch.tensor(tf.std).view(3, 1, 1) * 0 + 1
    to_byte = (lambda t: (t * torch.tensor(tf.std).view(3, 1, 1) + torch.tensor(tf.mean).view(3, 1, 1)) * 255 * un)
    assert torch.allclose(to_byte(by_name["grey16.png"]), torch.full((3, 28, 28), 40000 / 65535 * 255), atol=1.01)
    assert torch.allclose(to_byte(by_name["cmyk.jpg"])[:, 14, 14], torch.tensor([255.0, 0, 0]), atol=3)
    assert torch.allclose(to_byte(by_name["palette.png"])[:, 14, 14], torch.tensor([0.0, 0, 255]), atol=1)


def test_a_folder_of_only_broken_images_is_refused_and_leaves_no_store(tmp_path, capsys):
    d = tmp_path / "broken"
    d.mkdir()
    for i in range(5):
        (d / f"b{i}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    rc, err = cli(capsys, "extract", *TINY, "--data", d, "--out", tmp_path / "s", "--no-progress")
    assert rc == 2
    one_error_line(err, "none of the 5 images")
    assert not (tmp_path / "s").exists()


# ---- store integrity ---------------------------------------------------------------------------------------------

def _tampered(store: Path, dst: Path, change) -> Path:
    import shutil

    import zarr

    shutil.copytree(store, dst)
    g = zarr.open_group(str(dst), mode="r+")
    meta = dict(g.attrs["raptor"])
    change(meta)
    g.attrs["raptor"] = meta
    return dst


def test_damaged_mismatched_or_newer_stores_are_refused(tmp_path, store40, tiny, capsys):
    def version(m):
        m["version"] = 99

    def dtype(m):
        m["settings"] = {**m["settings"], "dtype": "float16"}

    def layers(m):
        m["settings"] = {**m["settings"], "layers": [0, 1, 2]}

    def teacher(m):
        m["settings"] = {**m["settings"], "teacher": "tiny:vit"}

    cases = [(version, "format version 99"), (dtype, "trajectories are float32"),
             (layers, "does not match its metadata")]
    for change, needle in cases:
        st = _tampered(store40, tmp_path / change.__name__, change)
        with pytest.raises(RaptorError, match=needle):
            TrajectoryStore(st)
        rc, err = cli(capsys, "info", st)
        assert rc == 2
        one_error_line(err, needle)
    st = _tampered(store40, tmp_path / "other_teacher", teacher)
    rc, err = cli(capsys, "fit", *TINY, "--store", st, "--out", tmp_path / "f", *FIT_FAST)
    assert rc == 2
    one_error_line(err, "was made with tiny:vit")
    # a store holding only some layers cannot train a surrogate
    sub = tmp_path / "sub"
    src = open_source("bundled:lfw")
    src.items = src.items[90:110]
    extract(tiny, src, sub, layers=[0, 1, 3], progress=False)
    rc, err = cli(capsys, "fit", *TINY, "--store", sub, "--out", tmp_path / "f", *FIT_FAST)
    assert rc == 2
    one_error_line(err, "every layer 0..3")
    # a store whose teacher has another width
    wide = _tampered(store40, tmp_path / "wide", lambda m: None)
    with pytest.raises(RaptorError, match="holds dim 32, the teacher has 64"):
        fake = type("T", (), {"spec": "tiny:dinov2", "dim": 64, "depth": 3, "layout": tiny.layout})()
        TrajectoryStore(wide).check_teacher(fake)


def test_tampered_checkpoint_is_refused_on_resume(tmp_path, store40, capsys):
    out = tmp_path / "run"
    rc, err = cli(capsys, "fit", *TINY, "--store", store40, "--out", out, *FIT_FAST)
    assert rc == 0, err
    ck = out / "checkpoints" / json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"]
    raw = bytearray((ck / "model.safetensors").read_bytes())
    raw[8:12] = b"[[[["
    (ck / "model.safetensors").write_bytes(bytes(raw))
    before = snapshot(out)
    # the finished run re-evaluates from its last checkpoint, which now fails to parse: refused, nothing lost
    rc, err = cli(capsys, "fit", *TINY, "--store", store40, "--out", out, *FIT_FAST, "--resume")
    assert rc == 2
    one_error_line(err, "is not a valid safetensors file")
    assert snapshot(out) == before
    (out / "checkpoints" / "latest.json").write_text("{oops")
    rc, err = cli(capsys, "fit", *TINY, "--store", store40, "--out", out, *FIT_FAST, "--resume")
    assert rc == 2
    one_error_line(err, "checkpoint pointer")


# ---- disk full and read-only outputs ------------------------------------------------------------------------------

EXTRACT = ["extract", *TINY, "--data", "bundled:lfw", "--chunk-images", "8", "--dtype", "float32",
           "--compression", "none", "--no-progress"]
_REFERENCES: dict[str, Path] = {}


def _reference(tmp_path_factory, args: list) -> Path:
    """The uninterrupted run of ``args`` (once per test session: several fault tests compare against it)."""
    key = json.dumps([str(a) for a in args])
    if key not in _REFERENCES:
        out = tmp_path_factory.mktemp("ref") / "out"
        r = raptor(*args, "--out", out)
        assert r.returncode == 0, r.stderr
        _REFERENCES[key] = out
    return _REFERENCES[key]


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["tmpfs", "injected"])
def test_disk_full_then_resume_with_space_equals_an_uninterrupted_store(tmp_path, tmp_path_factory, mechanism):
    """A real 256 KiB tmpfs where this machine lets us mount one (else the injected fault), and the injected fault
    (ENOSPC from the process's own writes once 256 KiB are written) everywhere."""
    ref = _reference(tmp_path_factory, EXTRACT)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    real = mechanism == "tmpfs" and try_mount_tmpfs(mnt, "256k")
    try:
        out = mnt / "store"
        r = raptor(*EXTRACT, "--out", out, prefix=None if real else faulty("full", mnt, 256 * 1024))
        assert r.returncode == 2, r.stderr
        one_error_line(r.stderr, "no space left on device")
        st = TrajectoryStore(out)
        assert not st.complete
        assert 0 < len(st.manifest["done"]) < 25
        if real:
            remount(mnt, "16m")
        r = raptor(*EXTRACT, "--out", out)
        assert r.returncode == 0, r.stderr
        a, b = TrajectoryStore(out), TrajectoryStore(ref)
        assert a.complete
        assert np.array_equal(np.asarray(a.array[:]), np.asarray(b.array[:]))
        assert np.array_equal(a.valid_indices, b.valid_indices)
    finally:
        if real:
            umount(mnt)


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["tmpfs", "injected"])
def test_read_only_output_is_one_line_and_leaves_nothing(tmp_path, mechanism):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    real = mechanism == "tmpfs" and try_mount_tmpfs(mnt, "1m", read_only=True)
    try:
        pre = None if real else faulty("readonly", mnt)
        for args in (EXTRACT + ["--limit", "8", "--out", mnt / "store"],
                     ["analyze", *TINY, "--data", "bundled:lfw", "--limit", "8", "--out", mnt / "an"],
                     ["fit", *TINY, "--data", "bundled:lfw", "--limit", "40", "--out", mnt / "fit", *FIT_FAST]):
            r = raptor(*args, prefix=pre)
            assert r.returncode == 2, r.stderr
            one_error_line(r.stderr, "read-only")
        assert list(mnt.iterdir()) == []
    finally:
        if real:
            umount(mnt)


# ---- SIGKILL at several points ------------------------------------------------------------------------------------

def _kill_when(cmd: list, ready, timeout: float = 120) -> None:
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while not ready():
            assert proc.poll() is None, "finished before the kill point: make the run longer"
            assert time.time() - t0 < timeout
            time.sleep(0.003)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()


def _chunks_done(out: Path) -> int:
    """Finished chunks of a store being written: one ``valid`` status chunk file each (written atomically, after
    the chunk's trajectories)."""
    try:
        return sum(p.name.isdigit() for p in (out / "valid" / "c").iterdir())
    except OSError:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("after_chunks", [0, 2, 9])
def test_sigkill_during_extraction_at_several_points(tmp_path, tmp_path_factory, after_chunks):
    args = ["extract", *TINY, "--data", "bundled:lfw", "--chunk-images", "8", "--image-size", "224",
            "--no-progress"]
    out, ref = tmp_path / "killed", _reference(tmp_path_factory, args)
    ready = (lambda: (out / "zarr.json").exists()) if after_chunks == 0 else (lambda: _chunks_done(out) >= after_chunks)
    _kill_when([sys.executable, "-m", "raptor.cli", *args, "--out", str(out)], ready)
    assert _chunks_done(out) < 25
    r = raptor(*args, "--out", out)
    assert r.returncode == 0, r.stderr
    a, b = TrajectoryStore(out), TrajectoryStore(ref)
    assert a.complete and np.array_equal(np.asarray(a.array[:]), np.asarray(b.array[:]))


def _checkpoint(out: Path) -> str:
    try:
        return json.loads((out / "checkpoints" / "latest.json").read_text())["checkpoint"]
    except (OSError, ValueError):
        return ""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["before any checkpoint", "stage 1 block 0", "stage 1 block 1", "stage 2"])
def test_sigkill_during_training_at_several_points(tmp_path, tmp_path_factory, store40, point):
    args = ["fit", *TINY, "--store", str(store40), "--k", "2", "--steps1", "60", "--steps2", "60",
            "--batch-size", "16", "--val-images", "5", "--probe-data", "none", "--no-progress", "--ckpt-every", "3"]
    out, ref = tmp_path / "killed", _reference(tmp_path_factory, args)
    prefix = {"stage 1 block 0": "item0-", "stage 1 block 1": "item1-", "stage 2": "item2-"}.get(point)
    if prefix is None:
        def ready():
            return (out / "config.yaml").exists()
    else:
        def ready():
            return _checkpoint(out).startswith(prefix)
    _kill_when([sys.executable, "-m", "raptor.cli", *args, "--out", str(out)], ready)
    assert not (out / "metrics.json").exists()
    r = raptor(*args, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    from safetensors.torch import load_file

    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- progress in logs ---------------------------------------------------------------------------------------------

def test_progress_prints_plain_lines_when_output_is_not_a_terminal(monkeypatch):
    import io

    from rich.console import Console

    import raptor.progress as progress

    log = io.StringIO()  # a log file: not a terminal
    monkeypatch.setattr(progress, "console", Console(file=log, stderr=True))
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    with progress.progress_bar(3, "validation (held-out R²)", "img") as bar:
        for _ in range(3):
            bar.advance(1)
    text = log.getvalue()
    assert "validation (held-out R²): 1/3 img" in text and "3/3 img" in text and "(done)" in text
