"""Phases: planted blocks are recovered, DP = brute force, max-cut = exhaustive search, metrics behave."""

import itertools

import numpy as np
import pytest

from raptor.errors import RaptorError
from raptor.phases import (
    brute_force_contiguous,
    choose_k,
    contiguous_segmentation,
    cut_weight,
    is_contiguous,
    max_cut_bruteforce,
    phase_metrics,
    recursive_max_cut,
)


def planted(sizes, noise=0.02, within=0.1, between=0.8, seed=0):
    """Distance matrix with contiguous planted phases of the given sizes, plus symmetric noise."""
    rng = np.random.default_rng(seed)
    lab = np.repeat(np.arange(len(sizes)), sizes)
    D = np.where(lab[:, None] == lab[None, :], within, between) + rng.uniform(0, noise, (len(lab),) * 2)
    D = (D + D.T) / 2
    np.fill_diagonal(D, 0)
    return D, [list(np.flatnonzero(lab == p)) for p in range(len(sizes))]


@pytest.mark.parametrize("sizes", [(7, 5), (4, 3, 3, 2), (3, 6, 3), (2, 2, 2, 2, 2, 2)])
def test_dp_recovers_planted_phases(sizes):
    D, truth = planted(sizes)
    dp = contiguous_segmentation(D, k_max=8)
    assert dp.phases(len(sizes)) == truth
    assert choose_k(dp, "gain", frac=0.05) == len(sizes)
    if len(sizes) <= 3:  # the elbow is a coarser heuristic: it merges the (4, 3, 3, 2) plant into 3
        assert choose_k(dp, "elbow") == len(sizes)


def test_max_cut_recovers_planted_phases_and_not_forced_contiguous():
    D, truth = planted((7, 5))
    assert sorted(recursive_max_cut(D, frac=0.2)) == truth
    D3, truth3 = planted((4, 3, 3, 2), seed=2)
    assert sorted(recursive_max_cut(D3, frac=0.05)) == truth3
    # a non-contiguous plant: layers {0,1,6,7} alike, {2..5} alike -> max-cut finds the non-contiguous groups
    lab = np.array([0, 0, 1, 1, 1, 1, 0, 0])
    Dn = np.where(lab[:, None] == lab[None, :], 0.1, 0.9)
    np.fill_diagonal(Dn, 0)
    got = sorted(recursive_max_cut(Dn, frac=0.2))
    assert got == [[0, 1, 6, 7], [2, 3, 4, 5]] and not is_contiguous(got)
    dp = contiguous_segmentation(Dn, 3)
    assert is_contiguous(dp.phases(3))


@pytest.mark.parametrize("L", [5, 8, 11, 14])
def test_dp_optimum_equals_brute_force(L):
    rng = np.random.default_rng(L)
    A = rng.uniform(0, 1, (L, L))
    D = (A + A.T) / 2
    np.fill_diagonal(D, 0)
    dp = contiguous_segmentation(D, k_max=min(L, 6))
    for k in range(1, min(L, 6) + 1):
        cost, cuts = brute_force_contiguous(D, k)
        assert abs(dp.costs[k - 1] - cost) <= 1e-9
        phases = dp.phases(k)
        within = sum(D[np.ix_(p, p)].sum() / 2 for p in phases)
        assert abs(within - cost) <= 1e-9


def _exhaustive_max_cut(W, min_size):
    n = len(W)
    best = -np.inf
    for r in range(1, n):
        for side in itertools.combinations(range(n), r):
            s = np.zeros(n, bool)
            s[list(side)] = True
            if s.sum() < min_size or (~s).sum() < min_size:
                continue
            best = max(best, cut_weight(W, s))
    return best


@pytest.mark.parametrize("n,min_size", [(5, 1), (8, 2), (10, 2), (12, 3)])
def test_max_cut_equals_exhaustive_search(n, min_size):
    rng = np.random.default_rng(n)
    A = rng.uniform(0, 1, (n, n))
    W = (A + A.T) / 2
    np.fill_diagonal(W, 0)
    side, val = max_cut_bruteforce(W, min_side=min_size, chunk=37)  # small chunks exercise the chunk loop
    assert not side[0]
    assert abs(val - cut_weight(W, side)) <= 1e-9
    assert abs(val - _exhaustive_max_cut(W, min_size)) <= 1e-9


