"""Dynamics metrics over trajectories (batch, layers, tokens, dim), each with its formula (PAPER.md §6; where the
paper gives none, the definition below is ours and says so).

Directions: x̂ = x / ‖x‖ per token (token norms grow with depth, so Euclidean distances are not comparable across
layers). A token group is ``cls``, ``registers``, ``patches`` or ``all`` of a :class:`TokenLayout`.

- **Directional convergence** γ_ℓ = cos(x̂_ℓ, x̂_L), per token, averaged over the group's tokens (paper).
- **Angular speed** s_ℓ = arccos cos(x̂_{ℓ+1}, x̂_ℓ) in radians, per token, averaged over the group (paper).
- **Patch coherence** κ_ℓ = mean over patch tokens of cos(x̂_i, m̂), m̂ = the normalised mean of the unit patch
  directions (ours: the paper gives no formula).
- **Update rank** of Δ_ℓ = x_{ℓ+1} − x_ℓ (tokens × channels, per image; also for unit directions,
  x̂_{ℓ+1} − x̂_ℓ): stable rank ‖Δ‖_F² / ‖Δ‖_2² and entropy effective rank exp(H(p)), p_i = σ_i / Σσ
  (Roy & Vetterli 2007) (ours: the paper names "stable rank (or effective rank)" without the matrix).
- **Class separability** of a layer's directions: leave-one-out k-nearest-neighbour accuracy under cosine
  similarity, and the cosine silhouette (ours).
- **Speed jumps at phase boundaries**: the mean |s_ℓ − s_{ℓ−1}| across a boundary over the mean within phases
  (ours).
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-12


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def _group(traj: torch.Tensor, layout, group: str) -> torch.Tensor:
    return traj[:, :, layout.group(group)]


def directional_convergence(traj: torch.Tensor, layout, group: str = "all") -> torch.Tensor:
    """(B, n_layers): mean over the group's tokens of cos(x̂_ℓ, x̂_last)."""
    u = unit(_group(traj, layout, group).double())
    return (u * u[:, -1:]).sum(-1).mean(-1)


def angular_speed(traj: torch.Tensor, layout, group: str = "all") -> torch.Tensor:
    """(B, n_layers - 1): mean over the group's tokens of arccos cos(x̂_{ℓ+1}, x̂_ℓ), radians."""
    u = unit(_group(traj, layout, group).double())
    c = (u[:, 1:] * u[:, :-1]).sum(-1).clamp(-1, 1)
    return torch.arccos(c).mean(-1)


def patch_coherence(traj: torch.Tensor, layout) -> torch.Tensor:
    """(B, n_layers): mean cosine of each unit patch direction to the normalised mean patch direction."""
    u = unit(traj[:, :, layout.patches].double())
    m = unit(u.mean(2, keepdim=True))
    return (u * m).sum(-1).mean(-1)


def _spectrum_ranks(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values (..., k) -> (stable rank, entropy effective rank)."""
    stable = (s ** 2).sum(-1) / (s[..., 0] ** 2).clamp_min(EPS)
    p = s / s.sum(-1, keepdim=True).clamp_min(EPS)
    h = -(p * torch.log(p.clamp_min(EPS))).sum(-1)
    return stable, torch.exp(h)


def update_ranks(traj: torch.Tensor, layout, group: str = "all", directions: bool = False) -> dict:
    """Per image and layer step: stable and entropy effective rank of Δ_ℓ (tokens × channels); (B, n_layers - 1)
    each. ``directions``: of x̂_{ℓ+1} − x̂_ℓ instead."""
    x = _group(traj, layout, group).double()
    if directions:
        x = unit(x)
    delta = x[:, 1:] - x[:, :-1]
    s = torch.linalg.svdvals(delta)
    stable, eff = _spectrum_ranks(s)
    return {"stable_rank": stable, "effective_rank": eff}


def knn_accuracy(feats: torch.Tensor, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy under cosine similarity (majority vote, ties to the nearest neighbour's class)."""
    u = unit(feats.double())
    sim = u @ u.T
    sim.fill_diagonal_(-np.inf)
    k = min(k, len(u) - 1)
    nn = sim.topk(k, dim=1).indices.numpy()
    y = np.asarray(labels)
    correct = 0
    for i, row in enumerate(nn):
        votes = np.bincount(y[row], minlength=y.max() + 1)
        best = np.flatnonzero(votes == votes.max())
        pred = y[row[0]] if y[row[0]] in best else best[0]
        correct += int(pred == y[i])
    return correct / len(u)


def cosine_silhouette(feats: torch.Tensor, labels: np.ndarray) -> float:
    """Mean silhouette with cosine distance (1 − cos); sklearn's definition."""
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(unit(feats.double()).numpy(), np.asarray(labels), metric="cosine"))


def boundary_jump_ratio(speed: np.ndarray, phases: list[list[int]]) -> float:
    """Mean |s_ℓ − s_{ℓ−1}| over consecutive steps that straddle a phase boundary, divided by the mean over steps
    inside a phase. ``speed[i]`` is the step from layer i to i+1 (layers 0..L), phases are lists of output layers;
    the step producing layer t belongs to the phase of t. > 1: speed changes more at boundaries."""
    phase_of = {t: b for b, p in enumerate(phases) for t in p}
    steps = [t for t in range(1, len(speed) + 1) if t in phase_of]
    across, within = [], []
    for a, b in zip(steps[:-1], steps[1:]):
        d = abs(float(speed[b - 1]) - float(speed[a - 1]))
        (across if phase_of[a] != phase_of[b] else within).append(d)
    if not across or not within:
        return float("nan")
    return float(np.mean(across) / max(np.mean(within), EPS))
