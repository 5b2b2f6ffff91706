"""Dynamics metrics over trajectories (batch, layers, tokens, dim), each with its formula (docs/method.md §9; where the
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
- **Perturbation recovery** (ours: the paper gives no protocol): every token of the state at layer ℓ gets noise of
  relative size ε, x' = x + ε‖x‖ ξ/‖ξ‖ with ξ ~ N(0, I); the remaining layers run on x' and on x, and
  d_t = mean over tokens of the angle between x̂'_t and x̂_t. A phase's **contraction ratio** is d at its last layer
  over d at its entry layer (its first layer − 1, or ℓ inside the injected phase); < 1 means it self-corrects.
- **S-shape** of γ (ours): a logistic a + b/(1 + exp(−(ℓ − c)/w)) fitted by least squares; S-shaped when it fits
  with R² ≥ 0.95, its midpoint c lies in the middle 70 % of depth (0.15 L ≤ c ≤ 0.85 L) and it is curved: width
  w ≤ L/8, so the 10–90 % rise (4.4 w) spans at most 55 % of depth (a straight line is not an S).

Angles are computed as 2 asin(‖û − v̂‖ / 2), which equals arccos(û·v̂) but keeps its precision for small angles.
"""

from __future__ import annotations

import numpy as np
import torch

EPS = 1e-12


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def angle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Angle in radians between unit vectors along the last axis (stable for small angles)."""
    return 2 * torch.asin(((u - v).norm(dim=-1) / 2).clamp(max=1.0))


def gamma_of_units(u: torch.Tensor) -> torch.Tensor:
    """(B, n, T, D) unit directions -> (B, n): mean over tokens of cos(x̂_ℓ, x̂_last)."""
    return (u * u[:, -1:]).sum(-1).mean(-1)


def speed_of_units(u: torch.Tensor) -> torch.Tensor:
    """(B, n, T, D) unit directions -> (B, n - 1): mean over tokens of the angle between consecutive layers."""
    return angle(u[:, 1:], u[:, :-1]).mean(-1)


def coherence_of_units(u: torch.Tensor) -> torch.Tensor:
    """(B, n, P, D) unit patch directions -> (B, n): mean cosine to the normalised mean patch direction."""
    return (u * unit(u.mean(2, keepdim=True))).sum(-1).mean(-1)


def _group(traj: torch.Tensor, layout, group: str) -> torch.Tensor:
    return traj[:, :, layout.group(group)]


def directional_convergence(traj: torch.Tensor, layout, group: str = "all") -> torch.Tensor:
    """(B, n_layers): mean over the group's tokens of cos(x̂_ℓ, x̂_last)."""
    return gamma_of_units(unit(_group(traj, layout, group).double()))


def angular_speed(traj: torch.Tensor, layout, group: str = "all") -> torch.Tensor:
    """(B, n_layers - 1): mean over the group's tokens of arccos cos(x̂_{ℓ+1}, x̂_ℓ), radians."""
    return speed_of_units(unit(_group(traj, layout, group).double()))


