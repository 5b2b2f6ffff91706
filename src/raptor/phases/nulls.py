"""Is there more than smooth drift? Phase statistics that a lag-only (Toeplitz) matrix cannot pass, and the test of
a data set's DP phases against that null and against a null whose drift may speed up or slow down smoothly with depth
(bootstrap CI over images, resampling p-value, boundary stability, split-half choice and test). Formulas in
:func:`lag_contrast`, :func:`boundary_jump`, :func:`variable_speed_null` and :func:`phase_null_test`."""

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


SPEED_DEGREE = 2
SPEED_STEP_RATIO = 2.0  # the variable-speed null's smoothness: adjacent steps' speeds differ by at most this factor


def variable_speed_null(D: np.ndarray, degree: int = SPEED_DEGREE) -> np.ndarray:
    """The variable-speed null of a distance matrix: a drift with no blocks and no change point whose speed may change
    smoothly with depth (the representation may slow down, as trained ViTs do in late layers).

    - speed: ``v_i = exp(poly(x_i))``, a log-polynomial of ``degree`` (2: it may speed up, then slow down, once) in
      the depth ``x`` of step i -> i+1 scaled to [-1, 1];
    - warped depth: ``tau_0 = 0``, ``tau_(i+1) = tau_i + v_i``, rescaled to end at 1 (where the layer sits along the
      path);
    - distance as a function of the warped gap only: ``g`` continuous, non-decreasing and piecewise linear with knots
      at 0, 1/(L-1), ..., 1 (a floor plus non-negative ramps, fitted by non-negative least squares to every d(i, j),
      i < j); the null is ``g(|tau_i - tau_j|)``;
    - the speed's coefficients minimise the squared error of that fit over the whole matrix (Nelder-Mead from a
      constant speed and from the log of the adjacent distances; the better is kept), so a distance floor from
      noise does not flatten the speed;
    - **smooth** means: the speeds of adjacent steps differ by at most ``SPEED_STEP_RATIO`` (2×; the log-speed's
      slope is bounded over the whole depth, coefficients beyond it are scaled back onto the bound). Without it a
      sharp quadratic puts a one-step spike of speed at any depth and absorbs a real change point.

    A matrix of this form is reproduced up to the optimiser's tolerance and the knots' resolution; ``degree=0``
    (constant speed) gives the best monotone piecewise-linear function of the lag."""
    from scipy.optimize import minimize, nnls

    D = _sym(np.asarray(D, dtype=np.float64))
    n = D.shape[0]
    if n < 3:
        return D.copy()
    deg = max(0, min(int(degree), n - 2))
    x = np.linspace(-1.0, 1.0, n - 1)
    iu = np.triu_indices(n, 1)
    target = D[iu]
    knots = np.linspace(0.0, 1.0, n)

    grid = np.linspace(-1.0, 1.0, 201)
    slope_max = np.log(SPEED_STEP_RATIO) / (x[1] - x[0]) if n > 2 else np.inf

    def bounded(c):
        """The coefficients scaled back (if needed) so that |d logv / dx| <= slope_max over the whole depth."""
        c = np.asarray(c, dtype=np.float64)
        steep = float(np.abs(np.polyval(np.polyder(np.concatenate([c, [0.0]])), grid)).max()) if deg else 0.0
        return c * (slope_max / steep) if steep > slope_max else c

    def fit(c):
        c = bounded(c)
        logv = np.polyval(np.concatenate([c, [0.0]]), x) if deg else np.zeros_like(x)
        logv = np.clip(logv - logv.max(), -30.0, 0.0)
        tau = np.concatenate([[0.0], np.cumsum(np.exp(logv))])
        gap = np.abs(np.subtract.outer(tau, tau))[iu] / tau[-1]
        basis = np.column_stack([np.ones_like(gap)] + [np.clip((gap - a) / (b - a), 0.0, 1.0)
                                                       for a, b in zip(knots[:-1], knots[1:])])
        coef, _ = nnls(basis, target)
        g = basis @ coef
        return g, float(np.sum((g - target) ** 2))

    best = np.zeros(deg)
    if deg:
        adj = np.log(np.clip(np.diagonal(D, 1), 1e-12, None))
        starts = [np.zeros(deg), np.polyfit(x, adj, deg)[:-1]]
        runs = [minimize(lambda c: fit(c)[1], s0, method="Nelder-Mead",
                         options={"xatol": 1e-4, "fatol": 1e-14, "maxiter": 400 * deg}) for s0 in starts]
        best = min(runs, key=lambda r: r.fun).x
    W = np.zeros_like(D)
    W[iu] = fit(best)[0]
    return W + W.T


