"""The paper's three dynamics findings as explicit criteria: each finding is split into checks with a fixed threshold
(ours: the paper states its findings qualitatively; the same thresholds for every run and model). A finding
**holds** when all its checks hold, **does not hold** when none does, else **partly holds**. The tests of each
check against nulls (random-weight teachers, boundary permutations) are in :mod:`raptor.dynamics.verdicts`; the
plots and report.md in :mod:`raptor.dynamics.report`."""

from __future__ import annotations

import numpy as np

DEFINITIONS = {
    "gamma": "γ_ℓ = cos(x̂_ℓ, x̂_L) per token, mean over the group's tokens (paper)",
    "speed": "s_ℓ = angle(x̂_{ℓ+1}, x̂_ℓ) in radians per token, mean over the group's tokens (paper)",
    "coherence": "κ_ℓ = mean over patch tokens of cos(x̂_i, m̂), m̂ = normalised mean unit patch direction (ours)",
    "ranks": "per image, Δ_ℓ = x_{ℓ+1} − x_ℓ over all tokens × channels (and the unit-direction update "
             "x̂_{ℓ+1} − x̂_ℓ): stable rank ‖Δ‖_F²/‖Δ‖_2², entropy effective rank exp(H(σ/Σσ)) (ours)",
    "basins": "leave-one-out cosine kNN accuracy and cosine silhouette of the read-out direction (cls, or the mean "
              "patch without a cls token) per layer (ours)",
    "perturbation": "x' = x + ε‖x‖ξ/‖ξ‖ per token at layer ℓ, the rest re-run; d_t = mean angle between x̂'_t and "
                    "x̂_t over all tokens; phase contraction ratio = d at its last layer / d at its entry (ours)",
    "boundary_jump_ratio": "mean |s_ℓ − s_{ℓ−1}| across phase boundaries / within phases (ours)",
}


CRITERIA = {
    "i": ["γ (all tokens) rises on ≥ 80 % of steps",
          "γ is S-shaped (logistic R² ≥ 0.95, midpoint in 0.15 L..0.85 L, width ≤ L/8)",
          "class basins: kNN accuracy at the best layer ≥ 0.10 + that of the embedded pixels (layer-0 mean patch "
          "direction), silhouette there > 0",
          "self-correction: for ≥ 50 % of injections the angular distance at layer L is below the injected one and "
          "below the norm-growth baseline (the shrinkage norm growth alone would give)"],
    "ii": ["cls: the fastest step lies in the last third of depth and is ≥ 2× the median cls step",
           "patches: κ_L is the largest κ (within 0.01) and κ_L − κ at 2L/3 ≥ 0.05",
           "registers (if any): median register speed < median patch speed"],
    "iii": ["effective rank of unit-direction updates, mean over the last phase's steps ≤ 0.5 × the first phase's "
            "(thirds of depth when there is one phase)"],
}


NAMES = {"i": "directional convergence into class-dependent basins, with self-correction",
         "ii": "cls late sharp reorientation vs patch late coherence",
         "iii": "low-rank late updates"}


def _verdict(checks: list[dict]) -> str:
    ok = [c["holds"] for c in checks if c["holds"] is not None]
    if not ok:
        return "not measurable"
    return "holds" if all(ok) else "does not hold" if not any(ok) else "partly holds"


