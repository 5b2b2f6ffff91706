"""The layer-swap test (docs/method.md §8; the camera-ready's Figure 15): replace n layers of a trained ViT by other
layers of the same network, taken from the same phase (intra) or from another phase (inter), and measure accuracy.

A replacement of layer i by layer j runs block j where block i was (the weights of j, at i's position in depth).
For n = 1, 2, 3: ``samples`` random draws each of n distinct layers i (from phases with at least two layers, so that
an intra partner exists) and, for each, a partner j ≠ i drawn uniformly from i's phase (intra) or from the layers of
the other phases (inter). The paper's claim: intra swaps keep much of the accuracy, inter swaps collapse it.
"""

from __future__ import annotations

import numpy as np
import torch

from raptor.phases import contiguous_partitions


@torch.no_grad()
def head_top1(teacher, x: torch.Tensor, y: torch.Tensor, layout, body, batch: int = 256) -> float:
    """Top-1 of the teacher's own head on ``body(teacher.embed(images))``, the last-layer tokens of some network
    built on the teacher's embedding (the teacher with swapped blocks, a surrogate, ...)."""
    correct = 0
    for s in range(0, len(x), batch):
        correct += int((teacher.classify(body(teacher.embed(x[s:s + batch])), layout).argmax(1) ==
                        y[s:s + batch]).sum())
    return correct / max(1, len(x))


def swapped_accuracy(teacher, x: torch.Tensor, y: torch.Tensor, layout, mapping: dict[int, int]) -> float:
    """Top-1 of the teacher's head when block ``mapping.get(i, i)`` runs at position i (0-based blocks)."""
    def body(h):
        for i in range(teacher.depth):
            h = teacher.run_block(mapping.get(i, i), h)
        return h
    return head_top1(teacher, x, y, layout, body)


def layer_swap_test(teacher, x: torch.Tensor, y: torch.Tensor, layout, phases: list[list[int]], *,
                    n_swaps=(1, 2, 3), samples: int = 10, seed: int = 0) -> dict:
    """Accuracy of intra- and inter-phase swaps (mean ± std over samples) next to the unswapped accuracy.
    ``phases`` are lists of output layers 1..L; layer t is block t − 1."""
    rng = np.random.default_rng(seed)
    phase_of = {t: b for b, p in enumerate(phases) for t in p}
    movable = [t for p in phases if len(p) >= 2 for t in p]
    base = swapped_accuracy(teacher, x, y, layout, {})
    out = {"baseline_accuracy": base, "phases": phases, "samples": samples, "by_n": {}}
    for n in n_swaps:
        if len(movable) < n or len(phases) < 2:
            continue
        res = {}
        for kind in ("intra", "inter"):
            accs = []
            for _ in range(samples):
                layers = rng.choice(movable, n, replace=False)
                mapping = {}
                for t in layers:
                    pool = [u for u in phases[phase_of[t]] if u != t] if kind == "intra" else \
                        [u for u in phase_of if phase_of[u] != phase_of[t]]
                    mapping[int(t) - 1] = int(rng.choice(pool)) - 1
                accs.append(swapped_accuracy(teacher, x, y, layout, mapping))
            res[kind] = {"mean": float(np.mean(accs)), "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                         "all": accs}
        out["by_n"][str(n)] = res
    return out


# ---- depth-matched swaps: intra vs inter at equal depth distance, against contiguous partitions as the null -------

def single_swap_accuracies(teacher, x: torch.Tensor, y: torch.Tensor, layout) -> dict[tuple[int, int], float]:
    """Top-1 with block j run in place of block i, for every ordered pair of layers i != j (1-based output layers;
    L (L − 1) forward passes)."""
    L = teacher.depth
    return {(i, j): swapped_accuracy(teacher, x, y, layout, {i - 1: j - 1})
            for i in range(1, L + 1) for j in range(1, L + 1) if i != j}


def matched_swap_effect(acc: dict[tuple[int, int], float], phases: list[list[int]]) -> dict:
    """Intra- minus inter-phase swap accuracy compared at equal depth distance |i − j|: an intra-phase partner is
    closer in depth by construction, so the plain intra/inter contrast rewards any contiguous partition. Per lag
    with both kinds present: the mean accuracy of each; the effect is their difference averaged over those lags,
    weighted by min(n_intra, n_inter)."""
    phase_of = {t: b for b, p in enumerate(phases) for t in p}
    by_lag: dict[int, dict] = {}
    for (i, j), a in acc.items():
        d = by_lag.setdefault(abs(i - j), {"intra": [], "inter": []})
        d["intra" if phase_of[i] == phase_of[j] else "inter"].append(a)
    out, num, den = {}, 0.0, 0.0
    for lag in sorted(by_lag):
        d = by_lag[lag]
        if d["intra"] and d["inter"]:
            w = min(len(d["intra"]), len(d["inter"]))
            diff = float(np.mean(d["intra"]) - np.mean(d["inter"]))
            out[str(lag)] = {"intra": float(np.mean(d["intra"])), "inter": float(np.mean(d["inter"])),
                             "n_intra": len(d["intra"]), "n_inter": len(d["inter"]), "difference": diff}
            num, den = num + w * diff, den + w
    return {"effect": num / den if den else None, "by_lag": out}


def matched_swap_test(teacher, x: torch.Tensor, y: torch.Tensor, layout, phases: list[list[int]]) -> dict:
    """The matched effect of ``phases`` against every other contiguous partition of the same k (the null: phases
    that are contiguous but not found from similarity; computed from the same single-swap accuracies, so the null
    costs no forward pass). p = (1 + #null effects >= observed) / (1 + #null)."""
    L, k = teacher.depth, len(phases)
    acc = single_swap_accuracies(teacher, x, y, layout)
    obs = matched_swap_effect(acc, phases)
    null = [e for part in contiguous_partitions(L, k) if part != phases
            for e in [matched_swap_effect(acc, part)["effect"]] if e is not None]
    null_arr = np.array(null)
    eff = obs["effect"]
    return {"phases": phases, "effect": eff, "by_lag": obs["by_lag"],
            "baseline_accuracy": swapped_accuracy(teacher, x, y, layout, {}),
            "null": "every other contiguous partition of the same k, on the same swaps",
            "null_n": len(null), "null_mean": float(null_arr.mean()) if null else None,
            "null_std": float(null_arr.std(ddof=1)) if len(null) > 1 else None,
            "p_value": float((1 + (null_arr >= eff).sum()) / (1 + len(null))) if null and eff is not None else None,
            "unmatched_contrast": _unmatched(acc, phases)}


def _unmatched(acc: dict[tuple[int, int], float], phases: list[list[int]]) -> float | None:
    """The plain intra − inter mean over all single swaps (no depth matching), for comparison."""
    phase_of = {t: b for b, p in enumerate(phases) for t in p}
    intra = [a for (i, j), a in acc.items() if phase_of[i] == phase_of[j]]
    inter = [a for (i, j), a in acc.items() if phase_of[i] != phase_of[j]]
    return float(np.mean(intra) - np.mean(inter)) if intra and inter else None
