"""Perturbation recovery: noise of relative size ε at layer ℓ, the remaining layers re-run, and the angular distance
to the unperturbed run over depth (formula in :mod:`raptor.dynamics.metrics`). Both runs start from the same
state, so a lossy store (bfloat16) or a surrogate's own drift never counts as distance."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from raptor.dynamics.metrics import angle, contraction_ratios, perturb_tokens, unit

Runner = Callable[[torch.Tensor, int], torch.Tensor]  # (x at layer start, start) -> (B, L - start + 1, T, D)


def teacher_runner(teacher) -> Runner:
    @torch.no_grad()
    def run(x: torch.Tensor, start: int) -> torch.Tensor:
        outs = [x]
        for i in range(start, teacher.depth):
            x = teacher.run_block(i, x)
            outs.append(x)
        return torch.stack(outs, 1)

    return run


def surrogate_runner(model) -> Runner:
    @torch.no_grad()
    def run(x: torch.Tensor, start: int) -> torch.Tensor:
        return torch.stack([x] + model(x, start), 1)

    return run


def dilution(traj: torch.Tensor) -> torch.Tensor:
    """(B, n, T, D) reference run from the injection layer -> (n,): mean over images and tokens of ‖x_ℓ‖ / ‖x_t‖.
    The norm-growth baseline: an update that ignored the perturbation would shrink its angle by about this much."""
    n = traj.norm(dim=-1).double()
    return (n[:, :1] / n.clamp_min(1e-12)).mean((0, 2))


def recovery(run: Runner, states: dict[int, torch.Tensor], eps: list[float], layout, phases: list[list[int]], *,
             groups: list[str], seed: int = 0, batch_size: int = 16, bar=None, view=None) -> list[dict]:
    """For each injection layer ℓ (``states[ℓ]``: (N, T, D) tokens at layer ℓ) and each ε: the mean and std over
    images of the angular distance per token group at layers ℓ..L, and the contraction ratio of each phase crossed
    (on the ``all`` group), next to the norm-growth baseline (:func:`dilution`). ``view`` maps a run (B, n, T, D)
    to the space the distances are measured in (default: as is)."""
    view = view or (lambda t: t)
    out = []
    for ell in sorted(states):
        x_all = states[ell]
        g = torch.Generator().manual_seed(seed * 1000 + ell)
        per = {e: {grp: [] for grp in groups} for e in eps}
        dil = []
        for s in range(0, len(x_all), batch_size):
            x = x_all[s:s + batch_size].float()
            ref_raw = view(run(x, ell))
            dil.append(dilution(ref_raw) * len(x))
            ref = unit(ref_raw)
            for e in eps:
                pert = unit(view(run(perturb_tokens(x, e, g), ell)))
                for grp in groups:
                    sl = layout.group(grp)
                    per[e][grp].append(angle(pert[:, :, sl], ref[:, :, sl]).mean(-1).double())
            if bar is not None:
                bar.advance(len(x))
        base = (torch.stack(dil).sum(0) / len(x_all)).cpu().numpy()
        for e in eps:
            d = {grp: torch.cat(v).cpu().numpy() for grp, v in per[e].items()}
            mean_all = d["all"].mean(0)
            out.append({"layer": ell, "eps": e, "layers": list(range(ell, ell + len(mean_all))),
                        "distance": {grp: v.mean(0).tolist() for grp, v in d.items()},
                        "distance_std": {grp: v.std(0).tolist() for grp, v in d.items()},
                        "final_over_initial": float(mean_all[-1] / max(mean_all[0], 1e-12)),
                        "final_over_initial_per_image": (d["all"][:, -1] / np.maximum(d["all"][:, 0], 1e-12)
                                                         ).tolist(),
                        "baseline_norm_growth": base.tolist(),
                        "phases": contraction_ratios(mean_all, ell, phases)})
    return out


def summarize(rec: list[dict]) -> dict:
    """Self-correction over all injections: the fraction whose distance at the last layer is below the injected one,
    the fraction that also shrinks more than norm growth alone would, and the median contraction ratio per phase."""
    if not rec:
        return {}
    final = [r["final_over_initial"] for r in rec]
    beats = [r["final_over_initial"] < r["baseline_norm_growth"][-1] for r in rec]
    by_phase: dict[int, list[float]] = {}
    for r in rec:
        for p in r["phases"]:
            by_phase.setdefault(p["phase"], []).append(p["ratio"])
    return {"n_injections": len(rec), "fraction_recovering": float(np.mean([f < 1 for f in final])),
            "fraction_beating_norm_growth": float(np.mean(beats)),
            "median_final_over_initial": float(np.median(final)),
            "median_ratio_per_phase": {str(b): float(np.median(v)) for b, v in sorted(by_phase.items())}}
