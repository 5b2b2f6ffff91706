"""A planted block-recurrent teacher: a control whose depth *is* k tied Raptor blocks.

``planted:<k>[,depth=L][,ends=a/b/...][,gain=g][,seed=s][,base=<teacher spec>]`` takes the embedding (layer 0),
final norm, token layout and image statistics of a real base teacher (default ``bundled:dinov2-s``) and replaces
its blocks by k randomly initialised :class:`~raptor.surrogate.block.RaptorBlock` s (the surrogate's own block
configuration: dim, dim/64 heads, SwiGLU, depth gates), applied recurrently over contiguous phases: layer t is
produced by the block of t's phase with depth index t. ``ends`` gives the last layer of each phase (default: k
equal phases of the base depth, or of ``depth``). ``gain`` sets the blocks' LayerScale so that each branch adds
``gain`` x the RMS of the layer-0 tokens (default 0.3: every layer moves the tokens visibly; a fresh Raptor block
starts at 1e-5); the depth gates vary mildly with t.
``base`` must come last (its spec may contain commas).

A surrogate with the same phases can represent this teacher exactly, so it separates "the trainer cannot learn"
from "the teacher is not block-recurrent": the planted-recurrence test recovers it to held-out R^2 >= 0.95, and
docs/surrogate.md trains one on the same budget as the real runs.
"""

from __future__ import annotations

import torch
from torch import nn

from raptor.errors import RaptorError
from raptor.phases import equal_phases, validate_phases
from raptor.surrogate.block import BlockConfig, RaptorBlock
from raptor.teachers import load_teacher
from raptor.teachers.base import Teacher

USAGE = "planted:<k>[,depth=L][,ends=a/b/..][,gain=g][,seed=s][,base=<teacher spec>]"


class _PlantedLayer(nn.Module):
    def __init__(self, block: nn.Module, t: int):
        super().__init__()
        self.block, self.t = block, t

    def forward(self, x: torch.Tensor, *_):
        return self.block(x, self.t)


class PlantedTeacher(Teacher):
    family = "planted"

    def __init__(self, base: Teacher, phases: list[list[int]], gain: float, seed: int, spec: str):
        cfg = BlockConfig(dim=base.dim, num_heads=max(1, base.dim // 64))
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            tied = []
            for _ in phases:
                blk = RaptorBlock(cfg)
                nn.init.normal_(blk.t_proj[2].weight, std=0.005)
                nn.init.normal_(blk.t_proj[2].bias, std=0.005)
                tied.append(blk)
            # calibrate: each branch adds `gain` x the RMS of layer-0 tokens (measured on seeded noise images)
            with torch.no_grad():
                size = base.default_image_size
                x0 = base.embed(torch.randn(4, 3, size, size))
                rms = x0.pow(2).mean().sqrt()
                for blk in tied:
                    blk.ls1.fill_(1.0)
                    blk.ls2.fill_(1.0)
                    r_att = blk.attention(blk.norm1(x0)).pow(2).mean().sqrt()
                    r_mlp = blk.mlp(blk.norm2(x0)).pow(2).mean().sqrt()
                    blk.ls1.fill_(float(gain * rms / r_att))
                    blk.ls2.fill_(float(gain * rms / r_mlp))
        layers = [_PlantedLayer(tied[b], t) for b, p in enumerate(phases) for t in p]
        super().__init__(blocks=layers, final_norm=base.final_norm, n_cls=base.n_cls, n_registers=base.n_registers,
                         patch_size=base.patch_size, dim=base.dim, image_mean=base.image_mean,
                         image_std=base.image_std, default_image_size=base.default_image_size)
        self.base = base
        self.phases = phases
        self.tied = nn.ModuleList(tied)
        self.spec = spec
        self.display_name = f"planted k={len(phases)} ({'/'.join(f'{p[0]}-{p[-1]}' for p in phases)}) " \
                            f"on {base.display_name}"
        self.requires_grad_(False)
        self.eval()

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.embed(images)

    def describe(self) -> dict:
        d = super().describe()
        d["planted_phases"] = self.phases
        return d


def parse_planted(target: str) -> dict:
    head, sep, base = target.partition(",base=")
    parts = head.split(",")
    try:
        out = {"k": int(parts[0]), "base": base if sep else "bundled:dinov2-s", "depth": None, "ends": None,
               "gain": 0.3, "seed": 0}
        for p in parts[1:]:
            key, eq, val = p.partition("=")
            if not eq or key not in ("depth", "ends", "gain", "seed"):
                raise ValueError(p)
            out[key] = [int(x) for x in val.split("/")] if key == "ends" else (float(val) if key == "gain"
                                                                                  else int(val))
    except ValueError:
        raise RaptorError(f"bad planted teacher spec 'planted:{target}': use {USAGE}") from None
    if sep and not base:
        raise RaptorError(f"bad planted teacher spec 'planted:{target}': empty base")
    return out


def load_planted_teacher(target: str, spec: str) -> PlantedTeacher:
    o = parse_planted(target)
    if o["k"] < 1:
        raise RaptorError(f"planted teacher needs k >= 1 blocks, got {o['k']} ({USAGE})")
    if o["base"].startswith("planted:"):
        raise RaptorError("a planted teacher's base cannot itself be planted")
    base = load_teacher(o["base"])
    depth = o["depth"] or base.depth
    if o["ends"]:
        ends = o["ends"]
        if len(ends) != o["k"] or ends[-1] != depth or sorted(set(ends)) != ends or ends[0] < 1:
            raise RaptorError(f"planted ends {ends} must be {o['k']} increasing phase ends finishing at depth {depth}")
        phases = validate_phases([list(range(a + 1, b + 1)) for a, b in zip([0] + ends[:-1], ends)], depth)
    else:
        phases = equal_phases(depth, o["k"])
    if not o["gain"] > 0:
        raise RaptorError(f"planted gain must be > 0, got {o['gain']}")
    return PlantedTeacher(base, phases, o["gain"], o["seed"], spec)
