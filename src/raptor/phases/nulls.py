"""Is there more than smooth drift? Phase statistics that a lag-only (Toeplitz) matrix cannot pass, and the test of
a data set's DP phases against that null (bootstrap CI over images, resampling p-value, boundary stability,
split-half choice and test). Formulas in :func:`lag_contrast`, :func:`boundary_jump` and :func:`phase_null_test`."""

from __future__ import annotations

import numpy as np

from raptor.errors import RaptorError
from raptor.phases.segment import contiguous_segmentation, phase_metrics
from raptor.phases.spec import boundaries_of, labels_from_phases


def toeplitz_null(D: np.ndarray) -> np.ndarray:
    """The lag-only null of a distance matrix: every entry replaced by the mean of its diagonal |i - j| (the same
    distance at every depth for a given lag: smooth drift, no blocks)."""
    D = np.asarray(D, dtype=np.float64)
    n = D.shape[0]
    lag = np.abs(np.subtract.outer(np.arange(n), np.arange(n)))
    means = np.array([np.diagonal(D, h).mean() for h in range(n)])
    return means[lag]


def lag_contrast(D: np.ndarray, phases: list[list[int]]) -> float:
    """The lag-matched phase statistic: the mean over lags h (those with pairs both across a boundary and inside a
    phase) of mean D over across-boundary pairs at lag h minus mean D over within-phase pairs at lag h. Zero for any
    partition of a lag-only (Toeplitz) matrix; positive when layers of one phase are closer than the same depth
    distance across phases. NaN when no lag has both kinds of pairs (k = 1, or only singleton phases)."""
    D = np.asarray(D, dtype=np.float64)
    n = D.shape[0]
    lab = labels_from_phases(phases, n)
    diffs = []
    for h in range(1, n):
        i = np.arange(n - h)
        same = lab[i] == lab[i + h]
        if same.any() and (~same).any():
            d = D[i, i + h]
            diffs.append(d[~same].mean() - d[same].mean())
    return float(np.mean(diffs)) if diffs else float("nan")


def boundary_jump(D: np.ndarray, phases: list[list[int]]) -> float:
    """The change-point phase statistic: the mean over boundaries of log(d(b-1, b) / mean of the neighbouring
    adjacent distances d(b-2, b-1), d(b, b+1)): above 0 when the representation moves faster across a boundary
    than just before and after it. Zero for any partition of a lag-only (Toeplitz) matrix (constant adjacent
    distance); insensitive to a drift speed that changes smoothly with depth, which :func:`lag_contrast` is not."""
    D = np.asarray(D, dtype=np.float64)
    adj = np.clip(np.diagonal(D, 1), 1e-12, None)
    vals = []
    for b in boundaries_of(phases):
        nb = [adj[i] for i in (b - 2, b) if 0 <= i < len(adj)]
        if nb:
            vals.append(np.log(adj[b - 1] / np.mean(nb)))
    return float(np.mean(vals)) if vals else float("nan")


PHASE_STATISTICS = {"lag_contrast": lag_contrast, "boundary_jump": boundary_jump}


def _sym(D: np.ndarray) -> np.ndarray:
    D = np.clip((D + D.T) / 2, 0.0, None)
    np.fill_diagonal(D, 0.0)
    return D


