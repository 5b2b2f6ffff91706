"""Linear probe heads trained as a **grid**: one head per learning rate, all fed the same batches in one pass
(DINOv2's own linear eval does this), plus the losses and metrics of the paper's three protocols (docs/method.md §7).

- ``cls``: [cls || mean patch] -> Linear -> classes; cross-entropy; top-1 accuracy.
- ``seg``: patch tokens -> Linear -> classes on the patch grid, bilinear upsampling to the input resolution,
  cropped to the target; cross-entropy ignoring 255; mIoU from a confusion matrix (mean over the classes that occur
  in the target or the prediction of the split: a class absent from both has no IoU).
- ``depth``: [patch || cls] -> 1x1 conv -> 256 bins over the depth range on the patch grid, bilinear x4,
  depth = softmax-weighted bin centres, bilinearly resized to the input resolution and cropped to the target;
  loss 10 * SI-log(lambda 0.85) + cross-entropy on the bins (targets nearest-resized to the x4 grid, invalid pixels
  ignored); RMSE in metres over valid pixels (inside the Eigen crop for NYUd). The 1x1 conv is applied before the
  x4 upsampling rather than after (the official order): both are linear and bilinear weights sum to 1, so the
  logits are identical (tested) at 1/16 of the cost.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raptor.probes.data import IGNORE
from raptor.probes.data.readers import EIGEN_CROP

N_BINS = 256
SI_LAMBDA, SI_WEIGHT = 0.85, 10.0


def _param(shape, gen: torch.Generator, std: float = 0.01) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, generator=gen) * std)


class GridHead(nn.Module):
    """``n`` independent linear maps ``in_dim -> out_dim`` (weights N(0, 0.01^2), bias 0)."""

    def __init__(self, n: int, in_dim: int, out_dim: int, gen: torch.Generator):
        super().__init__()
        self.weights = nn.ParameterList([_param((in_dim, out_dim), gen) for _ in range(n)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(out_dim)) for _ in range(n)])

    def __len__(self) -> int:
        return len(self.weights)

    def init_from(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Start every head from a given linear map (``weight``: out x in, as nn.Linear stores it)."""
        with torch.no_grad():
            for w, b in zip(self.weights, self.biases):
                w.copy_(weight.t())
                b.copy_(bias)

    def param_groups(self, lrs) -> list[dict]:
        return [{"params": [w, b], "lr": lr} for w, b, lr in zip(self.weights, self.biases, lrs)]

    def all(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in) -> (G, B, out): every head at once."""
        return torch.einsum("bi,gio->gbo", x, torch.stack(list(self.weights))) + torch.stack(list(self.biases))[:, None]

    def one(self, g: int, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) for head ``g``."""
        return x @ self.weights[g] + self.biases[g]


# ---- dense geometry ---------------------------------------------------------------------------------------------

def to_target(maps: torch.Tensor, padded: tuple[int, int], pad: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) maps -> bilinear to the (padded) input resolution ``padded`` -> cropped to the target (H, W)."""
    up = F.interpolate(maps, size=padded, mode="bilinear", align_corners=False)
    return up[..., pad[0]:pad[0] + hw[0], pad[1]:pad[1] + hw[1]]


def seg_logits(head: GridHead, g: int, patches: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw, D) -> (B, C, gh, gw)."""
    return head.one(g, patches).permute(0, 3, 1, 2)


def depth_logits(head: GridHead, g: int, patches: torch.Tensor, cls: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """[patch || cls] -> 1x1 conv -> (B, K, gh, gw) -> bilinear x``scale`` (see the module doc on the order)."""
    D = patches.shape[-1]
    w, b = head.weights[g], head.biases[g]
    logits = patches @ w[:D] + (cls @ w[D:])[:, None, None] + b
    return F.interpolate(logits.permute(0, 3, 1, 2), scale_factor=scale, mode="bilinear", align_corners=False)


def bin_centres(depth_range: tuple[float, float], n: int = N_BINS) -> torch.Tensor:
    edges = torch.linspace(depth_range[0], depth_range[1], n + 1)
    return 0.5 * (edges[:-1] + edges[1:])


def depth_bins(depth: torch.Tensor, depth_range: tuple[float, float], n: int = N_BINS) -> torch.Tensor:
    """Bin index of each depth (linear bins over the range); -100 (ignored by cross-entropy) where invalid."""
    lo, hi = depth_range
    idx = ((depth - lo) / (hi - lo) * n).floor().long().clamp(0, n - 1)
    return torch.where(valid_depth(depth, depth_range), idx, torch.full_like(idx, -100))


def valid_depth(depth: torch.Tensor, depth_range: tuple[float, float]) -> torch.Tensor:
    return torch.isfinite(depth) & (depth > 0) & (depth >= depth_range[0]) & (depth <= depth_range[1])


def eval_mask(depth: torch.Tensor, depth_range, eigen: bool) -> torch.Tensor:
    """Valid depth, inside the Eigen crop when asked (rows 45..470, cols 41..600 of 480 x 640; scaled to other
    target sizes)."""
    m = valid_depth(depth, depth_range)
    if eigen:
        H, W = depth.shape[-2:]
        r0, r1, c0, c1 = EIGEN_CROP
        crop = torch.zeros(H, W, dtype=torch.bool)
        crop[round(r0 * H / 480):round(r1 * H / 480), round(c0 * W / 640):round(c1 * W / 640)] = True
        m = m & crop
    return m


def silog(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, lam: float = SI_LAMBDA) -> torch.Tensor:
    """Scale-invariant log loss over masked pixels: mean(d^2) - lam * mean(d)^2 with
    d = log(pred + 1e-3) - log(gt + 1e-3)."""
    if not mask.any():
        return pred.sum() * 0
    d = torch.log(pred[mask] + 1e-3) - torch.log(gt[mask] + 1e-3)
    return (d ** 2).mean() - lam * d.mean() ** 2


def depth_loss(logits4: torch.Tensor, pred: torch.Tensor, gt: torch.Tensor, gt_padded: torch.Tensor,
               depth_range) -> torch.Tensor:
    """10 * SI-log at the target resolution + CE on bins at the x4 grid (targets nearest-resized)."""
    small = F.interpolate(gt_padded[:, None], size=logits4.shape[-2:], mode="nearest")[:, 0]
    ce = F.cross_entropy(logits4, depth_bins(small, depth_range), ignore_index=-100) \
        if valid_depth(small, depth_range).any() else logits4.sum() * 0
    return SI_WEIGHT * silog(pred[:, 0], gt, valid_depth(gt, depth_range)) + ce


def confusion(pred: torch.Tensor, target: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = target class, columns = predicted class; target 255 ignored."""
    keep = target != IGNORE
    t, p = target[keep].long(), pred[keep].long()
    return torch.bincount(t * n_classes + p, minlength=n_classes ** 2).reshape(n_classes, n_classes)


def miou(cm: torch.Tensor) -> float:
    """Mean IoU over classes that occur in the target or the prediction."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else float("nan")


def rmse(sq_sum: float, count: int) -> float:
    return math.sqrt(sq_sum / count) if count else float("nan")


def accuracy(correct: int, total: int) -> float:
    return correct / total if total else float("nan")


def as_float(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a, dtype=np.float32))
