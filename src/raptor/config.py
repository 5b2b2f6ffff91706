"""Typed configs: dataclasses round-tripped to YAML and written beside every output."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, TypeVar

import yaml

from raptor.errors import RaptorError

T = TypeVar("T")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# read once, at import (in the main thread): os.umask can only be read by setting it, which is not thread-safe
FILE_MODE = 0o666 & ~_umask()


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as plain YAML/JSON-safe data (tuples become lists, paths become strings)."""

    def clean(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return {k: clean(v) for k, v in dataclasses.asdict(cfg).items()}


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build a dataclass from a dict, refusing unknown keys (typos should not pass silently)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - names
    if unknown:
        raise RaptorError(f"unknown config keys for {cls.__name__}: {sorted(unknown)}")
    kwargs = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in data:
            v = data[f.name]
            if isinstance(v, list) and "tuple" in str(f.type):
                v = tuple(v)
            kwargs[f.name] = v
    return cls(**kwargs)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file so that readers never see a partial version (write to a temp file, then rename).

    The file gets the mode a plain ``open(path, "w")`` would give it (0644 under umask 022), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write a dataclass config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    with open(path) as f:
        return from_dict(cls, yaml.safe_load(f) or {})
