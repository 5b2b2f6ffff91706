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

from raptor.config import atomic_write_text
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


def save_checkpoint(root: Path, name: str, model: torch.nn.Module, opt: torch.optim.Optimizer | None,
                    state: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    meta = {}
    if opt is not None:
        tensors, meta = optimizer_tensors(opt)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "optim.safetensors"))
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
    d = root / json.loads(p.read_text())["checkpoint"]
    if not (d / "state.json").is_file():
        raise RaptorError(f"checkpoint pointer {p} names a missing checkpoint {d}")
    return d


def read_checkpoint(d: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict]:
    model = load_file(str(d / "model.safetensors"))
    optim = load_file(str(d / "optim.safetensors")) if (d / "optim.safetensors").is_file() else None
    state = json.loads((d / "state.json").read_text())
    return model, optim, state
