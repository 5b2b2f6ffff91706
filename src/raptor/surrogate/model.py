"""Raptor surrogate: k tied, depth-conditioned blocks applied recurrently over phases of depth.

Phases are lists of *output* layers (1..L): block b produces every layer in ``phases[b]`` from the layer before,
with t = the output layer index. Any k and unequal phases are allowed, and phases need not be contiguous (e.g.
odd and even layers, ``1,3,5/2,4,6``: the paper's shuffled-partition control); a phase's maximal contiguous
stretches of layers are its *runs*. Splicing runs teacher layers 0..i, the
surrogate i..j and the teacher j..L, then the teacher's final norm and head.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from raptor.errors import RaptorError
from raptor.phases import is_contiguous, phase_runs, validate_phases
from raptor.surrogate.block import BlockConfig, RaptorBlock
from raptor.teachers.names import current_names


@dataclass
class SurrogateConfig:
    phases: list[list[int]]
    block: BlockConfig

    @property
    def depth(self) -> int:
        return max(p[-1] for p in self.phases)

    @property
    def contiguous(self) -> bool:
        """Every phase one stretch of consecutive layers (one run per block)."""

        return is_contiguous(self.phases)

    @property
    def segments(self) -> list[tuple[int, int]]:
        """Teacher-layer span (start, end) per block: block b's layers lie in start+1..end (with contiguous phases it
        maps layer start -> ... -> end; otherwise the span also holds other blocks' layers)."""
        return [(p[0] - 1, p[-1]) for p in self.phases]

    @property
    def runs(self) -> list[tuple[int, int, int]]:
        """(start, end, block) per maximal stretch of one block's layers, in depth order (see :func:`phase_runs`)."""
        return phase_runs(self.phases)

    def to_dict(self) -> dict:
        return {"phases": self.phases, "block": asdict(self.block)}

    @classmethod
    def from_dict(cls, d: dict) -> "SurrogateConfig":
        return cls([list(p) for p in d["phases"]], BlockConfig(**d["block"]))


class RaptorModel(nn.Module):
    """k tied, depth-conditioned blocks over the phases of ``cfg``. ``teacher_spec`` and ``fit_metrics`` say
    what it was fit on and how well (set by ``raptor.fit``, :class:`~raptor.surrogate.run_dir.FitRun` and
    :meth:`from_pretrained`); :meth:`save_pretrained` / :meth:`from_pretrained` / :meth:`push_to_hub` share it
    (:mod:`raptor.surrogate.hub`)."""

    teacher_spec: str | None = None
    fit_metrics: dict | None = None

    def __init__(self, cfg: SurrogateConfig):
        super().__init__()
        validate_phases(cfg.phases, cfg.depth)
        self.cfg = cfg
        self.blocks = nn.ModuleList([RaptorBlock(cfg.block) for _ in cfg.phases])
        self.block_of = {t: b for b, p in enumerate(cfg.phases) for t in p}
        # the depth index t of each layer as a tensor on the model's device: blocks get t without a host-to-device
        # copy (a sync per block call on a GPU) and a compiled block does not recompile for every t
        self.register_buffer("depth_index", torch.arange(cfg.depth + 1, dtype=torch.float32), persistent=False)

    def t(self, layer: int) -> torch.Tensor:
        """Layer index ``layer`` as a one-element tensor on the model's device (a view, no copy)."""
        return self.depth_index[layer:layer + 1]

    @property
    def depth(self) -> int:
        return self.cfg.depth

    def step(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Produce layer t from layer t-1."""
        return self.blocks[self.block_of[t]](x, self.t(t))

    def forward(self, x: torch.Tensor, start: int = 0, end: int | None = None, noise: float = 0.0,
                generator: torch.Generator | None = None, share: tuple[int, int] = (0, 1)) -> list[torch.Tensor]:
        """Roll out from layer ``start`` to ``end`` on its own predictions; returns [layer start+1, ..., end].
        ``share`` = (rank, world): ``x`` is rank's share of a batch ``world`` times larger; the input noise is drawn
        for the whole batch and sliced, so it equals a 1-process run's."""
        end = self.depth if end is None else end
        if not 0 <= start <= end <= self.depth:
            raise RaptorError(f"bad rollout range {start}..{end} (depth {self.depth})")
        outs = []
        for t in range(start + 1, end + 1):
            if noise > 0:
                x = x + noise * share_noise(x, generator, share)
            x = self.step(x, t)
            outs.append(x)
        return outs

    def save_pretrained(self, directory) -> "Path":
        """Write this surrogate as a shared folder (surrogate.json, model.safetensors, metrics.json, a model card)
        that ``from_pretrained``, ``FitRun`` and ``hf-raptor:`` backbones read."""
        from raptor.surrogate import hub

        return hub.save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, name, *, revision: str | None = None, token=None) -> "RaptorModel":
        """A shared surrogate from a folder (``save_pretrained``'s or a finished fit run) or a Hub repo id."""
        from raptor.surrogate import hub

        return hub.from_pretrained(name, revision=revision, token=token)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token=None) -> str:
        """Upload this surrogate to the Hub model repo ``repo_id``; returns the commit URL."""
        from raptor.surrogate import hub

        return hub.push_to_hub(self, repo_id, private=private, token=token)

    @torch.no_grad()
    def splice(self, teacher, layer0_or_images: torch.Tensor, i: int, j: int, from_images: bool = True):
        """Teacher 0..i, surrogate i..j, teacher j..L; returns layer-L tokens (before the final norm)."""
        if not 0 <= i <= j <= self.depth:
            raise RaptorError(f"bad splice range {i}..{j}")
        x = teacher.embed(layer0_or_images) if from_images else layer0_or_images
        x = teacher.run_blocks(x, 0, i)
        if j > i:
            x = self.forward(x, i, j)[-1]
        return teacher.run_blocks(x, j, teacher.depth)


