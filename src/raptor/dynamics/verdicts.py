"""The dynamics findings as tests: for each operationalisation an effect, a bootstrap CI over images, a p-value against
a stated null, and a verdict (``holds``: the effect lies in the claimed direction with p < 0.05).

Two kinds of null:

- **a reference value** the effect must beat on the same images (0 change, a same-shape Gaussian's rank ratio of 1,
  the embedded pixels' kNN, norm growth): paired bootstrap over images, p = share of resamples on the wrong side;
- **random-weight teachers**: the same architecture and embedding with freshly initialised blocks, run on the same
  images (``draws`` of them). A residual stream converges in direction and coheres even with random blocks, so an
  effect counts only beyond theirs. Is the teacher's value a plausible new draw? A prediction-interval test:
  t = (teacher − mean of the n draws) / sqrt(bootstrap variance + s²(1 + 1/n)), s the draws' sample std, one-sided
  Student p with n − 1 degrees of freedom (normal with one draw, where s is unknown and taken as 0).

Each finding is computed under several operationalisations (the paper leaves them open); the p-values of all tests
of one model are Holm-corrected together, and the robustness table says which verdicts hold under all of them and
which flip. Per-image quantities come from
:class:`raptor.dynamics.accumulate.DynamicsAccumulator` results.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from raptor.dynamics.criteria import _early_late
from raptor.dynamics.metrics import boundary_jump_ratio
from raptor.phases import contiguous_partitions

ALPHA = 0.05
N_BOOT = 2000


def random_weight_teacher(teacher, seed: int):
    """A copy of ``teacher`` whose blocks are freshly initialised (seeded): with the architecture's own initialiser
    where the teacher wraps an HF model (``_init_weights``: truncated-normal linear layers, LayerScale at the config's
    ``layerscale_value``), else every submodule's ``reset_parameters``. The embedding, final norm and head stay the
    teacher's, so the null sees the same inputs. The weights are drawn on the CPU and moved to the teacher's device,
    so a GPU run tests against the same nulls as a CPU run."""
    device = next(teacher.parameters()).device
    null = copy.deepcopy(teacher).cpu()
    init = getattr(getattr(null, "model", None), "_init_weights", None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for blk in null.blocks:
            if init is not None:
                blk.apply(init)
            else:
                for m in blk.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
    return null.to(device).eval()


def _boot_means(x: np.ndarray, seed: int, n: int = N_BOOT) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), (n, len(x)))
    return x[idx].mean(1)


def against_reference(values: np.ndarray, reference: float | np.ndarray, direction: str, null: str,
                      seed: int = 0) -> dict:
    """Per-image ``values`` against a reference (a number, or per-image values on the same images): the effect is
    the mean of values − reference, with its bootstrap CI and the one-sided p-value in ``direction``
    ('greater' / 'less')."""
    d = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return {"effect": None, "ci95": None, "p_value": None, "null": null, "n": int(len(d)),
                "verdict": "not measurable"}
    boots = _boot_means(d, seed)
    wrong = (boots <= 0) if direction == "greater" else (boots >= 0)
    p = float((1 + wrong.sum()) / (1 + len(boots)))
    eff = float(d.mean())
    ok = p < ALPHA and (eff > 0 if direction == "greater" else eff < 0)
    return {"effect": eff, "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
            "p_value": p, "null": null, "direction": direction, "n": int(len(d)),
            "verdict": "holds" if ok else "does not hold"}


def against_draws(values: np.ndarray, draws: list[np.ndarray], direction: str, seed: int = 0) -> dict:
    """Per-image ``values`` of the teacher against the same quantity of random-weight teachers (one array per draw,
    same images): z over the image bootstrap and the draws' spread."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    means = [float(np.nanmean(d)) for d in draws if np.isfinite(d).any()]
    if len(v) < 2 or not means:
        return {"effect": None, "ci95": None, "p_value": None, "null": "random-weight teachers", "n": int(len(v)),
                "verdict": "not measurable"}
    boots = _boot_means(v, seed)
    mu_null, n = float(np.mean(means)), len(means)
    var = float(boots.var(ddof=1)) + (float(np.var(means, ddof=1)) * (1 + 1 / n) if n > 1 else 0.0)
    eff = float(v.mean()) - mu_null
    t = eff / math.sqrt(var) if var > 0 else (math.copysign(math.inf, eff) if eff else 0.0)
    t = t if direction == "greater" else -t
    if n > 1:
        from scipy.stats import t as student

        p = float(student.sf(t, n - 1))
    else:
        p = 0.5 * math.erfc(t / math.sqrt(2))
    ok = p < ALPHA and (eff > 0 if direction == "greater" else eff < 0)
    verdict = ("holds" if ok else "does not hold") if n > 1 else "not measurable"  # one draw: its spread is unknown
    return {"effect": eff, "teacher": float(v.mean()), "null_mean": mu_null, "null_draws": means,
            "ci95": [float(np.percentile(boots, 2.5)) - mu_null, float(np.percentile(boots, 97.5)) - mu_null],
            "p_value": float(p), "null": f"random-weight teachers ({n} draws)", "direction": direction,
            "n": int(len(v)), "verdict": verdict}


