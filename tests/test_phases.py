"""Phases: planted blocks are recovered, DP = brute force, max-cut = exhaustive search, metrics behave."""

import itertools

import numpy as np
import pytest

from raptor.errors import RaptorError
from raptor.phases import (brute_force_contiguous, choose_k, contiguous_segmentation, cut_weight, is_contiguous,
                           max_cut_bruteforce, phase_metrics, recursive_max_cut)


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
    side, val = max_cut_bruteforce(W, min_size=min_size, chunk=37)  # small chunks exercise the chunk loop
    assert not side[0]
    assert abs(val - cut_weight(W, side)) <= 1e-9
    assert abs(val - _exhaustive_max_cut(W, min_size)) <= 1e-9


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
    D, _ = planted((3, 3))
    with pytest.raises(RaptorError):
        choose_k(contiguous_segmentation(D, 3), "magic")
