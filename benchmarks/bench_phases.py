"""Phase and similarity benchmarks: DP contiguous segmentation at ViT-g depth, brute-force max-cut cost, and the
overhead of the one-pass similarity accumulation on top of the teacher's forward pass.

Run: .venv/bin/python benchmarks/bench_phases.py
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import save, timeit  # noqa: E402
from raptor.phases import contiguous_segmentation, max_cut_bruteforce  # noqa: E402


def random_distance(L: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    A = rng.uniform(0, 1, (L, L))
    D = (A + A.T) / 2
    np.fill_diagonal(D, 0)
    return D


def notebook_style_max_cut(W: np.ndarray):
    """The official notebook's approach (docs/method.md §3): one Python iteration per bipartition, xor-outer mask."""
    n = W.shape[0]
    best_val, best_side = -np.inf, None
    for bits in itertools.product([0, 1], repeat=n - 1):
        side = np.array((0, *bits), dtype=bool)
        val = W[np.logical_xor.outer(side, side)].sum() / 2
        if val > best_val:
            best_val, best_side = val, side
    return best_val, best_side


def main(n_images: int = 64, batch: int = 16) -> dict:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out: dict = {}
    D40 = random_distance(40)
    t_dp = timeit(lambda: contiguous_segmentation(D40, k_max=8), repeat=20)
    out["dp_L40_kmax8_ms"] = round(t_dp * 1000, 3)
    print(f"DP contiguous segmentation, L=40, all k<=8: {t_dp * 1000:.2f} ms (goal < 50 ms)")
    out["bruteforce_maxcut_s"] = {}
    out["bruteforce_maxcut_notebook_style_s"] = {}
    for L in (12, 16):  # the notebook's per-bipartition Python loop, same process, same matrices
        D = random_distance(L)
        t_ref = timeit(lambda: notebook_style_max_cut(D), repeat=1, warmup=0)
        t = timeit(lambda: max_cut_bruteforce(D), repeat=3, warmup=0)
        out["bruteforce_maxcut_notebook_style_s"][str(L)] = round(t_ref, 4)
        out[f"maxcut_speedup_vs_notebook_L{L}"] = round(t_ref / t, 1)
        print(f"L={L}: exact max-cut {t * 1000:.1f} ms vs notebook-style loop {t_ref * 1000:.0f} ms "
              f"({t_ref / t:.0f}x)")
    for L in (12, 20, 24):
        D = random_distance(L)
        t = timeit(lambda: max_cut_bruteforce(D), repeat=1 if L > 20 else 3, warmup=0)
        t_dpL = timeit(lambda: contiguous_segmentation(D, k_max=8), repeat=20)
        out["bruteforce_maxcut_s"][str(L)] = round(t, 4)
        out[f"dp_L{L}_kmax8_ms"] = round(t_dpL * 1000, 3)
        print(f"L={L}: one exact max-cut (2^{L - 1} bipartitions) {t:.3f} s; DP all k<=8 {t_dpL * 1000:.2f} ms")

    # similarity pass overhead: forward only vs forward + accumulation, same images, same process
    from raptor.analyze import resolve_cka_groups
    from raptor.data import EvalTransform, open_source
    from raptor.runtime import tune_malloc
    from raptor.similarity import SimilarityAccumulator
    from raptor.teachers import load_teacher

    tune_malloc()
    teacher = load_teacher("bundled:dinov2-s")
    src = open_source("bundled:digits").subset(n_images)
    tf = EvalTransform.for_size(224, teacher.image_mean, teacher.image_std)
    x = torch.stack([tf(it.load()) for it in src.items])
    layers = list(range(1, teacher.depth + 1))
    layout = teacher.layout(224)

    def forward_only():
        buf = None
        for s in range(0, len(x), batch):
            buf = teacher.trajectory(x[s:s + batch], layers, out=buf)

    def with_similarity(groups):
        acc = SimilarityAccumulator(layout, layers, cka_groups=groups)
        buf = None
        for s in range(0, len(x), batch):
            buf = teacher.trajectory(x[s:s + batch], layers, out=buf)
            acc.update(buf)
        acc.result()

    default_groups = resolve_cka_groups(("auto",), layout)
    forward_only()
    tf_, ts_, tp_ = [], [], []
    for _ in range(3):
        t0 = time.perf_counter()
        forward_only()
        tf_.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with_similarity(default_groups)
        ts_.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    with_similarity(default_groups + ("patches",))
    tp_.append(time.perf_counter() - t0)
    f, s, p = min(tf_), min(ts_), min(tp_)
    out["similarity"] = {"images": n_images, "forward_s": round(f, 3), "forward_plus_default_similarity_s": round(s, 3),
                         "overhead_default": round(s / f - 1, 4), "default_groups": list(default_groups),
                         "forward_plus_patch_cka_s": round(p, 3), "overhead_with_patch_cka": round(p / f - 1, 4)}
    print(f"similarity pass (paper metric, MSE, token cosine x4 groups, CKA {default_groups}): "
          f"+{100 * (s / f - 1):.1f} % over the forward (goal <= 10 %); with patch CKA: +{100 * (p / f - 1):.1f} %")
    save("phases", out)
    return out


if __name__ == "__main__":
    main()