NULLS = {"toeplitz": "lag-only (Toeplitz): the same mean distance at every depth for a given lag",
         "variable_speed": f"variable speed: a monotone function of the gap in warped depth, whose speed is a degree-"
                           f"{SPEED_DEGREE} log-polynomial of depth changing by at most {SPEED_STEP_RATIO:g}x per "
                           f"layer (a drift that may slow down smoothly, no blocks)"}


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


def null_matrices(D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (lag-only, variable-speed) null matrices of D: they do not depend on k, so a caller testing several k
    computes them once and passes them to :func:`phase_null_test`."""
    return toeplitz_null(D), variable_speed_null(D)


def phase_null_test(per_image: np.ndarray, k: int, n_resamples: int = 200, seed: int = 0,
                    nulls: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Test the contiguous phases at ``k`` (DP segmentation) against the lag-only null, from per-image distance
    matrices ``per_image`` (N, L, L) whose mean is the analysed matrix D.

    - ``value``: :func:`lag_contrast` of D at its DP phases (``alternatives``: the same test with
      :func:`boundary_jump`, the change-point operationalisation; a verdict may flip between them);
    - ``ci95``: percentile CI over images (bootstrap: resample images, re-segment, recompute);
    - ``p_value``: the phases are chosen on the data, so the null must choose too. Each null sample is the Toeplitz
      null of D plus one bootstrap fluctuation (D* - D), re-segmented at k and scored; p = (1 + #{null >= value}) /
      (1 + n_resamples). ``null_mean``: the mean null statistic (above 0: what selection alone gives);
    - ``variable_speed_null``: both statistics tested the same way against :func:`variable_speed_null` (a drift that
      may slow down smoothly: the lag contrast's known confound), with the same bootstrap fluctuations;
      ``null_fit_r2``: the share of D's off-diagonal variation each null matrix explains;
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
    T0, V0 = nulls if nulls is not None else null_matrices(D)  # (from null_matrices(per_image.mean(0)))
    rng = np.random.default_rng(seed)
    boot, null, bounds = {m: [] for m in names}, {m: [] for m in names}, []
    vnull = {m: [] for m in names}
    for _ in range(n_resamples):
        Db = X[rng.integers(0, N, N)].mean(0)
        pb = seg(Db)
        bounds.append(boundaries_of(pb))
        Dn = _sym(T0 + (Db - D))
        pn = seg(Dn)
        Dv = _sym(V0 + (Db - D))
        pv = seg(Dv)
        for m in names:
            boot[m].append(PHASE_STATISTICS[m](Db, pb))
            null[m].append(PHASE_STATISTICS[m](Dn, pn))
            vnull[m].append(PHASE_STATISTICS[m](Dv, pv))
    freq = np.zeros(n)
    for b in bounds:
        freq[b] += 1
    freq /= max(1, n_resamples)
    observed = boundaries_of(phases)

    def summary(m, vals_boot, vals_null, v, null_name="toeplitz"):
        vb, vn = np.array(vals_boot), np.array(vals_null)
        ok = np.isfinite(vn)
        p = float((1 + np.sum(vn[ok] >= v)) / (1 + ok.sum())) if np.isfinite(v) else 1.0
        return {"statistic": m, "value": None if not np.isfinite(v) else float(v), "ci95": _ci(vb),
                "null_mean": float(np.nanmean(vn)) if ok.any() else None, "null_ci95": _ci(vn), "p_value": p,
                "n_resamples": n_resamples, "null": null_name}

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
                "variable_speed_null": {m: summary(m, boot[m], vnull[m], value[m], "variable_speed") for m in names},
                "nulls": dict(NULLS),
                "null_fit_r2": {"toeplitz": _fit_r2(D, T0), "variable_speed": _fit_r2(D, V0)},
                "null_phase_metrics": phase_metrics(T0, contiguous_segmentation(T0, k_max=k).phases(k)),
                "boundary_stability": {"boundaries": observed, "frequency": [float(freq[b]) for b in observed],
                                       "all": freq.tolist()},
                "split_half": half})
    return out


def _fit_r2(D: np.ndarray, M: np.ndarray) -> float:
    """How much of the off-diagonal variation of D a null matrix M explains: 1 - SSE(D - M) / SSE(D - mean)."""
    iu = np.triu_indices(D.shape[0], 1)
    d, m = _sym(D)[iu], M[iu]
    ss = float(np.sum((d - d.mean()) ** 2))
    return float(1 - np.sum((d - m) ** 2) / ss) if ss > 0 else 1.0


def _ci(x: np.ndarray) -> list[float | None]:
    x = x[np.isfinite(x)]
    if not len(x):
        return [None, None]
    lo, hi = np.percentile(x, [2.5, 97.5])
    return [float(lo), float(hi)]