def init_from_teacher(model: RaptorModel, teacher) -> list[int]:
    """Initialise each phase block from the middle teacher block of its phase (DINOv2 family; GELU blocks).

    Beyond the paper (which starts from random blocks). Returns the teacher block index used per phase.
    """
    if model.cfg.block.swiglu:
        raise RaptorError("--init-from-teacher needs GELU blocks (--mlp gelu): DINOv2 S/B/L blocks use a GELU MLP")
    used = []
    for b, phase in enumerate(model.cfg.phases):
        tb = teacher.blocks[phase[len(phase) // 2] - 1]
        blk = model.blocks[b]

        names = current_names(dict(tb.named_parameters()))
        if "attention.q_proj.weight" not in names or "mlp.fc1.weight" not in names:
            raise RaptorError("--init-from-teacher supports DINOv2-family teachers only")
        if names["mlp.fc1.weight"].shape != blk.fc1.weight.shape:
            raise RaptorError("teacher MLP width differs from the surrogate's (set --mlp-ratio to the teacher's)")
        with torch.no_grad():
            blk.norm1.load_state_dict(tb.norm1.state_dict())
            blk.norm2.load_state_dict(tb.norm2.state_dict())
            blk.qkv.weight.copy_(torch.cat([names[f"attention.{n}_proj.weight"] for n in "qkv"]))
            blk.qkv.bias.copy_(torch.cat([names[f"attention.{n}_proj.bias"] for n in "qkv"]))
            blk.proj.weight.copy_(names["attention.o_proj.weight"])
            blk.proj.bias.copy_(names["attention.o_proj.bias"])
            blk.fc1.load_state_dict(tb.mlp.fc1.state_dict())
            blk.fc2.load_state_dict(tb.mlp.fc2.state_dict())
            blk.ls1.copy_(names["layer_scale1.lambda1"])
            blk.ls2.copy_(names["layer_scale2.lambda1"])
        blk.norm1.eps = blk.norm2.eps = tb.norm1.eps
        used.append(phase[len(phase) // 2] - 1)
    return used


def share_noise(x: torch.Tensor, generator: torch.Generator | None, share: tuple[int, int] = (0, 1),
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, the rows ``share`` = (rank, world) would get of the noise of the
    whole batch, drawn on the generator's device (the training loop's generator lives on the training device, so
    on a GPU the draw is a kernel, not a CPU loop and a copy): a function of the generator's seed alone, whatever
    the number of ranks, on a given kind of device."""
    rank, world = share
    n = x.shape[0]
    where = generator.device if generator is not None else x.device
    z = torch.randn((n * world,) + tuple(x.shape[1:]), generator=generator, dtype=dtype or x.dtype, device=where)
    return z[rank * n:(rank + 1) * n].to(x.device)
