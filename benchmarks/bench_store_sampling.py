"""Store-backed training batches read from disk (rows not cached, as at ImageNet scale): ``--store-sampling rows``
(each row drawn independently: a batch touches ~one chunk per row) against ``chunks`` (whole store chunks until a
batch), side by side in one process on one store.

Store: a random-weight DINOv2-shaped teacher (dim 192, 12 blocks, 112 px: 65 tokens; 13 layers) over 1,024 bundled
digits, bf16, lz4, 32 images per chunk, the extraction default. Figures: seconds per batch of 32 rows x 13 layers
(best of 3 passes over 20 steps), chunk reads per batch, and decompressed bytes per byte the batch uses.

Run: .venv/bin/python benchmarks/bench_store_sampling.py
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

from common import save  # noqa: E402

N_IMAGES, BATCH, STEPS, CHUNK = 1024, 32, 20, 32


def main() -> dict:
    from raptor.data import open_source
    from raptor.store import TrajectoryStore, extract
    from raptor.surrogate.batches import StoreBatches
    from raptor.teachers.hf import build_tiny_teacher

    tmp = Path(tempfile.mkdtemp(prefix="raptor-bench-sampling-"))
    try:
        teacher = build_tiny_teacher("dinov2", dim=192, depth=12, heads=3, image_size=112)
        extract(teacher, open_source("bundled:digits").subset(N_IMAGES, 1, "random"), tmp / "s", image_size=112,
                chunk_images=CHUNK, progress=False)
        st = TrajectoryStore(tmp / "s")
        rows = np.arange(st.n_images)
        lo, hi = st.layers[0], st.layers[-1]
        out = {"images": int(st.n_images), "batch": BATCH, "chunk_images": CHUNK, "layers": len(st.layers),
               "tokens": st.layout.n_tokens, "dim": int(st.array.shape[-1]), "dtype": st.dtype}
        for mode in ("rows", "chunks"):
            data = StoreBatches(st, rows, 0, cache_bytes=0, sampling=mode)
            chunks = [len(set((data.pick("stage2", s, BATCH) // CHUNK).tolist())) for s in range(STEPS)]
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                for s in range(STEPS):
                    data.get("stage2", s, BATCH, lo, hi)
                best = min(best, (time.perf_counter() - t) / STEPS)
            used = BATCH
            out[mode] = {"seconds_per_batch": round(best, 4), "chunk_reads_per_batch": float(np.mean(chunks)),
                         "decompressed_per_used_byte": round(float(np.mean(chunks)) * CHUNK / used, 2)}
            print(f"{mode:6s}: {best * 1e3:7.1f} ms per batch, {np.mean(chunks):5.1f} chunks per batch "
                  f"({out[mode]['decompressed_per_used_byte']:.1f} x the bytes it uses)")
        out["speedup_chunks_over_rows"] = round(out["rows"]["seconds_per_batch"] / out["chunks"]["seconds_per_batch"],
                                                2)
        print(f"chunks / rows: {out['speedup_chunks_over_rows']:.2f} x faster")
        save("bench_store_sampling", out)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