def _early_late(phases: list[list[int]], L: int) -> tuple[list[int], list[int]]:
    """Step indices (step i makes layer i + 1) of the first and last phase, or of the first and last third."""
    if len(phases) >= 2:
        return [t - 1 for t in phases[0]], [t - 1 for t in phases[-1]]
    third = max(1, L // 3)
    return list(range(third)), list(range(L - third, L))


def findings(m: dict, phases: list[list[int]], L: int) -> dict:
    """The three findings for one model's summary (see CRITERIA)."""
    g_all = np.asarray(m["gamma"]["all"]["mean"])
    rises = float(np.mean(np.diff(g_all) > 0))
    s = m["s_shape"]["all"]
    checks_i = [
        {"check": CRITERIA["i"][0], "value": rises, "holds": rises >= 0.8},
        {"check": CRITERIA["i"][1], "value": {"logistic_r2": s["logistic_r2"], "midpoint": s["midpoint"],
                                             "width": s["width"], "linear_r2": s["linear_r2"]}, "holds": s["s_shaped"]},
    ]
    b = m["basins"]
    if b.get("available"):
        knn = np.asarray(b["knn_accuracy"])
        best = int(np.argmax(knn))
        emb = b["embedded_baseline"]["knn_accuracy"]
        checks_i.append({"check": CRITERIA["i"][2], "value": {"embedded_pixels": emb, "best": float(knn[best]),
                                                             "best_layer": best, "final": float(knn[-1]),
                                                             "silhouette_best": b["silhouette"][best],
                                                             "majority_baseline": b["majority_baseline"]},
                         "holds": bool(knn[best] >= emb + 0.10 and b["silhouette"][best] > 0)})
    else:
        checks_i.append({"check": CRITERIA["i"][2], "value": b.get("reason"), "holds": None})
    pert = m.get("perturbation", {}).get("summary", {})
    value = {k: v for k, v in pert.items() if k != "median_ratio_per_phase"}
    checks_i.append({"check": CRITERIA["i"][3], "value": value,
                     "holds": bool(pert["fraction_recovering"] >= 0.5 and pert["fraction_beating_norm_growth"] >= 0.5)
                     if pert else None})

    cls_speed = np.asarray(m["speed"]["cls"]["mean"]) if "cls" in m["speed"] else None
    checks_ii = []
    if cls_speed is not None:
        fastest = int(np.argmax(cls_speed))
        ratio = float(cls_speed[fastest] / max(np.median(cls_speed), 1e-12))
        checks_ii.append({"check": CRITERIA["ii"][0], "value": {"fastest_step_to_layer": fastest + 1,
                                                               "speed": float(cls_speed[fastest]),
                                                               "over_median": ratio},
                          "holds": bool(fastest >= (2 * L) // 3 and ratio >= 2)})
    else:
        checks_ii.append({"check": CRITERIA["ii"][0], "value": "no cls token", "holds": None})
    kappa = np.asarray(m["coherence"]["mean"])
    k23 = kappa[(2 * L) // 3]
    checks_ii.append({"check": CRITERIA["ii"][1], "value": {"kappa_L": float(kappa[-1]), "kappa_2L/3": float(k23),
                                                           "kappa_max": float(kappa.max()),
                                                           "kappa_0": float(kappa[0])},
                      "holds": bool(kappa[-1] >= kappa.max() - 0.01 and kappa[-1] - k23 >= 0.05)})
    if "registers" in m["speed"]:
        reg, pat = np.median(m["speed"]["registers"]["mean"]), np.median(m["speed"]["patches"]["mean"])
        checks_ii.append({"check": CRITERIA["ii"][2], "value": {"registers": float(reg), "patches": float(pat)},
                          "holds": bool(reg < pat)})

    early, late = _early_late(phases, L)
    checks_iii = []
    if m["ranks"]:
        eff = np.asarray(m["ranks"]["effective_rank_directions"]["mean"])
        e, la = float(eff[early].mean()), float(eff[late].mean())
        value = {"early": e, "late": la, "late_over_early": la / max(e, 1e-12), "paper_late": "about 6",
                 "stable_rank_directions": {"early": float(np.mean(np.asarray(
                     m["ranks"]["stable_rank_directions"]["mean"])[early])), "late": float(np.mean(np.asarray(
                         m["ranks"]["stable_rank_directions"]["mean"])[late]))},
                 "effective_rank_raw": {"early": float(np.mean(np.asarray(m["ranks"]["effective_rank"]["mean"])
                                                               [early])),
                                        "late": float(np.mean(np.asarray(m["ranks"]["effective_rank"]["mean"])
                                                              [late]))},
                 "early_steps_to_layers": [i + 1 for i in early], "late_steps_to_layers": [i + 1 for i in late]}
        checks_iii.append({"check": CRITERIA["iii"][0], "value": value, "holds": bool(la <= 0.5 * e)})
    else:
        checks_iii.append({"check": CRITERIA["iii"][0], "value": "no ranks", "holds": None})
    out = {}
    for key, checks in (("i", checks_i), ("ii", checks_ii), ("iii", checks_iii)):
        out[key] = {"finding": NAMES[key], "verdict": _verdict(checks), "checks": checks}
    jump = m["speed_boundary_jump_ratio"].get("all")
    out["boundary_jumps"] = {"finding": "angular speed jumps at phase boundaries", "value": jump,
                             "verdict": "not measurable" if jump is None or not np.isfinite(jump) else
                             "holds" if jump > 1 else "does not hold", "check": "boundary jump ratio > 1"}
    return out
