"""Validation metrics, accumulated exactly over a validation set.

- ``r2`` (standard): 1 - sum (y - y_hat)^2 / sum (y - mean_f(y))^2, with the per-feature mean of the *target* over
  all validation tokens (sklearn's ``r2_score`` with variance weighting, over (images*tokens, features)).
- ``r2_official`` (docs/method.md §6, overcomplete's ``r2_score(pred, target)``): 1 - mean((pred - y)^2) /
  (mean((pred - mean(pred))^2) + 1e-6) with a global scalar mean and the variance of the *prediction*.
- ``cosine[group]``: mean cosine between predicted and teacher tokens, per token group.
- ``r2_groups[group]``: the standard R^2 restricted to one token group (cls, registers, patches).
- ``r2_image_specific`` (the headline): 1 - SSE_model / SSE_position_mean per layer (and per token group), with the
  image-blind per-position mean (each token's training-set mean at its layer and position) as the reference: the
  share of the *image-dependent* variance a prediction explains. The position-mean baseline scores exactly 0 and
  anything worse than knowing only the positions scores below 0; the plain ``r2`` gives that blind baseline
  ~0.4-0.8 and ``r2_official_all_layers`` ~0.83. ``r2_image_specific_ci95``: a bootstrap CI of the mean over
  layers, over images (or over photos when the validation views are crops of fewer photos).
- :func:`image_r2`: R^2 of per-image pooled features (e.g. [cls || mean patch] after the final norm) across images
  -- how much of the *between-image* variance a prediction keeps (token R^2 can hide a collapse to one class).
"""

from __future__ import annotations

import torch

from raptor.teachers.base import TokenLayout


class LayerFitAccumulator:
    def __init__(self, n_layers: int, dim: int, layout: TokenLayout, groups=None):
        """``groups``: one id per validation image in update order (the photo a crop came from), so the CI of the
        image-specific R^2 resamples photos, not correlated views of one photo."""
        self.layout, self.groups = layout, groups
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
        # image-specific R^2 against a reference prediction (the per-position mean): per image and layer
        self.img_sse: list[torch.Tensor] = []
        self.img_ref: list[torch.Tensor] = []
        self.g_ref = {g: z(L) for g in self.g_sse}

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """pred/target: (B, L, T, D); ``reference``: the image-blind prediction (per-position mean), broadcastable
        to the target, for the image-specific R^2 (give it at every update or never)."""
        p, y = pred.double(), target.double()
        B, L, T, D = y.shape
        se = (p - y).pow(2)
        if reference is not None:
            re = (reference.double() - y).pow(2)
            self.img_sse.append(se.sum((2, 3)))
            self.img_ref.append(re.sum((2, 3)))
            for g in self.g_ref:
                sl = self.layout.group(g)
                if sl.stop > sl.start:
                    self.g_ref[g] += re[:, :, sl].sum((0, 2, 3))
        self.sse += se.sum((0, 2, 3))
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
        if self.img_sse:
            sse, ref = torch.cat(self.img_sse), torch.cat(self.img_ref)  # (images, L)
            spec = 1 - sse.sum(0) / ref.sum(0).clamp_min(1e-12)
            out["r2_image_specific"] = spec.tolist()
            out["r2_image_specific_mean"] = float(spec.mean())
            groups = None if self.groups is None else torch.as_tensor(self.groups)[:len(sse)]
            out["r2_image_specific_ci95"] = bootstrap_ratio_ci(sse, ref, groups=groups)
            out["r2_image_specific_ci_unit"] = "images" if groups is None else "groups (photos)"
            out["r2_image_specific_groups"] = {
                g: (1 - self.g_sse[g] / self.g_ref[g].clamp_min(1e-12)).tolist() for g in self.g_ref if self.g_n[g]}
        return out


def bootstrap_ratio_ci(sse: torch.Tensor, ref: torch.Tensor, n: int = 1000, seed: int = 0,
                       groups: torch.Tensor | None = None, chunk: int = 50) -> list[float]:
    """95 % percentile CI of mean_layers(1 - sum sse / sum ref) from ``n`` bootstrap resamples of the rows of the
    (rows, layers) arrays. ``groups`` (rows,): resample whole groups instead (several views of one photo are not
    independent: their rows are summed per photo first). Resamples are drawn ``chunk`` at a time, so memory stays
    ``chunk`` x rows x layers."""
    if groups is not None:
        uniq, inv = torch.unique(torch.as_tensor(groups), return_inverse=True)
        sse = torch.zeros(len(uniq), sse.shape[1], dtype=sse.dtype).index_add_(0, inv, sse)
        ref = torch.zeros(len(uniq), ref.shape[1], dtype=ref.dtype).index_add_(0, inv, ref)
    g = torch.Generator().manual_seed(seed)
    stats = []
    for s in range(0, n, chunk):
        idx = torch.randint(0, len(sse), (min(chunk, n - s), len(sse)), generator=g)
        stats.append((1 - sse[idx].sum(1) / ref[idx].sum(1).clamp_min(1e-12)).mean(1))
    stats = torch.cat(stats)
    lo, hi = torch.quantile(stats, torch.tensor([0.025, 0.975], dtype=stats.dtype)).tolist()
    return [lo, hi]


def image_r2(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """pred/target: (images, features). R^2 across images (per-feature mean, variance-weighted) and the share of
    the target's between-image variance the prediction has."""
    p, y = pred.double(), target.double()
    tot = (y - y.mean(0)).pow(2).sum()
    return {"r2": float(1 - (p - y).pow(2).sum() / tot.clamp_min(1e-12)),
            "variance_kept": float((p - p.mean(0)).pow(2).sum() / tot.clamp_min(1e-12))}