# ---- parity with the official notebook (raptor/max_cut_dinov2_base.ipynb) -------------------------------------
# An independent reference written from the notebook's *definition* (docs/method.md §3), not from its code:
#  * bipartitions: vertex 0 on side 0, the others' sides read as a binary number with vertex 1 the most significant
#    digit, visited from 0 upwards; the first strictly larger cut value wins;
#  * bisection: eps = frac * (sum of D)/2; pick the first cluster (list order) with the largest gain; stop when it is
#    <= eps; clusters with < 2*min_size layers and cuts of value <= eps end that cluster; the side with the cluster's
#    first layer stays in place, the other is appended; both inherit the cut value as gain.

def _ref_max_cut(W):
    n = len(W)
    best, best_side = None, None
    for number in range(2 ** (n - 1)):
        digits = [int(c) for c in format(number, f"0{n - 1}b")] if n > 1 else []
        side = [0] + digits
        value = sum(W[i][j] for i in range(n) for j in range(i + 1, n) if side[i] != side[j])
        if best is None or value > best:
            best, best_side = value, side
    return best, best_side


def _ref_recursive(W, frac, min_size=2):
    total = sum(W[i][j] for i in range(len(W)) for j in range(i + 1, len(W)))
    eps = frac * total
    clusters, gains = [list(range(len(W)))], [float("inf")]
    while True:
        top = max(gains)
        t = gains.index(top)
        if top <= eps:
            return clusters
        c = clusters[t]
        if len(c) < 2 * min_size:
            gains[t] = float("-inf")
            continue
        value, side = _ref_max_cut([[W[a][b] for b in c] for a in c])
        if value <= eps:
            gains[t] = float("-inf")
            continue
        clusters[t] = [m for m, s_ in zip(c, side) if s_ == 0]
        clusters.append([m for m, s_ in zip(c, side) if s_ == 1])
        gains[t] = value
        gains.append(value)


def _sym(A):
    D = np.triu(A, 1)
    return D + D.T


@pytest.mark.parametrize("kind", ["uniform", "integer_ties", "constant", "planted", "outlier_last"])
def test_recursive_max_cut_matches_the_notebook_definition(kind):
    """Many matrices per kind, every frac: identical clusters *and* order. Integer matrices make ties exact."""
    rng = np.random.default_rng(hash(kind) % 2**32)
    for trial in range(25):
        n = int(rng.integers(3, 11))
        if kind == "uniform":
            D = _sym(rng.uniform(0, 1, (n, n)))
        elif kind == "integer_ties":
            D = _sym(rng.integers(0, 3, (n, n)).astype(float))
        elif kind == "constant":
            D = _sym(np.ones((n, n)))
        elif kind == "planted":
            D, _ = planted(tuple(rng.integers(1, 5, int(rng.integers(2, 4)))), seed=trial)
            n = len(D)
        else:  # a last layer far from everything (the bundled teacher's layer 12)
            D = _sym(rng.uniform(0.1, 0.3, (n, n)))
            D[-1, :-1] = D[:-1, -1] = rng.uniform(0.9, 1.2, n - 1)
        Dl = D.tolist()
        for frac in (0.0, 0.05, 0.09, 0.1, 0.2, 0.3):
            for min_size in (1, 2):
                assert recursive_max_cut(D, frac=frac, min_size=min_size) == _ref_recursive(Dl, frac, min_size), \
                    (kind, trial, frac, min_size)


def test_official_max_cut_may_cut_off_a_single_outlier_layer():
    """The notebook only refuses to split clusters < 2*min_size; a cut may isolate one layer. Here layer 5 of
    {0..5} is far from the rest: the official cut isolates it, the balanced variant cannot."""
    D = _sym(np.full((6, 6), 0.2))
    D[5, :5] = D[:5, 5] = 1.0
    assert recursive_max_cut(D, frac=0.2) == [[0, 1, 2, 3, 4], [5]]
    assert _ref_recursive(D.tolist(), 0.2) == [[0, 1, 2, 3, 4], [5]]
    balanced = recursive_max_cut(D, frac=0.2, variant="balanced")
    assert all(len(p) >= 2 for p in balanced)


