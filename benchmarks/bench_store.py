"""Activation-store benchmarks: extraction vs bare forward, bf16 vs fp32 bytes, reader vs naive full-array read.

Run: .venv/bin/python benchmarks/bench_store.py   (or `make bench`)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import save, timeit  # noqa: E402
from raptor.data import EvalTransform, open_source  # noqa: E402
from raptor.store import TrajectoryStore, extract  # noqa: E402
from raptor.teachers import load_teacher  # noqa: E402


def main(n_images: int = 128, batch: int = 16) -> dict:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from raptor.runtime import tune_malloc

    tune_malloc()  # the same allocator settings for the bare forward and for extraction (extract sets it anyway)
    teacher = load_teacher("bundled:dinov2-s")
    src = open_source("bundled:digits").subset(n_images)
    tf = EvalTransform.for_size(224, teacher.image_mean, teacher.image_std)
    x = torch.stack([tf(it.load()) for it in src.items])
    tmp = Path(tempfile.mkdtemp(prefix="raptor-bench-"))
    out: dict = {"images": n_images, "batch": batch, "teacher": "bundled:dinov2-s", "image_size": 224}

    # 1. bare forward (preloaded tensors, the model's own forward) vs full extraction (decode+forward+write)
    def bare():
        with torch.inference_mode():
            for s in range(0, len(x), batch):
                teacher.model(pixel_values=x[s:s + batch])

    def run_extract(name, dtype="bfloat16", compression="lz4"):
        d = tmp / name
        shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        extract(teacher, src, d, dtype=dtype, batch_size=batch, chunk_images=16, compression=compression,
                progress=False)
        return time.perf_counter() - t

    bare()  # warm-up
    t_bare, t_ext = [], []
    for i in range(4):  # interleave to share machine noise
        # flush earlier runs' dirty pages first, so no run pays for another's deferred disk writeback
        os.sync()
        t0 = time.perf_counter()
        bare()
        t_bare.append(time.perf_counter() - t0)
        os.sync()
        t_ext.append(run_extract(f"e{i}"))
    fb, fe = n_images / min(t_bare), n_images / min(t_ext)
    out["bare_forward_img_s"] = round(fb, 2)
    out["extract_img_s"] = round(fe, 2)
    out["extract_vs_bare"] = round(fe / fb, 3)
    print(f"bare forward {fb:.2f} img/s, extraction {fe:.2f} img/s -> ratio {fe / fb:.3f} (goal >= 0.90)")

    # 2. bytes per image
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        for comp in ("none", "lz4", "zstd"):
            name = f"b-{dtype}-{comp}"
            run_extract(name, dtype, comp)
            sizes[f"{dtype}/{comp}"] = TrajectoryStore(tmp / name).summary()["bytes"] / n_images
    out["bytes_per_image"] = {k: int(v) for k, v in sizes.items()}
    out["bf16_over_fp32_none"] = round(sizes["bfloat16/none"] / sizes["float32/none"], 4)
    for comp in ("lz4", "zstd"):
        out[f"bf16_over_fp32_{comp}"] = round(sizes[f"bfloat16/{comp}"] / sizes[f"float32/{comp}"], 4)
        out[f"bf16_{comp}_over_fp32_none"] = round(sizes[f"bfloat16/{comp}"] / sizes["float32/none"], 4)
    print("bytes/image:", out["bytes_per_image"])
    print("bf16/fp32 same compression:", {c: out[f"bf16_over_fp32_{c}"] for c in ("none", "lz4", "zstd")})

    # 3. reader: 2-layer range batches vs naive full-array read of random rows then slicing
    st = TrajectoryStore(tmp / "e0")
    bs = 16

    def ours():
        n = 0
        for xb, _ in st.batches(bs, layers=(6, 7), shuffle=True, seed=0):
            n += 1
        return n

    rng = np.random.default_rng(0)

    def naive():
        order = rng.permutation(st.n_images)
        n = 0
        for s in range(0, len(order), bs):
            idx = np.sort(order[s:s + bs])
            full = np.asarray(st.array.oindex[idx])  # all layers of those rows
            _ = full[:, 6:8]
            n += 1
        return n

    nb = ours()
    t_ours = timeit(ours, repeat=3)
    t_naive = timeit(naive, repeat=3)
    out["reader_batches_s"] = round(nb / t_ours, 2)
    out["naive_batches_s"] = round(nb / t_naive, 2)
    out["reader_speedup"] = round(t_naive / t_ours, 2)
    print(f"reader {nb / t_ours:.1f} batches/s vs naive {nb / t_naive:.1f} -> {t_naive / t_ours:.1f}x")
    shutil.rmtree(tmp, ignore_errors=True)
    save("store", out)
    return out


if __name__ == "__main__":
    main()
