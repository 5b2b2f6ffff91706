"""Training losses on token tensors (..., T, D).

``mse``: mean squared error over all elements. ``cosine``: mean (1 - cos) over tokens -- the correct sign; the
official ``--cosine`` returned the mean cosine *similarity* as a loss, which training then minimises (a bug we do
not reproduce). ``mse+cosine``: 0.5 * mse + 0.5 * (1 - cos).

Group weights (cls, registers, patches): the loss is sum_g w_g * loss(group g), each group a mean (the paper's
"cls weighting"). Weights are used **as given**: a group absent from the layout (no registers) contributes nothing
and the others are *not* renormalised, so the cls : patch ratio is exactly the one asked for (0.45 : 0.45 stays
1 : 1, and the loss scale is 0.9 of a full weighting). :func:`effective_group_weights` reports what a layout gets.

Normalisation (``scale``): with per-layer statistics from the training set, each group's (or, unweighted, the
layer's) squared error is divided by that target's per-element variance (per-feature mean removed), so every
layer and group contributes on the same scale -- an MSE of 1 means "no better than the target's mean". Without it
(the paper's loss) the teacher's last layers dominate: on the bundled DINOv2-S layer 12's variance is ~100x layer
1-7's. The cosine part is scale-free and is not normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raptor.errors import RaptorError
from raptor.teachers.base import TokenLayout

KINDS = ("mse", "cosine", "mse+cosine")
GROUPS = ("cls", "registers", "patches")
NORMS = ("none", "layer")


def base_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(pred, target) / scale
    cos = 1 - F.cosine_similarity(pred, target, dim=-1).mean()
    if kind == "cosine":
        return cos
    if kind == "mse+cosine":
        return 0.5 * F.mse_loss(pred, target) / scale + 0.5 * cos
    raise RaptorError(f"unknown loss {kind!r} (use {', '.join(KINDS)})")


def image_level_loss(pred: torch.Tensor, target: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """1 - (image-level R^2 of the batch), differentiable: the squared error of each image's pooled summary
    [cls || mean patch] (mean patch alone without a cls token), divided by the batch's between-image variance of
    the target's summary (per-feature mean removed). The token loss can be low while every image's summary
    collapses to one point (a token R^2 near the per-position mean's); this term is 1 for that collapse and 0 for
    exact image-level features. ``pred``/``target``: (B, T, D), B >= 2."""
    parts_p, parts_t = [], []
    if layout.n_cls:
        parts_p.append(pred[:, 0])
        parts_t.append(target[:, 0])
    if layout.n_patches:
        parts_p.append(pred[:, layout.patches].mean(1))
        parts_t.append(target[:, layout.patches].mean(1))
    p, t = torch.cat(parts_p, -1).float(), torch.cat(parts_t, -1).float()
    between = (t - t.mean(0, keepdim=True)).pow(2).sum()
    return (p - t).pow(2).sum() / between.clamp_min(1e-12)


def effective_group_weights(layout: TokenLayout, weights: tuple[float, float, float] | None) -> dict | None:
    """The weights each present group actually gets (absent groups: 0, others as given)."""
    if weights is None:
        return None
    return {g: (float(w) if layout.group(g).stop > layout.group(g).start else 0.0) for w, g in zip(weights, GROUPS)}


def token_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, layout: TokenLayout,
               weights: tuple[float, float, float] | None = None, scale: dict | None = None) -> torch.Tensor:
    """``scale``: None, or {"all": v, "cls": v, "registers": v, "patches": v} variances of the target layer."""
    if weights is None:
        return base_loss(pred, target, kind, 1.0 if scale is None else scale["all"])
    terms = []
    for w, g in zip(weights, GROUPS):
        sl = layout.group(g)
        if w == 0 or sl.stop == sl.start:
            continue
        terms.append(w * base_loss(pred[..., sl, :], target[..., sl, :], kind, 1.0 if scale is None else scale[g]))
    if not terms:
        raise RaptorError("all loss weights are zero for this token layout")
    return sum(terms)


def parse_weights(text: str | None, name: str) -> tuple[float, float, float] | None:
    """Loss weights from the command line (``name``, e.g. ``--stage2-weights``): '0.45,0.10,0.45' (cls, registers,
    patches) or 'none' (no group weighting)."""
    if text is None or text.strip().lower() == "none":
        return None
    try:
        w = tuple(float(x) for x in text.split(","))
    except ValueError:
        w = ()
    if len(w) != 3 or any(x < 0 for x in w) or not sum(w) > 0:
        raise RaptorError(f"bad {name} {text!r}: three non-negative numbers cls,registers,patches, e.g. 0.45,0.1,0.45")
    return w