@pytest.mark.parametrize("n", [12, 24])
def test_exact_ties_follow_the_notebook_enumeration_order(n):
    """Constant distances: every balanced cut ties. The notebook's order (vertex 1 most significant) picks the
    contiguous halves {0..n/2-1} | {n/2..n-1}; the reverse bit order would pick {0, n/2+1..} | {1..n/2}."""
    side, val = max_cut_bruteforce(_sym(np.ones((n, n))))
    assert val == (n // 2) ** 2
    assert side.tolist() == [False] * (n // 2) + [True] * (n // 2)
    if n <= 12:
        assert _ref_max_cut(_sym(np.ones((n, n))).tolist())[1] == [0] * (n // 2) + [1] * (n // 2)


def test_max_cut_L16_matches_reference_and_L24_is_locally_optimal():
    rng = np.random.default_rng(16)
    D = _sym(rng.integers(0, 4, (14, 14)).astype(float))  # ties abound
    side, val = max_cut_bruteforce(D, chunk=1000)
    ref_val, ref_side = _ref_max_cut(D.tolist())
    assert val == ref_val and side.astype(int).tolist() == ref_side
    D24 = _sym(rng.uniform(0, 1, (24, 24)))
    side, val = max_cut_bruteforce(D24)
    assert abs(val - cut_weight(D24, side)) < 1e-9
    for i in range(1, 24):  # no single move improves an exact optimum
        s2 = side.copy()
        s2[i] = ~s2[i]
        assert cut_weight(D24, s2) <= val + 1e-12
    assert side.tolist() == max_cut_bruteforce(D24, chunk=4099)[0].tolist()  # chunking never changes the answer


def test_recursive_max_cut_respects_eps_and_min_size():
    D, _ = planted((6, 6))
    assert recursive_max_cut(D, frac=1.0) == [list(range(12))]  # eps above any cut: no split
    parts = recursive_max_cut(D, frac=0.0, min_size=2)
    assert all(len(p) >= 2 for p in parts) and sorted(sum(parts, [])) == list(range(12))


def test_phase_metrics_formulas():
    D, truth = planted((4, 4), noise=0.0, within=0.2, between=0.6)
    m = phase_metrics(D, truth)
    assert m["within_mean"] == pytest.approx(0.2) and m["between_mean"] == pytest.approx(0.6)
    assert m["contrast"] == pytest.approx(0.4) and m["contrast_ratio"] == pytest.approx(3.0)
    assert m["cut_fraction"] == pytest.approx(16 * 0.6 / (16 * 0.6 + 12 * 0.2))
    assert m["block_energy"] == pytest.approx(12 * 0.8 ** 2 / (12 * 0.8 ** 2 + 16 * 0.4 ** 2))
    assert m["boundary_jump"] == pytest.approx(3.0)
    wrong = phase_metrics(D, [[0, 1, 2, 3, 4, 5], [6, 7]])
    assert wrong["contrast"] < m["contrast"] and wrong["block_energy"] < m["block_energy"]


def test_bad_inputs():
    with pytest.raises(RaptorError):
        contiguous_segmentation(np.ones((3, 4)), 2)
    with pytest.raises(RaptorError):
        contiguous_segmentation(np.array([[0, 1], [2, 0.0]]), 2)
    with pytest.raises(RaptorError):
        max_cut_bruteforce(np.zeros((40, 40)))
    with pytest.raises(RaptorError, match="variant"):
        recursive_max_cut(np.zeros((4, 4)), variant="magic")
    with pytest.raises(RaptorError, match="frac"):
        recursive_max_cut(np.zeros((4, 4)), frac=-0.1)
    D, _ = planted((3, 3))
    with pytest.raises(RaptorError):
        choose_k(contiguous_segmentation(D, 3), "magic")


# ---- phases against the lag-only null ------------------------------------------------------------------------------

def _drift(seed: int, N: int = 64, L: int = 12, D: int = 32, omega: float = 0.12, noise: float = 0.15):
    """Per-image cosine-distance matrices of a smooth drift: every image's summary turns at a constant speed in its own
    random plane, plus independent noise per layer (distance grows with lag; no blocks)."""
    rng = np.random.default_rng(seed)
    out = np.empty((N, L, L))
    t = np.arange(1, L + 1)[:, None]
    for n in range(N):
        q, _ = np.linalg.qr(rng.normal(size=(D, 2)))
        s = np.cos(omega * t) * q[:, 0] + np.sin(omega * t) * q[:, 1] + noise * rng.normal(size=(L, D)) / np.sqrt(D)
        s /= np.linalg.norm(s, axis=1, keepdims=True)
        out[n] = 1 - np.clip(s @ s.T, -1, 1)
        np.fill_diagonal(out[n], 0.0)
    return out


def test_every_partition_of_a_lag_only_matrix_scores_zero():
    from raptor.phases import boundary_jump, lag_contrast, toeplitz_null

    rng = np.random.default_rng(0)
    D = rng.random((10, 10))
    T = toeplitz_null((D + D.T) / 2)
    assert np.allclose(T, T.T) and all(np.ptp(np.diagonal(T, h)) < 1e-12 for h in range(10))
    for _ in range(20):
        cuts = sorted(rng.choice(np.arange(1, 10), size=rng.integers(1, 5), replace=False).tolist())
        bounds = [0] + cuts + [10]
        phases = [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
        for stat in (lag_contrast, boundary_jump):
            v = stat(T, phases)
            assert np.isnan(v) or abs(v) < 1e-12, (stat.__name__, phases, v)


def test_smooth_drift_is_not_called_phases_at_the_nominal_rate():
    """Ten smooth-drift data sets: the test (phases re-chosen on every null sample) calls at most 2 of them
    significant at 0.05 at k = 2 and 3, for each statistic (the nominal rate is 0.5 in 10)."""
    from raptor.phases import phase_null_test

    for k in (2, 3):
        p = np.array([[t["p_value"], t["alternatives"]["boundary_jump"]["p_value"]]
                      for t in (phase_null_test(_drift(200 + s), k, 100, 0) for s in range(10))])
        assert (p < 0.05).sum(0).max() <= 2, (k, p)
        assert np.median(p) > 0.2, (k, p)


def test_planted_blocks_are_significant_and_their_boundaries_stable():
    """Per-image matrices with 3 planted blocks (layers 1-4, 5-9, 10-12 close inside, far across) plus noise: the DP
    finds the blocks, both statistics give p < 0.01, every bootstrap re-segmentation finds the same boundaries and
    the phases chosen on half the images score on the other half."""
    from raptor.phases import phase_null_test

    X = _drift(3) * 0.5
    lab = np.repeat([0, 1, 2], [4, 5, 3])
    X = X + 0.05 * (lab[:, None] != lab[None, :])
    t = phase_null_test(X, 3, 200, 0)
    assert t["phases"] == [list(range(0, 4)), list(range(4, 9)), list(range(9, 12))]
    assert t["p_value"] < 0.01 and t["alternatives"]["boundary_jump"]["p_value"] < 0.01
    assert t["boundary_stability"]["boundaries"] == [4, 9] and min(t["boundary_stability"]["frequency"]) >= 0.95
    assert t["split_half"]["lag_contrast"]["value"] > 0 and t["split_half"]["lag_contrast"]["p_value"] < 0.01
    assert t["null_mean"] < t["ci95"][0]


# ---- phases against a drift that may slow down (the variable-speed null) -------------------------------------------

def _slowing_drift(seed: int, N: int = 64, L: int = 12, D: int = 32, omega: float = 0.12, noise: float = 0.15,
                   slope: float = 2.0):
    """As :func:`_drift`, but the summary turns fast in early layers and slowly in late ones (log-speed linear in
    depth, a factor e^(2 slope) between first and last step): smooth, no blocks, yet not lag-only."""
    rng = np.random.default_rng(seed)
    out = np.empty((N, L, L))
    v = np.exp(-slope * np.linspace(-1, 1, L))
    theta = np.cumsum(v / v.mean() * omega)[:, None]
    for n in range(N):
        q, _ = np.linalg.qr(rng.normal(size=(D, 2)))
        s = np.cos(theta) * q[:, 0] + np.sin(theta) * q[:, 1] + noise * rng.normal(size=(L, D)) / np.sqrt(D)
        s /= np.linalg.norm(s, axis=1, keepdims=True)
        out[n] = 1 - np.clip(s @ s.T, -1, 1)
        np.fill_diagonal(out[n], 0.0)
    return out


def test_variable_speed_null_reproduces_a_warped_drift_and_removes_blocks():
    """A matrix that *is* a monotone function of the gap in warped depth (log-quadratic speed) is its own null; a
    block added to it is not in the null (the null's residual is the block)."""
    from raptor.phases import toeplitz_null, variable_speed_null

    L = 12
    x = np.linspace(-1, 1, L - 1)
    tau = np.concatenate([[0.0], np.cumsum(np.exp(-1.2 * x + 0.8 * x ** 2))])
    tau /= tau[-1]
    D = 0.1 + 1 - np.exp(-np.abs(np.subtract.outer(tau, tau)) / 0.4)
    np.fill_diagonal(D, 0.0)
    V = variable_speed_null(D)
    assert np.allclose(V, V.T) and np.all(np.diagonal(V) == 0)
    assert np.abs(V - D).max() < 0.01 < np.abs(toeplitz_null(D) - D).max()
    lab = np.repeat([0, 1], [6, 6])
    B = D + 0.1 * (lab[:, None] != lab[None, :])
    assert np.abs(variable_speed_null(B) - B).max() > 0.04


def test_a_slowing_drift_fools_the_lag_only_null_but_not_the_variable_speed_null():
    """Eight data sets whose drift slows down with depth (no blocks): the lag contrast rejects the lag-only null in
    most of them (its known confound), while against the variable-speed null at most 2 of 8 are called significant
    at 0.05 by either statistic, at k = 2 and 3."""
    from raptor.phases import phase_null_test

    for k in (2, 3):
        tests = [phase_null_test(_slowing_drift(300 + s), k, 100, 0) for s in range(8)]
        assert sum(t["p_value"] < 0.05 for t in tests) >= 6, k
        p = np.array([[t["variable_speed_null"][m]["p_value"] for m in ("lag_contrast", "boundary_jump")]
                      for t in tests])
        assert (p < 0.05).sum(0).max() <= 2, (k, p)
        assert all(t["variable_speed_null"]["lag_contrast"]["null"] == "variable_speed" for t in tests)


def test_planted_blocks_on_a_slowing_drift_beat_the_variable_speed_null():
    from raptor.phases import phase_null_test

    lab = np.repeat([0, 1, 2], [4, 5, 3])
    X = _slowing_drift(5) * 0.5 + 0.05 * (lab[:, None] != lab[None, :])
    t = phase_null_test(X, 3, 200, 0)
    assert t["phases"] == [list(range(0, 4)), list(range(4, 9)), list(range(9, 12))]
    vs = t["variable_speed_null"]
    assert vs["lag_contrast"]["p_value"] < 0.01 and vs["boundary_jump"]["p_value"] < 0.01
    assert vs["lag_contrast"]["null_mean"] < vs["lag_contrast"]["value"]


@pytest.mark.parametrize("jump", [0.1, 0.3, 1.0])
def test_a_hard_change_point_is_not_absorbed_by_the_variable_speed_null(jump):
    """Two blocks on a linear drift, cut at mid-depth: however strong the jump, the variable-speed null (whose speed
    may change by at most 2x per layer) cannot put a spike of speed at the cut, so both statistics reject it."""
    from raptor.phases import phase_null_test

    n, rng = 12, np.random.default_rng(0)
    lab = np.repeat([0, 1], [6, 6])
    base = 0.03 * np.abs(np.subtract.outer(np.arange(n), np.arange(n))) + jump * (lab[:, None] != lab[None, :])
    X = np.clip(base + 0.01 * rng.normal(size=(20, n, n)), 0, None)
    X = (X + X.transpose(0, 2, 1)) / 2
    for m in X:
        np.fill_diagonal(m, 0.0)
    t = phase_null_test(X, 2, 60, 0)
    assert t["phases"] == [list(range(6)), list(range(6, 12))]
    vs = t["variable_speed_null"]
    assert vs["lag_contrast"]["p_value"] < 0.05 and vs["boundary_jump"]["p_value"] < 0.05, vs