def phase_null_test(per_image: np.ndarray, k: int, n_resamples: int = 200, seed: int = 0) -> dict:
    """Test the contiguous phases at ``k`` (DP segmentation) against the lag-only null, from per-image distance
    matrices ``per_image`` (N, L, L) whose mean is the analysed matrix D.

    - ``value``: :func:`lag_contrast` of D at its DP phases (``alternatives``: the same test with
      :func:`boundary_jump`, the change-point operationalisation; a verdict may flip between them);
    - ``ci95``: percentile CI over images (bootstrap: resample images, re-segment, recompute);
    - ``p_value``: the phases are chosen on the data, so the null must choose too. Each null sample is the Toeplitz
      null of D plus one bootstrap fluctuation (D* - D), re-segmented at k and scored; p = (1 + #{null >= value}) /
      (1 + n_resamples). ``null_mean``: the mean null statistic (above 0: what selection alone gives);
    - ``boundary_stability``: how often each of D's boundaries recurs in the bootstrap segmentations, and the
      frequency of every boundary position;
    - ``split_half``: phases chosen on the even-numbered images and scored on the odd-numbered ones (fixed
      phases: the null value is 0 exactly), per statistic, with a bootstrap CI over the odd images and the share
      of bootstrap values <= 0 as a one-sided p.
    Indices are 0-based matrix rows; callers convert them to layer numbers."""
    X = np.asarray(per_image, dtype=np.float64)
    if X.ndim != 3 or X.shape[1] != X.shape[2]:
        raise RaptorError(f"per-image matrices must be (images, L, L), got {X.shape}")
    N, n = X.shape[0], X.shape[1]
    if not 2 <= k <= n:
        raise RaptorError(f"k must lie in 2..{n}, got {k}")

    def seg(D):
        return contiguous_segmentation(_sym(D), k_max=k).phases(k)

    D = X.mean(0)
    phases = seg(D)
    names = list(PHASE_STATISTICS)
    value = {m: PHASE_STATISTICS[m](D, phases) for m in names}
    T0 = toeplitz_null(D)
    rng = np.random.default_rng(seed)
    boot, null, bounds = {m: [] for m in names}, {m: [] for m in names}, []
    for _ in range(n_resamples):
        Db = X[rng.integers(0, N, N)].mean(0)
        pb = seg(Db)
        bounds.append(boundaries_of(pb))
        Dn = _sym(T0 + (Db - D))
        pn = seg(Dn)
        for m in names:
            boot[m].append(PHASE_STATISTICS[m](Db, pb))
            null[m].append(PHASE_STATISTICS[m](Dn, pn))
    freq = np.zeros(n)
    for b in bounds:
        freq[b] += 1
    freq /= max(1, n_resamples)
    observed = boundaries_of(phases)

    def summary(m, vals_boot, vals_null, v):
        vb, vn = np.array(vals_boot), np.array(vals_null)
        ok = np.isfinite(vn)
        p = float((1 + np.sum(vn[ok] >= v)) / (1 + ok.sum())) if np.isfinite(v) else 1.0
        return {"statistic": m, "value": None if not np.isfinite(v) else float(v), "ci95": _ci(vb),
                "null_mean": float(np.nanmean(vn)) if ok.any() else None, "null_ci95": _ci(vn), "p_value": p,
                "n_resamples": n_resamples}

    half = {}
    if N >= 4:
        A, B = X[0::2], X[1::2]
        pa = seg(A.mean(0))
        half = {"phases": pa, "n_images_choose": len(A), "n_images_test": len(B)}
        Bs = [B[rng.integers(0, len(B), len(B))].mean(0) for _ in range(n_resamples)]
        for m in names:
            vals = np.array([PHASE_STATISTICS[m](Db, pa) for Db in Bs])
            fin = vals[np.isfinite(vals)]
            v = PHASE_STATISTICS[m](B.mean(0), pa)
            half[m] = {"value": float(v) if np.isfinite(v) else None, "ci95": _ci(vals),
                       "p_value": float((1 + np.sum(fin <= 0)) / (1 + len(fin))) if len(fin) else 1.0}
    out = summary(names[0], boot[names[0]], null[names[0]], value[names[0]])
    out.update({"phases": phases, "n_images": N,
                "alternatives": {m: summary(m, boot[m], null[m], value[m]) for m in names[1:]},
                "null_phase_metrics": phase_metrics(T0, contiguous_segmentation(T0, k_max=k).phases(k)),
                "boundary_stability": {"boundaries": observed, "frequency": [float(freq[b]) for b in observed],
                                       "all": freq.tolist()},
                "split_half": half})
    return out


def _ci(x: np.ndarray) -> list[float | None]:
    x = x[np.isfinite(x)]
    if not len(x):
        return [None, None]
    lo, hi = np.percentile(x, [2.5, 97.5])
    return [float(lo), float(hi)]
