"""The Raptor block (docs/method.md §4): pre-norm attention + MLP (SwiGLU or GELU), LayerScale, depth conditioning.

Depth conditioning ("t_scale"): a small MLP of the raw output-layer index t (1..L, as a float) gives three gates
(attention branch, MLP branch, block output), shifted by +1 and initialised near 1 (last layer weights and bias
~ N(0, 1e-4))::

    x = x + g1 * ls1(attn(norm1(x)))
    x = x + g2 * ls2(mlp(norm2(x)))
    return g3 * x

Attention uses PyTorch's scaled-dot-product attention with a fused qkv projection in ``nn.MultiheadAttention``'s
layout ([q; k; v] rows), so an official block's state dict converts by renaming (:func:`from_official_state_dict`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raptor.errors import RaptorError


@dataclass
class BlockConfig:
    dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    swiglu: bool = True
    t_scale: bool = True
    init_values: float = 1e-5
    t_hidden: int = 16
    ln_eps: float = 1e-5  # nn.LayerNorm's default, as in the official block

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise RaptorError(f"dim {self.dim} is not divisible by {self.num_heads} heads")

    @property
    def hidden(self) -> int:
        return int(self.dim * self.mlp_ratio)


class RaptorBlock(nn.Module):
    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.cfg = cfg
        d, h = cfg.dim, cfg.hidden
        self.norm1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ls1 = nn.Parameter(torch.full((d,), cfg.init_values))
        self.norm2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(d, 2 * h if cfg.swiglu else h)
        self.fc2 = nn.Linear(h, d)
        self.ls2 = nn.Parameter(torch.full((d,), cfg.init_values))
        if cfg.t_scale:
            self.t_proj = nn.Sequential(nn.Linear(1, cfg.t_hidden), nn.SiLU(), nn.Linear(cfg.t_hidden, 3 * d))
            nn.init.normal_(self.t_proj[2].weight, std=1e-4)
            nn.init.normal_(self.t_proj[2].bias, std=1e-4)
        # nn.MultiheadAttention's initialisation for the fused projection
        nn.init.xavier_uniform_(self.qkv.weight)
        nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)

    def gates(self, t: float | torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """The three depth gates for output layer t, always computed in float32: under bf16 autocast ``1 + small``
        would round to {0.9961, 1.0, 1.0078}, so training (autocast) and evaluation (fp32) would see different
        gates."""
        if not self.cfg.t_scale:
            return None
        w = self.t_proj[0].weight
        if isinstance(t, torch.Tensor):  # the model passes t as a tensor: no host copy, no recompile per t
            tt = t.to(dtype=w.dtype, device=w.device).reshape(1, 1)
        else:  # a Python number: a fill kernel on the device, not a copy from pageable host memory (a sync)
            tt = torch.full((1, 1), float(t), dtype=w.dtype, device=w.device)
        plain = torch.autocast(device_type=w.device.type, enabled=False) if w.device.type in ("cpu", "cuda") \
            else contextlib.nullcontext()  # (the meta device of the device-path tests has no autocast)
        with plain:
            g = self.t_proj(tt).float().reshape(3, -1) + 1.0
        return g[0], g[1], g[2]

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        H = self.cfg.num_heads
        q, k, v = self.qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(B, N, D))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.cfg.swiglu:
            x1, x2 = h.chunk(2, dim=-1)
            h = F.silu(x1) * x2
        else:
            h = F.gelu(h)
        return self.fc2(h)

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        g = self.gates(t)
        a = self.ls1 * self.attention(self.norm1(x))
        if g is None:
            x = x + a
            return x + self.ls2 * self.mlp(self.norm2(x))
        x = x + g[0] * a
        x = x + g[1] * (self.ls2 * self.mlp(self.norm2(x)))
        return g[2] * x


_OFFICIAL = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "attn.in_proj_weight": "qkv.weight", "attn.in_proj_bias": "qkv.bias",
    "attn.out_proj.weight": "proj.weight", "attn.out_proj.bias": "proj.bias",
    "ls1.gamma": "ls1", "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.0.weight": "fc1.weight", "mlp.0.bias": "fc1.bias", "mlp.2.weight": "fc2.weight", "mlp.2.bias": "fc2.bias",
    "ls2.gamma": "ls2",
    "t_proj.0.weight": "t_proj.0.weight", "t_proj.0.bias": "t_proj.0.bias",
    "t_proj.2.weight": "t_proj.2.weight", "t_proj.2.bias": "t_proj.2.bias",
}


def official_block_config(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> BlockConfig:
    """Infer the block configuration from an official block state dict (heads: dim/64 unless given)."""
    try:
        d = sd["norm1.weight"].shape[0]
        fc1_out, fc2_in = sd["mlp.0.weight"].shape[0], sd["mlp.2.weight"].shape[1]
    except KeyError as e:
        raise RaptorError(f"not an official Raptor block state dict (missing {e})") from None
    swiglu = fc1_out == 2 * fc2_in
    t_scale = "t_proj.0.weight" in sd
    return BlockConfig(dim=d, num_heads=num_heads or max(1, d // 64), mlp_ratio=fc2_in / d, swiglu=swiglu,
                       t_scale=t_scale, t_hidden=sd["t_proj.0.weight"].shape[0] if t_scale else 16)


def from_official_state_dict(sd: dict[str, torch.Tensor], num_heads: int | None = None) -> RaptorBlock:
    """A :class:`RaptorBlock` with the weights of a block trained with the paper's code (``raptor/block.py``)."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    cfg = official_block_config(sd, num_heads)
    blk = RaptorBlock(cfg)
    ours = {}
    for k, v in sd.items():
        if k not in _OFFICIAL:
            raise RaptorError(f"unexpected key in official block state dict: {k}")
        ours[_OFFICIAL[k]] = v
    missing, unexpected = blk.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise RaptorError(f"official block state dict incomplete: missing {missing}")
    return blk


def to_official_state_dict(blk: RaptorBlock) -> dict[str, torch.Tensor]:
    inv = {v: k for k, v in _OFFICIAL.items()}
    return {inv[k]: v.detach().clone() for k, v in blk.state_dict().items()}
