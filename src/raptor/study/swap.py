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