# ---- per-image quantities ----------------------------------------------------------------------------------------

def _rise_fraction(gamma: np.ndarray) -> np.ndarray:
    """(n, layers) -> per image: the share of steps on which γ rises."""
    return (np.diff(gamma, axis=1) > 0).mean(1)


def _late_cls_peak(speed: np.ndarray, L: int, drop_last: bool) -> np.ndarray:
    """Per image: log of (the fastest cls step in the last third of depth / the median cls step); with
    ``drop_last`` the step into layer L is left out (it is one layer, the paper's own caveat)."""
    s = speed[:, :-1] if drop_last else speed
    late = s[:, min((2 * L) // 3, s.shape[1] - 1):]
    return np.log(late.max(1) / np.maximum(np.median(s, axis=1), 1e-12))


def _late_coherence(kappa: np.ndarray, L: int, drop_last: bool) -> np.ndarray:
    """Per image: κ at layer L (L − 1 with ``drop_last``) minus κ at 2L/3."""
    return kappa[:, L - 1 if drop_last else L] - kappa[:, (2 * L) // 3]


def _rank_ratio(ranks: np.ndarray, early: list[int], late: list[int]) -> np.ndarray:
    """Per image: log(mean rank of the late steps / mean rank of the early steps)."""
    return np.log(ranks[:, late].mean(1) / np.maximum(ranks[:, early].mean(1), 1e-12))


def _recovery(runs: list[dict], baseline: bool) -> np.ndarray:
    """Per image: log(d_L / d_injected), minus log(norm growth) with ``baseline`` (Euclidean gain beyond what norm
    growth alone shrinks), averaged over the injections (layers and ε) so that each image counts once."""
    out = []
    for r in runs:
        x = np.log(np.maximum(np.asarray(r["final_over_initial_per_image"]), 1e-12))
        if baseline:
            x = x - math.log(max(r["baseline_norm_growth"][-1], 1e-12))
        out.append(x)
    return np.mean(out, axis=0) if out else np.zeros(0)


def boundary_permutation(speed: np.ndarray, phases: list[list[int]], seed: int = 0) -> dict:
    """The speed boundary-jump ratio of ``phases`` against every other contiguous partition of the same k (the
    null: boundaries placed anywhere), on the mean speed; CI by resampling images."""
    L, k = speed.shape[1], len(phases)
    mean = speed.mean(0)
    obs = boundary_jump_ratio(mean, phases)
    null = [r for part in contiguous_partitions(L, k) if part != phases
            for r in [boundary_jump_ratio(mean, part)] if np.isfinite(r)]
    if not np.isfinite(obs) or not null:
        return {"effect": None, "ci95": None, "p_value": None, "null": "every other contiguous partition",
                "verdict": "not measurable"}
    rng = np.random.default_rng(seed)
    boots = [boundary_jump_ratio(speed[rng.integers(0, len(speed), len(speed))].mean(0), phases) for _ in range(500)]
    p = float((1 + sum(r >= obs for r in null)) / (1 + len(null)))
    return {"effect": float(obs), "ci95": [float(np.nanpercentile(boots, 2.5)), float(np.nanpercentile(boots, 97.5))],
            "null_mean": float(np.mean(null)), "null_n": len(null), "p_value": p,
            "min_p": 1 / (1 + len(null)),  # k = 2 of 12 layers: at most 10 others, 1/11: never below 0.05 there
            "null": f"every other contiguous partition of k = {k} ({len(null)})", "direction": "greater",
            "verdict": "holds" if p < ALPHA else "does not hold"}


def verdicts(res: dict, nulls: list[dict], recovery: dict, phases: list[list[int]], L: int,
             basins: dict | None = None, seed: int = 0) -> dict:
    """Every finding under every operationalisation. ``res``: one model's accumulator result; ``nulls``: those of the
    random-weight teachers on the same images; ``recovery``: {"model": runs, "nulls": [runs per draw]};
    ``basins``: {"correct_best": per-image bool, "correct_embedded": per-image bool, "null_correct_best": [...]}."""
    early, late = _early_late(phases, L)
    out: dict = {}

    def both(name, finding, operationalisation, values, null_values, direction, reference=None, ref_name=None):
        row = {"finding": finding, "operationalisation": operationalisation}
        if reference is not None:
            row["against_reference"] = against_reference(values, reference, direction, ref_name, seed)
        if null_values:
            row["against_random_weights"] = against_draws(values, null_values, direction, seed)
        tests = [t for t in (row.get("against_reference"), row.get("against_random_weights")) if t]
        row["verdict"] = "holds" if tests and all(t["verdict"] == "holds" for t in tests) else \
            "not measurable" if all(t["verdict"] == "not measurable" for t in tests) else "does not hold"
        out[name] = row

    g = "all"
    both("i_gamma_L", "i", "γ against layer L rises (share of rising steps per image)",
         _rise_fraction(res["gamma"][g]), [_rise_fraction(n["gamma"][g]) for n in nulls], "greater")
    both("i_gamma_Lm1", "i", "γ against layer L − 1 rises (the last layer left out)",
         _rise_fraction(res["gamma_prev"][g]), [_rise_fraction(n["gamma_prev"][g]) for n in nulls], "greater")
    if basins and basins.get("correct_best") is not None:
        both("i_basins", "i", "class basins: LOO kNN right at the best layer, minus the embedded pixels (per image)",
             basins["correct_best"].astype(float), [c.astype(float) for c in basins.get("null_correct_best", [])],
             "greater", basins["correct_embedded"].astype(float), "the embedded pixels (layer-0 mean patch)")
    if recovery.get("model"):
        both("i_recovery_angular", "i", "self-correction, angular: log(d_L / d_injected) < 0",
             _recovery(recovery["model"], False), [_recovery(r, False) for r in recovery.get("nulls", [])], "less",
             0.0, "no change of the injected angle")
        both("i_recovery_euclidean", "i", "self-correction beyond norm growth: log(d_L / d_injected) − log(norm "
             "growth) < 0", _recovery(recovery["model"], True), [_recovery(r, True) for r in recovery.get("nulls", [])],
             "less", 0.0, "the shrinkage norm growth alone gives")
    if "cls" in res["speed"]:
        for drop in (False, True):
            both(f"ii_cls_late{'_no_last' if drop else ''}", "ii",
                 "cls: fastest step of the last third / median step (log)" + (", the step into L left out" if drop
                                                                                else ""),
                 _late_cls_peak(res["speed"]["cls"], L, drop), [_late_cls_peak(n["speed"]["cls"], L, drop)
                                                                 for n in nulls], "greater")
    for drop in (False, True):
        both(f"ii_coherence{'_no_last' if drop else ''}", "ii",
             f"patches: κ at layer {'L − 1' if drop else 'L'} − κ at 2L/3",
             _late_coherence(res["coherence"], L, drop), [_late_coherence(n["coherence"], L, drop) for n in nulls],
             "greater")
    for kind, label in (("effective_rank", "raw updates"), ("effective_rank_directions", "unit-direction updates"),
                        ("effective_rank_centred", "token-centred updates")):
        if res["ranks"].get(kind) is not None and len(res["ranks"][kind]):
            both(f"iii_{kind}", "iii", f"late / early effective rank of the {label} (log) < 0",
                 _rank_ratio(res["ranks"][kind], early, late),
                 [_rank_ratio(n["ranks"][kind], early, late) for n in nulls if len(n["ranks"].get(kind, []))],
                 "less", 0.0, "a same-shape Gaussian update (ratio 1)")
    if len(phases) >= 2:
        out["boundary_jumps"] = {"finding": "boundary_jumps", "operationalisation": "speed boundary-jump ratio "
                                 "(all tokens) against every other contiguous partition",
                                 "against_partitions": boundary_permutation(res["speed"][g], phases, seed)}
    _holm(out)
    return out


TESTS = ("against_reference", "against_random_weights", "against_partitions")


def _holm(rows: dict) -> None:
    """Holm's step-down correction over every test of one model (all findings and operationalisations): a model
    tested a dozen ways would otherwise pass one at α = 0.05 by chance. Each test gets ``p_holm`` and its verdict
    from it; a row holds when all its tests hold."""
    tests = [row[k] for row in rows.values() for k in TESTS if row.get(k) and row[k].get("p_value") is not None]
    m = len(tests)
    running = 0.0
    for i, t in enumerate(sorted(tests, key=lambda t: t["p_value"])):
        running = max(running, min(1.0, (m - i) * t["p_value"]))
        t["p_holm"] = running
        if t["verdict"] != "not measurable":
            eff = t.get("effect")
            right = eff is not None and (eff < 0 if t.get("direction") == "less" else eff > 0)
            t["verdict"] = "holds" if running < ALPHA and right else "does not hold"
    for row in rows.values():
        ts = [row[k] for k in TESTS if row.get(k)]
        row["verdict"] = "holds" if ts and all(t["verdict"] == "holds" for t in ts) else \
            "not measurable" if all(t["verdict"] == "not measurable" for t in ts) else "does not hold"


def robustness(v: dict) -> dict:
    """Per finding: the verdict of each operationalisation, and whether they agree."""
    by: dict[str, list] = {}
    for name, row in v.items():
        by.setdefault(row["finding"], []).append((name, row["verdict"]))
    out = {}
    for f, rows in by.items():
        kinds = {vv for _, vv in rows if vv != "not measurable"}
        out[f] = {"verdicts": dict(rows), "robust": len(kinds) <= 1,
                  "summary": (next(iter(kinds)) + " under every operationalisation") if len(kinds) == 1 else
                  "flips with the operationalisation" if kinds else "not measurable"}
    return out


def surrogate_agreement(teacher: dict, surrogate: dict, seed: int = 0, n_boot: int = 500) -> dict:
    """How closely the surrogate's mean curves follow the teacher's, on the same images: Pearson r over layers and
    the largest absolute gap, each with and without the last layer (for γ, the last point is 1 for both by
    definition, and this teacher's last step is an outlier), r with a bootstrap CI over images."""
    curves = {f"gamma {g}": "gamma" for g in teacher["gamma"]} | {f"speed {g}": "speed" for g in teacher["speed"]}
    curves["coherence"] = "coherence"
    curves |= {k.replace("_", " "): "ranks" for k in ("effective_rank", "effective_rank_directions",
                                                       "effective_rank_centred") if len(teacher["ranks"].get(k, []))}
    rng = np.random.default_rng(seed)
    out = {}
    for name, kind in curves.items():
        key = name.split(" ", 1)[1] if kind in ("gamma", "speed") else name.replace(" ", "_")
        a = teacher[kind] if kind == "coherence" else teacher[kind][key]
        b = surrogate[kind] if kind == "coherence" else surrogate[kind][key]
        n = min(len(a), len(b))
        a, b = np.asarray(a[:n], float), np.asarray(b[:n], float)
        row = {}
        for label, sl in (("all layers", slice(None)), ("without the last layer", slice(None, -1))):
            ma, mb = a[:, sl].mean(0), b[:, sl].mean(0)
            if len(ma) < 3 or np.ptp(ma) == 0 or np.ptp(mb) == 0:
                row[label] = {"r": None, "ci95": None, "max_abs_gap": float(np.abs(ma - mb).max()) if len(ma) else None}
                continue
            boots = []
            for _ in range(n_boot):
                i = rng.integers(0, n, n)
                x, y = a[i][:, sl].mean(0), b[i][:, sl].mean(0)
                if np.ptp(x) > 0 and np.ptp(y) > 0:
                    boots.append(np.corrcoef(x, y)[0, 1])
            row[label] = {"r": float(np.corrcoef(ma, mb)[0, 1]),
                          "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots
                          else None, "max_abs_gap": float(np.abs(ma - mb).max())}
        out[name] = row
    return out
