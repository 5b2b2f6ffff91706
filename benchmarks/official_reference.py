"""A re-creation of the official Raptor block and training step, written the way the paper's code is
(docs/method.md §4 / §5): ``nn.MultiheadAttention``, an ``nn.Sequential`` MLP, a per-step Python loop.

It exists to test our block against (parity) and to benchmark our training step against, side by side. It is not
used for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def forward(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        return F.silu(x1) * x2


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class OfficialBlock(nn.Module):
    def __init__(self, dim=768, num_heads=12, mlp_ratio=4.0, init_values=1e-5, t_scale=True, swiglu=True):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ls1 = LayerScale(dim, init_values)
        self.norm2 = nn.LayerNorm(dim)
        if swiglu:
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * hidden), SwiGLU(), nn.Linear(hidden, dim))
        else:
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.ls2 = LayerScale(dim, init_values)
        self.t_scale = t_scale
        if t_scale:
            self.t_proj = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, 3 * dim))
            nn.init.normal_(self.t_proj[2].weight, std=1e-4)
            nn.init.normal_(self.t_proj[2].bias, std=1e-4)

    def forward(self, x, t):
        if self.t_scale:
            tt = torch.full((x.shape[0], 1), float(t), device=x.device, dtype=x.dtype)
            t1, t2, t3 = (self.t_proj(tt) + 1).unsqueeze(1).chunk(3, dim=-1)
            x_n = self.norm1(x)
            x = x + t1 * self.ls1(self.attn(x_n, x_n, x_n, need_weights=False)[0])
            x = x + t2 * self.ls2(self.mlp(self.norm2(x)))
            return t3 * x
        x_n = self.norm1(x)
        x = x + self.ls1(self.attn(x_n, x_n, x_n, need_weights=False)[0])
        return x + self.ls2(self.mlp(self.norm2(x)))


class OfficialRaptor(nn.Module):
    """``Raptor(blocks, thresholds)``: output layer t uses blocks[i] for the first i with t <= thresholds[i]."""

    def __init__(self, blocks, thresholds):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.thresholds = list(thresholds)

    def block_for(self, t):
        for i, th in enumerate(self.thresholds):
            if t <= th:
                return self.blocks[i]
        return self.blocks[-1]

    def forward(self, x, start, end):
        outs = []
        for t in range(start + 1, end + 1):
            x = self.block_for(t)(x, t)
            outs.append(x)
        return outs


def official_autoreg_step(model: OfficialRaptor, opt, traj: torch.Tensor, clip: float = 1.0) -> float:
    """One stage-2 autoregressive step as in the official trainer: MSE averaged over steps, AdamW, grad clip."""
    L = traj.shape[1] - 1
    outs = model(traj[:, 0], 0, L)
    loss = sum(F.mse_loss(o, traj[:, t + 1]) for t, o in enumerate(outs)) / L
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.item()
