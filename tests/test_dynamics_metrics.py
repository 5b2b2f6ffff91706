"""Dynamics metrics on constructed trajectories with known answers."""

import math

import numpy as np
import pytest
import torch

from raptor.dynamics import metrics as M
from raptor.teachers.base import TokenLayout

LAYOUT = TokenLayout(1, 0, (2, 2))  # cls + 4 patches


def _rotation(theta: float, n_layers: int = 7, dim: int = 6, growth: float = 1.3) -> torch.Tensor:
    """Every token turns by ``theta`` per layer in its own plane while its norm grows: (1, n_layers, 5, dim)."""
    g = torch.Generator().manual_seed(0)
    traj = torch.zeros(1, n_layers, LAYOUT.n_tokens, dim)
    for t in range(LAYOUT.n_tokens):
        q, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g))
        for ell in range(n_layers):
            traj[0, ell, t] = growth ** ell * (math.cos(theta * ell) * q[:, 0] + math.sin(theta * ell) * q[:, 1])
    return traj


def test_rotation_at_a_known_speed():
    theta = 0.3
    traj = _rotation(theta)
    speed = M.angular_speed(traj, LAYOUT, "all")
    np.testing.assert_allclose(speed.numpy(), theta, atol=1e-6)  # norm growth does not count
    gamma = M.directional_convergence(traj, LAYOUT, "patches")
    np.testing.assert_allclose(gamma[0].numpy(), [math.cos(theta * (6 - ell)) for ell in range(7)], atol=1e-6)
    assert M.angular_speed(traj, LAYOUT, "cls").shape == (1, 6)


def test_rank_r_updates_have_stable_and_effective_rank_r():
    torch.manual_seed(0)
    T, D, r = 40, 32, 3
    x0 = torch.randn(1, 1, T, D, dtype=torch.float64)
    # Delta = U diag(1) V^T with orthonormal U (T x r), V (D x r): every singular value 1
    u, _ = torch.linalg.qr(torch.randn(T, r, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(D, r, dtype=torch.float64))
    traj = torch.cat([x0, x0 + (u @ v.T)[None, None]], dim=1)
    layout = TokenLayout(0, 0, (5, 8))
    ranks = M.update_ranks(traj, layout)
    assert ranks["stable_rank"].item() == pytest.approx(r, rel=1e-6)
    assert ranks["effective_rank"].item() == pytest.approx(r, rel=1e-6)
    # unequal spectrum (2, 1, 1): stable rank 6/4, effective rank exp(H(1/2, 1/4, 1/4))
    spectrum = torch.diag(torch.tensor([2.0, 1.0, 1.0], dtype=torch.float64))
    traj2 = torch.cat([x0, x0 + (u @ spectrum @ v.T)[None, None]], dim=1)
    r2 = M.update_ranks(traj2, layout)
    assert r2["stable_rank"].item() == pytest.approx(1.5, rel=1e-6)
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert r2["effective_rank"].item() == pytest.approx(math.exp(h), rel=1e-6)


def test_patch_coherence_known_values():
    traj = torch.zeros(1, 2, LAYOUT.n_tokens, 4)
    traj[0, 0, 1:] = torch.eye(4)           # four orthogonal patches: cos to their mean direction = 1/2
    traj[0, 1, 1:] = torch.tensor([3.0, 0, 0, 0])  # all aligned (any norm): 1
    kappa = M.patch_coherence(traj, LAYOUT)[0]
    assert kappa.tolist() == pytest.approx([0.5, 1.0])


def test_class_separability_and_boundary_jumps():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    y = np.repeat(np.arange(3), 20)
    feats = torch.from_numpy(centres[y] + rng.normal(size=(60, 8)) * 0.1)
    assert M.knn_accuracy(feats, y) == 1.0
    assert M.cosine_silhouette(feats, y) > 0.9
    shuffled = rng.permutation(y)
    assert M.knn_accuracy(feats, shuffled) < 0.6
    # speeds flat inside phases, a step at the boundary between layers 3 and 4
    speed = np.array([0.1, 0.1, 0.1, 0.5, 0.5, 0.52])  # step i produces layer i+1
    ratio = M.boundary_jump_ratio(speed, [[1, 2, 3], [4, 5, 6]])
    assert ratio == pytest.approx(0.4 / (0.02 / 4))
