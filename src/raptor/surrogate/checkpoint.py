"""Checkpoints: safetensors for model and optimizer tensors + JSON for everything else. Never pickles.

A checkpoint is a directory written under a temporary name and renamed into place; ``latest.json`` (replaced
atomically) then points at it, and only after that are older checkpoints removed. A crash at any moment leaves the
previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from raptor.config import FILE_MODE, atomic_write_text
from raptor.errors import RaptorError


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors file with the umask-derived mode (safetensors itself creates files 0600)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    os.chmod(path, FILE_MODE)


def save_checkpoint(root: Path, name: str, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    state: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_tensors(model.state_dict(), tmp / "model.safetensors")
    meta = {}
    if opt is not None:
        tensors, meta = optimizer_tensors(opt)
        save_tensors(tensors, tmp / "optim.safetensors")
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": meta}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / "latest.json", json.dumps({"checkpoint": name}))
    for old in root.iterdir():
        if old.is_dir() and old.name != name and not old.name.startswith(".tmp-"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    p = root / "latest.json"
    if not p.is_file():
        return None
    try:
        d = root / str(json.loads(p.read_text())["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RaptorError(f"checkpoint pointer {p} is damaged ({type(e).__name__}); delete the run or restore it") \
            from None
    if d.parent != root or not (d / "state.json").is_file():
        raise RaptorError(f"checkpoint pointer {p} names a missing checkpoint {d}")
    return d


def load_tensors(path: Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """A safetensors file, or one ``error:`` line when it is missing, truncated or its header was tampered with
    (safetensors never executes anything: a bad file can only fail to parse)."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise RaptorError(f"{what} file not found: {path}") from None
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends
        raise RaptorError(f"{path} is not a valid safetensors file ({str(e).splitlines()[0][:160]})") from None


def read_checkpoint(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict]:
    model = load_tensors(d / "model.safetensors", "checkpoint")
    optim = load_tensors(d / "optim.safetensors", "checkpoint") if (d / "optim.safetensors").is_file() else None
    try:
        state = json.loads((d / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise RaptorError(f"checkpoint {d} is damaged: state.json ({e})") from None
    return model, optim, state
