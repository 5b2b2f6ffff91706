"""Training losses on token tensors (..., T, D).

``mse``: mean squared error over all elements. ``cosine``: mean (1 - cos) over tokens -- the correct sign; the
official ``--cosine`` returned the mean cosine *similarity* as a loss, which training then minimises (a bug we do
not reproduce). ``mse+cosine``: 0.5 * mse + 0.5 * (1 - cos). With group ``weights`` (cls, registers, patches) the
loss is sum_g w_g * loss(group g), each group a mean (the paper's "cls weighting"); groups absent from the layout
drop out and the remaining weights are renormalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raptor.errors import RaptorError
from raptor.teachers.base import TokenLayout

KINDS = ("mse", "cosine", "mse+cosine")


def base_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(pred, target)
    cos = 1 - F.cosine_similarity(pred, target, dim=-1).mean()
    if kind == "cosine":
        return cos
    if kind == "mse+cosine":
        return 0.5 * F.mse_loss(pred, target) + 0.5 * cos
    raise RaptorError(f"unknown loss {kind!r} (use {', '.join(KINDS)})")


def token_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, layout: TokenLayout,
               weights: tuple[float, float, float] | None = None) -> torch.Tensor:
    if weights is None:
        return base_loss(pred, target, kind)
    terms, total_w = [], 0.0
    for w, g in zip(weights, ("cls", "registers", "patches")):
        sl = layout.group(g)
        if w == 0 or sl.stop == sl.start:
            continue
        terms.append(w * base_loss(pred[..., sl, :], target[..., sl, :], kind))
        total_w += w
    if not terms:
        raise RaptorError("all loss weights are zero for this token layout")
    return sum(terms) / total_w
