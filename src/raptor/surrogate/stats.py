"""Statistics of the teacher's trajectories on (a sample of) the training set, in one streaming pass.

- per-layer, per-token-group **variance** (per-element, per-feature mean removed): the scale of the normalised
  loss (:mod:`raptor.surrogate.losses`);
- the **per-position mean** of every layer (baseline: predict each token by its training mean);
- the **normal equations** of a ridge regression layer l-1 -> l on tokens (with bias), kept for two folds of
  images so the ridge penalty can be chosen on held-in data (baseline: the best linear one-step map).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raptor.surrogate.losses import GROUPS as TOKEN_GROUPS
from raptor.teachers.base import TokenLayout

GROUPS = ("all",) + TOKEN_GROUPS


class TrajectoryStats:
    def __init__(self, n_layers: int, n_tokens: int, dim: int, layout: TokenLayout, ridge: bool = True):
        self.layout, self.L, self.D = layout, n_layers, dim
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.n = 0
        self.pos_sum = z(n_layers, n_tokens, dim)
        self.g_sq = {g: z(n_layers) for g in GROUPS}  # sum of squares per layer
        self.g_sum = {g: z(n_layers, dim) for g in GROUPS}  # per-feature sums per layer
        self.g_n = {g: 0 for g in GROUPS}
        self.ridge = ridge
        if ridge:  # fold f: A = [X 1]^T [X 1], B = [X 1]^T Y for each transition l-1 -> l
            self.A = z(2, n_layers - 1, dim + 1, dim + 1)
            self.B = z(2, n_layers - 1, dim + 1, dim)

    @torch.no_grad()
    def update(self, traj: torch.Tensor) -> None:
        """traj: (B, n_layers, T, D) float."""
        x = traj.double()
        B = x.shape[0]
        self.pos_sum += x.sum(0)
        for g in GROUPS:
            sl = self.layout.group(g)
            if sl.stop == sl.start:
                continue
            xg = x[:, :, sl]
            self.g_sq[g] += xg.pow(2).sum((0, 2, 3))
            self.g_sum[g] += xg.sum((0, 2))
            self.g_n[g] += B * (sl.stop - sl.start)
        if self.ridge:  # images alternate between the two folds
            for f in range(2):
                xf = x[[i for i in range(B) if (self.n + i) % 2 == f]]
                if not len(xf):
                    continue
                flat = xf.transpose(0, 1).reshape(self.L, -1, self.D)  # (layers, images*tokens, D)
                X = torch.cat([flat[:-1], torch.ones(*flat.shape[:2], 1, dtype=torch.float64)[:-1]], 2)
                self.A[f] += X.transpose(1, 2) @ X
                self.B[f] += X.transpose(1, 2) @ flat[1:]
        self.n += B

    def result(self) -> "Stats":
        var = {}
        for g in GROUPS:
            n = self.g_n[g]
            if n == 0:
                continue
            m = self.g_sum[g] / n  # (L, D)
            var[g] = (self.g_sq[g] / (n * self.D) - m.pow(2).mean(1)).clamp_min(1e-12).float()
        ridge = None
        if self.ridge and self.n >= 2:
            ridge = fit_ridge(self.A, self.B)
        return Stats(var=var, position_mean=(self.pos_sum / max(1, self.n)).float(), n_images=self.n, ridge=ridge)


def fit_ridge(A: torch.Tensor, B: torch.Tensor, lambdas=(1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)) -> dict:
    """Per transition: choose the penalty (relative to the mean feature power) by fitting on one fold and scoring
    the squared error on the other (both ways), then solve on both folds. The bias column is not penalised."""
    n_tr, Dp1 = A.shape[1], A.shape[2]
    W, chosen = [], []
    for t in range(n_tr):
        def solve(Am, Bm, lam):
            reg = torch.eye(Dp1, dtype=torch.float64) * lam * Am.diagonal()[:-1].mean()
            reg[-1, -1] = 0
            return torch.linalg.solve(Am + reg, Bm)

        def sse(Am, Bm, Wm):  # sum ||Y - X W||^2 minus the constant sum ||Y||^2 (enough to compare penalties)
            return float((Wm.T @ Am @ Wm).trace() - 2 * (Wm.T @ Bm).trace())

        errs = []
        for lam in lambdas:
            errs.append(sse(A[1, t], B[1, t], solve(A[0, t], B[0, t], lam))
                        + sse(A[0, t], B[0, t], solve(A[1, t], B[1, t], lam)))
        lam = lambdas[int(torch.tensor(errs).argmin())]
        W.append(solve(A[0, t] + A[1, t], B[0, t] + B[1, t], lam).float())
        chosen.append(lam)
    return {"W": torch.stack(W), "lambda": chosen}  # W: (L-1, D+1, D): layer l = [x_{l-1}, 1] @ W[l-1]


def ridge_predict(ridge: dict, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Apply the fitted map (layer-1) -> layer to tokens x (..., T, D)."""
    W = ridge["W"][layer - 1]
    return x @ W[:-1] + W[-1]


@dataclass
class Stats:
    var: dict  # group -> (n_layers,) per-element variance
    position_mean: torch.Tensor  # (n_layers, T, D)
    n_images: int
    ridge: dict | None = None

    def scale(self, layer: int) -> dict:
        return {g: float(v[layer]) for g, v in self.var.items()}

    def summary(self) -> dict:
        return {"n_images": self.n_images, "variance_per_layer": {g: [round(float(x), 6) for x in v]
                                                                  for g, v in self.var.items()},
                "ridge_lambda_per_transition": self.ridge["lambda"] if self.ridge else None}
