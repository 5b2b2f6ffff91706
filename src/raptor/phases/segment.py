"""Phase segmentation of a layer distance matrix D (symmetric, zero diagonal, non-negative).

Two methods:

- :func:`recursive_max_cut` -- the official notebook's algorithm (docs/method.md §3; the notebook
  ``raptor/max_cut_dinov2_base.ipynb``, functions ``max_cut_bruteforce`` / ``recursive_max_cut``), reproduced exactly
  by default: complete graph on the layers with edge weights D; exact max-cut by brute force (vertex 0 pinned, all
  2^(n-1) bipartitions in the notebook's enumeration order, first maximum wins); recursive bisection taking the
  cluster with the largest recorded gain first; stop when that gain <= eps, eps = frac * total weight (total =
  D.sum()/2); clusters smaller than 2*min_size are never split, but a cut may put a single layer on one side; a cut
  whose value is <= eps marks the cluster unsplittable; children inherit the parent's cut value as gain; output in the
  notebook's order. It does **not** force contiguity. A ``balanced`` variant (both sides >= min_size) is kept as an
  option.
- :func:`contiguous_segmentation` -- exact contiguous segmentation into k phases by dynamic programming
  (reconstructed: the paper describes a "max-cut solved by DP into contiguous segments" but no formulation is public).
  Objective: **minimise the total within-phase distance** sum_{phases} sum_{i<j in phase} D_ij, which is the same as
  maximising the cut weight between phases (the contiguous max-k-cut). O(k L^2) time.

Choice of k (:func:`choose_k`): ``gain`` (default) -- the DP analogue of the max-cut stopping rule: keep adding a
phase while the cut weight it adds is > frac * total weight; ``elbow`` -- the k whose point on the normalised DP
cost curve lies farthest below the chord from k=1 to k_max.

Phase-structure metrics (:func:`phase_metrics`), for a distance matrix D and phases P (S = 1 - D where D is a
cosine distance in [0, 1]):

- ``within_mean`` / ``between_mean``: mean D over pairs i<j in the same / different phases;
- ``contrast`` = between_mean - within_mean (>0: phases are tighter than the whole);
- ``contrast_ratio`` = between_mean / within_mean;
- ``cut_fraction`` = between-phase weight / total weight (share of all distance that crosses boundaries);
- ``block_energy`` = sum_{same phase, i != j} S_ij^2 / sum_{i != j} S_ij^2 (block-diagonal energy fraction of the
  similarity);
- ``boundary_jump`` = mean adjacent-layer distance D[l-1, l] across boundaries / the same within phases.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from raptor.errors import RaptorError
from raptor.phases.spec import labels_from_phases


def check_distance(D: np.ndarray) -> np.ndarray:
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or D.shape[0] != D.shape[1] or D.shape[0] < 1:
        raise RaptorError(f"distance matrix must be square, got shape {D.shape}")
    if not np.isfinite(D).all():
        raise RaptorError("distance matrix has NaN/inf entries")
    if not np.allclose(D, D.T, atol=1e-9 * max(1.0, np.abs(D).max())):
        raise RaptorError("distance matrix must be symmetric")
    return D


# ---- exact max-cut ------------------------------------------------------------------------------------------------

MAXCUT_VARIANTS = ("official", "balanced")


def _side_from_index(m: int, n: int) -> np.ndarray:
    """Bipartition number ``m`` in the notebook's enumeration order: vertex 0 pinned to side False, vertices
    1..n-1 are the bits of m with vertex 1 the *most* significant (``itertools.product([0, 1], repeat=n-1)``)."""
    side = np.zeros(n, dtype=bool)
    for i in range(1, n):
        side[i] = (m >> (n - 1 - i)) & 1
    return side


def max_cut_bruteforce(W: np.ndarray, min_side: int = 0, chunk: int = 1 << 16,
                       rtol: float = 1e-12) -> tuple[np.ndarray, float]:
    """Exact max-cut of a complete weighted graph. Returns (side mask with vertex 0 on side False, cut value).

    Enumerates all 2^(n-1) bipartitions with vertex 0 pinned, in the official notebook's order (vertex 1 the most
    significant bit; the all-False "cut" of value 0 included), vectorised in chunks. Ties go to the first
    bipartition in that order, as the notebook's strict ``>`` does; cut values within ``rtol`` x total weight of
    the maximum count as tied, so float summation order cannot decide between mathematically equal cuts.
    ``min_side`` > 0 only admits cuts with at least that many vertices on each side (the ``balanced`` variant).
    """
    W = np.asarray(W, dtype=np.float64)
    n = W.shape[0]
    if n < 1 or (min_side > 0 and n < 2 * min_side):
        raise RaptorError(f"cannot cut {n} vertices into two sides of >= {min_side}")
    if n > 30:
        raise RaptorError(f"brute-force max-cut over {n} vertices needs 2^{n - 1} cuts; use the contiguous DP")
    W = (W + W.T) / 2
    np.fill_diagonal(W, 0.0)
    total = 1 << (n - 1)
    shifts = (n - 1 - np.arange(1, n, dtype=np.int64))[None, :]  # vertex i <- bit n-1-i

    def values(start: int) -> np.ndarray:
        masks = np.arange(start, min(start + chunk, total), dtype=np.int64)
        S = np.zeros((len(masks), n))
        S[:, 1:] = (masks[:, None] >> shifts) & 1
        vals = np.einsum("mi,mi->m", S @ W, 1 - S)
        if min_side > 0:
            size = S.sum(1)
            vals[(size < min_side) | (n - size < min_side)] = -np.inf
        return vals

    starts = range(0, total, chunk)
    chunk_max = np.array([values(s).max() for s in starts])
    best = float(chunk_max.max())
    if not np.isfinite(best):
        raise RaptorError(f"no admissible cut of {n} vertices with >= {min_side} per side")
    tol = rtol * max(1.0, float(np.abs(W).sum()) / 2)
    first = int(np.flatnonzero(chunk_max >= best - tol)[0])  # first chunk holding a (tied) maximum
    vals = values(starts[first])
    m = starts[first] + int(np.flatnonzero(vals >= best - tol)[0])
    return _side_from_index(m, n), float(vals[m - starts[first]])


def cut_weight(W: np.ndarray, side: np.ndarray) -> float:
    """Sum of W over pairs on different sides (the notebook's ``W[xor-outer(side, side)].sum() / 2``)."""
    side = np.asarray(side, dtype=bool)
    return float(W[np.logical_xor.outer(side, side)].sum() / 2)


def recursive_max_cut(D: np.ndarray, frac: float = 0.2, min_size: int = 2, variant: str = "official",
                      cache: dict | None = None) -> list[list[int]]:
    """Recursive max-cut bisection (docs/method.md §3). Returns clusters (sorted members) in the algorithm's order.

    ``variant="official"`` (default) reproduces the notebook exactly: eps = frac * D.sum()/2; repeatedly take the
    cluster with the largest recorded gain (ties: the earliest cluster in the list); stop when that gain <= eps;
    a cluster with fewer than 2*min_size members is never split; otherwise its exact max-cut (any bipartition, one
    side may hold a single layer) splits it if the cut value > eps, else it is marked unsplittable. The side
    holding the cluster's first layer replaces the cluster in place, the other side is appended at the end, and
    both inherit the cut value as their gain. Output order is therefore the notebook's printing order.

    ``variant="balanced"`` is the same loop but only admits cuts with >= min_size layers on both sides (no
    single-layer phases when min_size = 2). ``cache`` memoises exact max-cuts across calls (e.g. a frac sweep).
    """
    if variant not in MAXCUT_VARIANTS:
        raise RaptorError(f"unknown max-cut variant {variant!r} (use {', '.join(MAXCUT_VARIANTS)})")
    if not np.isfinite(frac) or frac < 0:
        raise RaptorError(f"max-cut frac must be >= 0, got {frac}")
    if min_size < 1:
        raise RaptorError(f"max-cut min_size must be >= 1, got {min_size}")
    D = check_distance(D)
    n = D.shape[0]
    eps = frac * D.sum() / 2
    min_side = min_size if variant == "balanced" else 0
    clusters: list[list[int]] = [list(range(n))]
    gains: list[float] = [np.inf]
    while True:
        tgt = int(np.argmax(gains))  # first maximum, as max() over the notebook's insertion-ordered dict
        if gains[tgt] <= eps:
            break
        members = clusters[tgt]
        if len(members) < 2 * min_size:
            gains[tgt] = -np.inf
            continue
        key = (tuple(members), min_side)
        if cache is not None and key in cache:
            side, val = cache[key]
        else:
            side, val = max_cut_bruteforce(D[np.ix_(members, members)], min_side=min_side)
            if cache is not None:
                cache[key] = (side, val)
        if val <= eps:
            gains[tgt] = -np.inf
            continue
        clusters[tgt] = [m for m, s in zip(members, side) if not s]
        clusters.append([m for m, s in zip(members, side) if s])
        gains[tgt] = val
        gains.append(val)
    return clusters


# ---- contiguous DP ------------------------------------------------------------------------------------------------

def segment_costs(D: np.ndarray) -> np.ndarray:
    """C[a, b] = within-segment distance of layers a..b-1 (sum over pairs), for 0 <= a < b <= L; inf elsewhere."""
    D = np.asarray(D, dtype=np.float64)
    L = D.shape[0]
    P = np.zeros((L + 1, L + 1))
    P[1:, 1:] = D.cumsum(0).cumsum(1)
    a = np.arange(L + 1)[:, None]
    b = np.arange(L + 1)[None, :]
    with np.errstate(invalid="ignore"):
        C = (P[b, b] - P[a, b] - P[b, a] + P[a, a]) / 2  # block sum over [a,b)x[a,b), each pair once
    C = np.where(b > a, C, np.inf)
    return C


@dataclass
class DPResult:
    """Optimal contiguous segmentations for k = 1..k_max (positions are 0-based indices into D)."""

    costs: np.ndarray  # costs[k-1] = minimal within-phase distance with k phases
    boundaries: dict[int, list[int]]  # k -> start index of each phase after the first
    total: float  # total weight D.sum()/2
    n: int

    def phases(self, k: int) -> list[list[int]]:
        if k not in self.boundaries:
            raise RaptorError(f"no segmentation with k={k} (available: {sorted(self.boundaries)})")
        cuts = [0] + self.boundaries[k] + [self.n]
        return [list(range(cuts[i], cuts[i + 1])) for i in range(k)]


def contiguous_segmentation(D: np.ndarray, k_max: int, min_size: int = 1) -> DPResult:
    """Exact minimum within-phase distance segmentations into k = 1..k_max contiguous phases (see module doc)."""
    D = check_distance(D)
    L = D.shape[0]
    if k_max < 1:
        raise RaptorError("k must be >= 1")
    k_max = min(k_max, L // max(1, min_size))
    C = segment_costs(D)
    a = np.arange(L + 1)[:, None]
    b = np.arange(L + 1)[None, :]
    C = np.where(b - a >= max(1, min_size), C, np.inf)  # no empty phase, even where distances tie at 0
    dp = np.full((k_max + 1, L + 1), np.inf)
    arg = np.zeros((k_max + 1, L + 1), dtype=np.int64)
    dp[1] = C[0]
    for k in range(2, k_max + 1):
        cand = dp[k - 1][:, None] + C  # cand[a, b]: first k-1 phases cover [0, a), last phase [a, b)
        arg[k] = np.argmin(cand, axis=0)
        dp[k] = cand[arg[k], np.arange(L + 1)]
    bounds: dict[int, list[int]] = {}
    for k in range(1, k_max + 1):
        if not np.isfinite(dp[k, L]):
            continue
        cuts, b = [], L
        for kk in range(k, 1, -1):
            a = int(arg[kk, b])
            cuts.append(a)
            b = a
        bounds[k] = sorted(cuts)
    return DPResult(costs=np.array([dp[k, L] for k in range(1, k_max + 1)]), boundaries=bounds,
                    total=float(D.sum() / 2), n=L)


def brute_force_contiguous(D: np.ndarray, k: int) -> tuple[float, list[int]]:
    """Reference: try every contiguous segmentation into k phases (tests)."""
    D = np.asarray(D, dtype=np.float64)
    L = D.shape[0]
    C = segment_costs(D)
    best = (np.inf, [])
    for cuts in itertools.combinations(range(1, L), k - 1):
        edges = (0,) + cuts + (L,)
        c = sum(C[edges[i], edges[i + 1]] for i in range(k))
        if c < best[0] - 1e-12:
            best = (c, list(cuts))
    return best


def choose_k(dp: DPResult, method: str = "gain", frac: float = 0.1) -> int:
    """Pick k from the DP cost curve (see module doc)."""
    costs = dp.costs
    ks = np.arange(1, len(costs) + 1)
    if method == "gain":
        k = 1
        for kk in range(2, len(costs) + 1):
            if costs[kk - 2] - costs[kk - 1] > frac * dp.total:
                k = kk
            else:
                break
        return k
    if method == "elbow":
        if len(costs) < 3:
            return int(ks[-1])
        y = (costs - costs[-1]) / max(costs[0] - costs[-1], 1e-12)
        x = (ks - 1) / (ks[-1] - 1)
        chord = 1 - x
        return int(ks[int(np.argmax(chord - y))])
    raise RaptorError(f"unknown k rule {method!r} (gain or elbow)")


def phase_metrics(D: np.ndarray, phases: list[list[int]]) -> dict[str, float]:
    """Phase-structure metrics of a distance matrix for a segmentation (formulas in the module doc)."""
    D = check_distance(D)
    n = D.shape[0]
    lab = labels_from_phases(phases, n)
    iu = np.triu_indices(n, 1)
    same = lab[iu[0]] == lab[iu[1]]
    d = D[iu]
    within = float(d[same].mean()) if same.any() else 0.0
    between = float(d[~same].mean()) if (~same).any() else 0.0
    total = float(d.sum())
    S = 1.0 - D
    s2 = S[iu] ** 2
    adj = np.array([D[i - 1, i] for i in range(1, n)])
    is_boundary = lab[1:] != lab[:-1]
    jump = (float(adj[is_boundary].mean()) / max(float(adj[~is_boundary].mean()), 1e-12)
            if is_boundary.any() and (~is_boundary).any() else float("nan"))
    out = {
        "k": len(phases),
        "within_mean": within,
        "between_mean": between,
        "contrast": between - within,
        "contrast_ratio": between / within if within > 0 else float("inf") if between > 0 else 1.0,
        "cut_fraction": float(d[~same].sum() / total) if total > 0 else 0.0,
        "block_energy": float(s2[same].sum() / s2.sum()) if s2.sum() > 0 else 0.0,
        "boundary_jump": jump,
    }
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in out.items()}
