"""Training-step benchmarks: one Raptor-2 autoregressive training step at ViT-S dims (16 sequences x 261 tokens x 12
steps, AdamW, grad clip 1.0), ours (fp32 and bf16 autocast) vs a reference written the way the official code is
(nn.MultiheadAttention, nn.Sequential MLP, per-step loop; benchmarks/official_reference.py), in the same run; achieved
FLOP/s against the measured matmul peak; bf16 vs fp32 R^2 after the same short run; online-teacher vs store
training throughput.

Run: .venv/bin/python benchmarks/bench_train.py
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

import torch  # noqa: E402

from common import save  # noqa: E402
from official_reference import OfficialBlock, OfficialRaptor, official_autoreg_step  # noqa: E402
from raptor.runtime import tune_malloc  # noqa: E402
from raptor.surrogate.block import BlockConfig, to_official_state_dict  # noqa: E402
from raptor.surrogate.losses import token_loss  # noqa: E402
from raptor.surrogate.model import RaptorModel, SurrogateConfig  # noqa: E402
from raptor.teachers.base import TokenLayout, autocast_context  # noqa: E402

D, HEADS, T, B, L = 384, 6, 261, 16, 12
PHASES = [list(range(1, 8)), list(range(8, 13))]


def step_flops() -> float:
    per_token_app = 2 * (16 * D * D + 2 * T * D)  # qkv 3D^2 + proj D^2 + SwiGLU fc1 8D^2 + fc2 4D^2; QK^T and AV
    return 3 * per_token_app * T * B * L  # forward + backward ~ 3x forward


def matmul_peak(dtype) -> float:
    n = 2048
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best = min(_t(lambda: a @ b) for _ in range(5))
    return 2 * n ** 3 / best


def _t(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ours_step(model, opt, traj, autocast, layout):
    """One stage-2 step of ours (MSE over the rollout, AdamW, grad clip 1.0), on ``traj``'s device; returns the
    loss (a host read)."""
    depth = traj.shape[1] - 1
    with autocast_context(autocast, traj.device):
        outs = model(traj[:, 0], 0, depth)
        loss = sum(token_loss(o, traj[:, i + 1], "mse", layout) for i, o in enumerate(outs)) / depth
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def main(repeats: int = 3) -> dict:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    tune_malloc()
    out: dict = {"dims": {"dim": D, "heads": HEADS, "tokens": T, "batch": B, "steps": L, "phases": "1-7 / 8-12"}}
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    out["matmul_peak_gflops"] = {"float32": round(peak32 / 1e9, 1), "bfloat16": round(peak16 / 1e9, 1)}
    print(f"matmul peak (2048^3): fp32 {peak32 / 1e9:.0f} GFLOP/s, bf16 {peak16 / 1e9:.0f} GFLOP/s")
    torch.manual_seed(0)
    traj = torch.randn(B, L + 1, T, D).cumsum(1) * 0.3
    layout = TokenLayout(1, 4, (16, 16))
    torch.manual_seed(1)
    ours = RaptorModel(SurrogateConfig(PHASES, BlockConfig(D, HEADS)))
    ref = OfficialRaptor([OfficialBlock(D, HEADS) for _ in PHASES], thresholds=[7])
    for rb, ob in zip(ref.blocks, ours.blocks):  # same starting weights
        rb.load_state_dict(to_official_state_dict(ob))
    o_ours = torch.optim.AdamW(ours.parameters(), lr=3e-4, weight_decay=1e-4)
    o_ref = torch.optim.AdamW(ref.parameters(), lr=3e-4, weight_decay=1e-4)
    runs = {"reference_fp32": lambda: official_autoreg_step(ref, o_ref, traj),
            "ours_fp32": lambda: ours_step(ours, o_ours, traj, None, layout),
            "ours_bf16_autocast": lambda: ours_step(ours, o_ours, traj, "bfloat16", layout)}
    for fn in runs.values():
        fn()  # warm-up
    times = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved
        for k, fn in runs.items():
            times[k].append(_t(fn))
    flops = step_flops()
    out["step_tflop"] = round(flops / 1e12, 3)
    ref_t = min(times["reference_fp32"])
    for k, ts in times.items():
        t = min(ts)
        peak = peak16 if "bf16" in k else peak32
        out[k] = {"seconds": round(t, 3), "sequences_per_s": round(B / t, 2),
                  "speedup_vs_reference": round(ref_t / t, 3),
                  "gflops": round(flops / t / 1e9, 1), "fraction_of_matmul_peak": round(flops / t / peak, 3)}
        print(f"{k:20s} {t:6.2f} s/step  {B / t:5.2f} seq/s  x{ref_t / t:4.2f} vs reference  "
              f"{flops / t / 1e9:6.1f} GFLOP/s ({100 * flops / t / peak:.0f} % of "
              f"{('bf16' if 'bf16' in k else 'fp32')} peak)")

    # bf16 vs fp32 fidelity after the same short real run
    from raptor.surrogate.config import FitConfig
    from raptor.surrogate.fit import run_fit

    tmp = Path(tempfile.mkdtemp(prefix="raptor-bench-fit-"))
    r2 = {}
    for ac in (None, "bfloat16"):
        cfg = FitConfig(teacher="bundled:dinov2-s", data="bundled:photos", k=2, image_size=56, steps1=20, steps2=20,
                        batch_size=8, out=str(tmp / str(ac)), autocast=ac, probe_data=None, ckpt_every=1000)
        m = run_fit(cfg, progress=False)
        r2[str(ac or "float32")] = m["validation"]["autoregressive"]["r2_mean"]
    out["short_run_r2_mean"] = {k: round(v, 4) for k, v in r2.items()}
    out["short_run_r2_gap"] = round(abs(r2["float32"] - r2["bfloat16"]), 4)
    print(f"short real run (bundled DINOv2-S, 56 px, 20+20+20 steps): mean held-out R2 fp32 {r2['float32']:.4f} "
          f"vs bf16 {r2['bfloat16']:.4f} (gap {out['short_run_r2_gap']:.4f}, goal <= 0.01)")

    # online teacher vs store, same settings (stage 2 only, 12 px... 112 px crops)
    from raptor.data import open_source
    from raptor.store import extract
    from raptor.teachers import load_teacher

    teacher = load_teacher("bundled:dinov2-s")
    extract(teacher, open_source("bundled:photos"), tmp / "store", image_size=112, progress=False)
    tput = {}
    for name, kw in (("online", {"data": "bundled:photos", "crops": False}), ("store", {"store": str(tmp / "store")})):
        cfg = FitConfig(teacher="bundled:dinov2-s", k=2, image_size=112, stage="2", steps2=12, batch_size=8,
                        out=str(tmp / f"tp-{name}"), probe_data=None, ckpt_every=1000, **kw)
        m = run_fit(cfg, progress=False)
        tput[name] = round(12 * 8 / m["train_seconds"], 2)
    out["samples_per_s"] = tput
    print(f"stage-2 training samples/s at 112 px, batch 8: online teacher {tput['online']}, store {tput['store']}")
    shutil.rmtree(tmp, ignore_errors=True)
    save("train", out)
    return out


if __name__ == "__main__":
    main()