def patch_coherence(traj: torch.Tensor, layout) -> torch.Tensor:
    """(B, n_layers): mean cosine of each unit patch direction to the normalised mean patch direction."""
    return coherence_of_units(unit(traj[:, :, layout.patches].double()))


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of a batch of matrices (..., m, n), from the float64 Gram matrix of the smaller
    side: 3-5x faster than an SVD on a CPU and as accurate for rank statistics (errors ~1e-8 of σ_max)."""
    a = a.double()
    g = a @ a.transpose(-1, -2) if a.shape[-2] <= a.shape[-1] else a.transpose(-1, -2) @ a
    return torch.linalg.eigvalsh(g).clamp_min(0).sqrt().flip(-1)


def spectrum_ranks(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    stable, eff = spectrum_ranks(singular_values(delta))
    return {"stable_rank": stable, "effective_rank": eff}


def knn_correct(feats: torch.Tensor, labels: np.ndarray, k: int = 5) -> np.ndarray:
    """Per image: is its leave-one-out k-NN class under cosine similarity right (majority vote, ties to the nearest
    neighbour's class)?"""
    u = unit(feats.double())
    sim = u @ u.T
    sim.fill_diagonal_(-np.inf)
    k = min(k, len(u) - 1)
    nn = sim.topk(k, dim=1).indices.numpy()
    y = np.asarray(labels)
    out = np.zeros(len(u), dtype=bool)
    for i, row in enumerate(nn):
        votes = np.bincount(y[row], minlength=y.max() + 1)
        best = np.flatnonzero(votes == votes.max())
        pred = y[row[0]] if y[row[0]] in best else best[0]
        out[i] = pred == y[i]
    return out


def knn_accuracy(feats: torch.Tensor, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy under cosine similarity (:func:`knn_correct`, averaged)."""
    return float(knn_correct(feats, labels, k).mean())


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


def perturb_tokens(x: torch.Tensor, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + ε‖x‖ ξ/‖ξ‖ per token (ξ ~ N(0, I)): noise of relative size ε; the angle it opens is about atan(ε)."""
    xi = torch.randn(x.shape, generator=generator, dtype=x.dtype,  # on the generator's device, then moved
                     device=generator.device if generator is not None else x.device).to(x.device)
    return x + eps * x.norm(dim=-1, keepdim=True) * unit(xi)


def contraction_ratios(dist: np.ndarray, start: int, phases: list[list[int]]) -> list[dict]:
    """Per phase that the perturbed run crosses: d at the phase's last layer over d at its entry layer.

    ``dist[i]`` is the angular distance at layer ``start + i`` (noise injected at layer ``start``). A phase of
    output layers p is entered at layer p[0] − 1 (or at ``start`` when the noise lands inside it); phases that end at
    or before ``start`` are skipped. ``per_step`` is the geometric-mean ratio per layer."""
    out = []
    for b, p in enumerate(phases):
        exit_ = p[-1]
        if exit_ <= start:
            continue
        entry = max(p[0] - 1, start)
        d0, d1 = float(dist[entry - start]), float(dist[exit_ - start])
        ratio = d1 / max(d0, EPS)
        out.append({"phase": b, "layers": [entry, exit_], "d_entry": d0, "d_exit": d1, "ratio": ratio,
                    "per_step": ratio ** (1.0 / (exit_ - entry))})
    return out


def logistic(x: np.ndarray, a: float, b: float, c: float, w: float) -> np.ndarray:
    return a + b / (1 + np.exp(-(x - c) / w))


def s_shape(gamma: np.ndarray) -> dict:
    """Least-squares logistic fit of γ over layers 0..L (see the module doc) next to a straight line."""
    import warnings

    from scipy.optimize import OptimizeWarning, curve_fit

    y = np.asarray(gamma, dtype=np.float64)
    x = np.arange(len(y), dtype=np.float64)
    L = len(y) - 1
    ss = float(((y - y.mean()) ** 2).sum()) or EPS
    line = np.polyval(np.polyfit(x, y, 1), x)
    best = None
    for c0 in (0.25 * L, 0.5 * L, 0.75 * L, 0.95 * L):  # a few starts: the fit is not convex
        for w0 in (0.5, 1.5, L / 4):
            try:
                with warnings.catch_warnings():  # a flat γ has no parameter covariance: not the user's concern
                    warnings.simplefilter("ignore", OptimizeWarning)
                    p, _ = curve_fit(logistic, x, y, p0=[y.min(), max(y.max() - y.min(), 1e-3), c0, w0], maxfev=4000,
                                     bounds=([-2, 0, -L, 0.05], [2, 4, 2 * L, 4 * L]))
            except (RuntimeError, ValueError):
                continue
            r2 = 1 - float(((y - logistic(x, *p)) ** 2).sum()) / ss
            if best is None or r2 > best[0]:
                best = (r2, p)
    if best is None:
        return {"logistic_r2": float("nan"), "linear_r2": 1 - float(((y - line) ** 2).sum()) / ss,
                "midpoint": float("nan"), "width": float("nan"), "s_shaped": False}
    r2, (a, b, c, w) = best
    return {"logistic_r2": r2, "linear_r2": 1 - float(((y - line) ** 2).sum()) / ss, "midpoint": float(c),
            "width": float(w), "s_shaped": bool(r2 >= 0.95 and 0.15 * L <= c <= 0.85 * L and w <= L / 8)}


def pca_2d(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows -> their first two principal-component coordinates and the explained-variance fractions."""
    x = np.asarray(u, dtype=np.float64)
    x = x - x.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    var = s ** 2 / max(float((s ** 2).sum()), EPS)
    return x @ vt[:2].T, var[:2]
