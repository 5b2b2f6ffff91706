"""Declared dependency floors are the tested ones, and an unsupported version is one clear error, not a wrong
result."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

import raptor.versions as versions
from clirun import one_error_line
from raptor.cli import run
from raptor.errors import RaptorError

ROOT = Path(__file__).resolve().parents[1]


def _floors() -> dict[str, str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for d in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9.]+)", d.replace(" ", ""))
        assert m, f"dependency {d!r} must declare a floor (name>=version), the version CI tests"
        out[m.group(1).lower()] = m.group(2)
    return out


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints-floor.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, ver = line.partition("==")
            pins[name.lower()] = ver
    return pins


def test_every_declared_floor_is_installed_by_the_floor_leg():
    """pyproject.toml's floors and constraints-floor.txt (what `make test-floor` installs) name the same versions,
    so a declared floor is always a tested one."""
    floors, pins = _floors(), _pins()
    assert set(floors) == set(pins), (sorted(floors), sorted(pins))
    for name, floor in floors.items():
        assert versions._release(pins[name])[:len(versions._release(floor))] == versions._release(floor), \
            (name, floor, pins[name])
    for name, need in versions.MIN_VERSIONS.items():  # the run-time checks agree with the declaration
        assert versions._release(need)[:2] == versions._release(floors[name])[:2], (name, need, floors[name])


@pytest.mark.parametrize("text,release", [("5.0.0", (5, 0, 0)), ("4.46.3", (4, 46, 3)), ("5.1.0rc1", (5, 1, 0)),
                                          ("3.1.0.dev2+g1234", (3, 1, 0)), ("2.13.0+cpu", (2, 13, 0))])
def test_release_parsing(text, release):
    assert versions._release(text) == release


def test_old_transformers_and_zarr_are_refused():
    with pytest.raises(RaptorError, match=r"transformers 4\.46\.3 is not supported.*transformers>=5"):
        versions.require("transformers", "4.46.3")
    with pytest.raises(RaptorError, match=r"zarr 3\.0\.8 is not supported"):
        versions.require("zarr", "3.0.8")
    versions.require("transformers", "5.0.0")
    versions.require("zarr", "3.1.1")
    versions.require("transformers")  # the installed ones pass


def test_cli_with_transformers_4_is_one_error_line(monkeypatch, capsys, tmp_path):
    """With transformers 4.x installed, a command that loads a teacher stops with one line naming the fix (4.x
    layers return tuples and name their weights differently: it would load wrongly, not fail)."""
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda p: "4.46.3" if p == "transformers" else real(p))
    for argv in (["analyze", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--limit", "4"],
                 ["extract", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--limit", "4"]):
        capsys.readouterr()
        assert run([*argv, "--out", str(tmp_path / argv[0]), "--no-progress"]) == 2
        one_error_line(capsys.readouterr().err, "transformers 4.46.3 is not supported")
        assert not (tmp_path / argv[0]).exists()


def test_cli_with_old_zarr_is_one_error_line(monkeypatch, capsys, tmp_path):
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda p: "3.0.8" if p == "zarr" else real(p))
    capsys.readouterr()
    assert run(["extract", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--limit", "4", "--out",
                str(tmp_path / "s"), "--no-progress"]) == 2
    one_error_line(capsys.readouterr().err, "zarr 3.0.8 is not supported")
    assert run(["info", str(tmp_path)]) == 2
