"""Validation metrics, accumulated exactly over a validation set.

- ``r2`` (standard): 1 - sum (y - y_hat)^2 / sum (y - mean_f(y))^2, with the per-feature mean of the *target* over
  all validation tokens (sklearn's ``r2_score`` with variance weighting, over (images*tokens, features)).
- ``r2_official`` (docs/method.md §6, overcomplete's ``r2_score(pred, target)``): 1 - mean((pred - y)^2) /
  (mean((pred - mean(pred))^2) + 1e-6) with a global scalar mean and the variance of the *prediction*.
- ``cosine[group]``: mean cosine between predicted and teacher tokens, per token group.
- ``r2_groups[group]``: the standard R^2 restricted to one token group (cls, registers, patches).
- :func:`image_r2`: R^2 of per-image pooled features (e.g. [cls || mean patch] after the final norm) across images
  -- how much of the *between-image* variance a prediction keeps (token R^2 can hide a collapse to one class).
"""

from __future__ import annotations

import torch

from raptor.teachers.base import TokenLayout


class LayerFitAccumulator:
    def __init__(self, n_layers: int, dim: int, layout: TokenLayout):
        self.layout = layout
        L = n_layers
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.sse, self.n, self.y_sum, self.y_sq = z(L), 0, z(L, dim), z(L, dim)
        self.p_sum, self.p_sq = z(L), z(L)
        self.cos = {g: z(L) for g in ("cls", "registers", "patches", "all")}
        self.cos_n = {g: 0 for g in self.cos}
        self.g_sse = {g: z(L) for g in ("cls", "registers", "patches")}
        self.g_sum = {g: z(L, dim) for g in self.g_sse}
        self.g_sq = {g: z(L, dim) for g in self.g_sse}
        self.g_n = {g: 0 for g in self.g_sse}

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred/target: (B, L, T, D)."""
        p, y = pred.double(), target.double()
        B, L, T, D = y.shape
        self.sse += (p - y).pow(2).sum((0, 2, 3))
        self.y_sum += y.sum((0, 2))
        self.y_sq += y.pow(2).sum((0, 2))
        self.p_sum += p.sum((0, 2, 3))
        self.p_sq += p.pow(2).sum((0, 2, 3))
        self.n += B * T
        for g in self.g_sse:
            sl = self.layout.group(g)
            if sl.stop > sl.start:
                yg, pg = y[:, :, sl], p[:, :, sl]
                self.g_sse[g] += (pg - yg).pow(2).sum((0, 2, 3))
                self.g_sum[g] += yg.sum((0, 2))
                self.g_sq[g] += yg.pow(2).sum((0, 2))
                self.g_n[g] += B * (sl.stop - sl.start)
        cos = torch.nn.functional.cosine_similarity(pred.float(), target.float(), dim=-1).double()  # (B, L, T)
        for g in self.cos:
            sl = self.layout.group(g)
            if sl.stop > sl.start:
                self.cos[g] += cos[:, :, sl].sum((0, 2))
                self.cos_n[g] += B * (sl.stop - sl.start)

    def result(self) -> dict:
        n, D = self.n, self.y_sum.shape[1]
        ss_tot = (self.y_sq - self.y_sum.pow(2) / n).sum(1)
        r2 = 1 - self.sse / ss_tot.clamp_min(1e-12)
        mse = self.sse / (n * D)
        p_mean = self.p_sum / (n * D)
        p_var = self.p_sq / (n * D) - p_mean.pow(2)
        r2_off = 1 - mse / (p_var + 1e-6)
        r2g = {}
        for g, ng in self.g_n.items():
            if ng:
                tot = (self.g_sq[g] - self.g_sum[g].pow(2) / ng).sum(1)
                r2g[g] = (1 - self.g_sse[g] / tot.clamp_min(1e-12)).tolist()
        out = {"r2": r2.tolist(), "r2_groups": r2g, "r2_official": r2_off.tolist(), "mse": mse.tolist(),
               "cosine": {g: (self.cos[g] / self.cos_n[g]).tolist() for g in self.cos if self.cos_n[g]}}
        # all layers pooled (the official Figure-7 number: stacked layers, global mean/variance of the prediction)
        tot_mse = float(self.sse.sum() / (n * D * len(self.sse)))
        pm = float(self.p_sum.sum() / (n * D * len(self.sse)))
        pv = float(self.p_sq.sum() / (n * D * len(self.sse))) - pm * pm
        out["r2_official_all_layers"] = 1 - tot_mse / (pv + 1e-6)
        out["r2_mean"] = float(r2.mean())
        return out


def image_r2(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """pred/target: (images, features). R^2 across images (per-feature mean, variance-weighted) and the share of
    the target's between-image variance the prediction has."""
    p, y = pred.double(), target.double()
    tot = (y - y.mean(0)).pow(2).sum()
    return {"r2": float(1 - (p - y).pow(2).sum() / tot.clamp_min(1e-12)),
            "variance_kept": float((p - p.mean(0)).pow(2).sum() / tot.clamp_min(1e-12))}
