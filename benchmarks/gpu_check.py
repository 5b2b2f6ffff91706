"""The GPU acceptance check: every ``--device cuda`` path once, with CPU parity and the numbers that matter.

    .venv/bin/python benchmarks/gpu_check.py --out runs/gpu_check          # on a CUDA machine (make gpu-check)
    .venv/bin/python benchmarks/gpu_check.py --dry-run --out runs/gpu_dry  # the same checks on the CPU, tiny sizes

Each check runs the real command (in-process, through the CLI) and records pass / fail / skipped (with the reason),
its seconds and its figures; a failed check prints one ``FAIL <check>: <reason>`` line and the script exits 1.
Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (a summary for docs/benchmarks.md).

Checks:
- ``extract``: the teacher on the device under bf16 autocast; img/s; an fp32 device store equals the CPU store
  (tolerance 1e-3 relative on a real GPU: TF32 and kernel choice; exact on the CPU);
- ``analyze``: ``analyze --device`` from a store and live: every similarity matrix against the CPU run's (1e-4
  absolute on a GPU: TF32 and kernel choice in the float32 products; exact on the CPU);
- ``dynamics``: ``dynamics --device`` from the extract check's store: γ, speed, effective ranks and perturbation
  recovery against the CPU run's (1e-3 absolute on a GPU; 1e-6 on the CPU);
- ``study``: ``study --device``: a one-run study (p = 0) against the CPU's: teacher accuracy (0.1), similarity (0.05)
  and Raptor R² (0.1) on a GPU; exact on the CPU;
- ``fit_store`` / ``fit_online``: training on the device from a store and with the online teacher; steps/s; the
  device run's losses against the CPU run's (relative 5e-2 on a GPU, 1e-5 on the CPU);
- ``compile``: ``--compile`` on the device, and the number of graphs dynamo compiled (one per block is the goal);
- ``probe_init_head``: ``probe --init-head teacher`` with an official-layout DINOv2 checkpoint and linear head;
- ``extract_vit_b``: a DINOv2-B-shaped teacher (random weights: 768 wide, 12 blocks, 12 heads, 224 px) extracting
  under bf16 autocast at batch 64: img/s (anchor: the official code's ~71 img/s; goal >= 1,000 on an H100-class GPU);
- ``train_step``: one stage-2 training step at ViT-B dims (batch 64, 257 tokens, 12 layers) of ours, fp32 and bf16,
  against a reference step written the way the official code is (benchmarks/official_reference.py): steps/s and ratios;
- ``torchrun``: ``fit`` from the store on 2 ranks (NCCL, one GPU each, when 2 GPUs are visible; 2 gloo ranks on the
  CPU in the dry run; skipped on a 1-GPU machine) with ``RAPTOR_TRACE_COLLECTIVES``: both ranks issue the same
  collectives and the losses match the 1-process run's;
- ``timm_parity`` / ``open_clip_parity``: the ``timm:`` and ``open_clip:`` adapters against the library's own
  forward (timm's ``forward_intermediates(norm=False)``; open_clip's tower with hooks, and its pooled embedding) on
  random weights; skipped, with the reason, where the library does not import;
- ``host_syncs``: a stage-2 forward and backward under ``torch.cuda.set_sync_debug_mode("warn")`` (GPU only);
- ``peak_memory``: the largest GPU allocation of the run (GPU only).
``TORCH_LOGS=recompiles`` is set for the compile check, so each recompile's reason is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_train's step

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _cli(argv: list[str]) -> None:
    from raptor.cli import run

    rc = run([str(a) for a in argv])
    if rc != 0:
        raise RuntimeError(f"raptor {' '.join(map(str, argv[:1]))} exited {rc}")


def _official_checkpoint(tmp: Path, dim: int = 64, depth: int = 2, classes: int = 2) -> tuple[Path, Path]:
    """A random DINOv2 checkpoint and linear head in the official layouts (what torch.hub downloads)."""
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g) * 0.1

    sd = {"cls_token": r(1, 1, dim), "pos_embed": r(1, 5, dim), "mask_token": r(1, dim),
          "patch_embed.proj.weight": r(dim, 3, 14, 14), "patch_embed.proj.bias": r(dim),
          "norm.weight": 1 + r(dim), "norm.bias": r(dim)}
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({p + "norm1.weight": 1 + r(dim), p + "norm1.bias": r(dim), p + "attn.qkv.weight": r(3 * dim, dim),
                   p + "attn.qkv.bias": r(3 * dim), p + "attn.proj.weight": r(dim, dim), p + "attn.proj.bias": r(dim),
                   p + "ls1.gamma": r(dim) + 0.5, p + "norm2.weight": 1 + r(dim), p + "norm2.bias": r(dim),
                   p + "ls2.gamma": r(dim) + 0.5, p + "mlp.fc1.weight": r(4 * dim, dim),
                   p + "mlp.fc1.bias": r(4 * dim), p + "mlp.fc2.weight": r(dim, 4 * dim), p + "mlp.fc2.bias": r(dim)})
    bb, head = tmp / "dinov2_tiny_pretrain.pth", tmp / "dinov2_tiny_linear_head.pth"
    torch.save(sd, bb)
    torch.save({"weight": r(classes, 2 * dim), "bias": r(classes)}, head)
    return bb, head


def _stage2_gap(run: dict, ref: dict) -> float:
    """Largest stage-2 loss difference of two fits' metrics, relative to the reference's largest loss."""
    a = np.array([h[1] for h in run["loss_history"]["stage2"]])
    b = np.array([h[1] for h in ref["loss_history"]["stage2"]])
    return float(np.abs(a - b).max() / np.abs(b).max())


class _Skip(Exception):
    """A check that cannot run on this machine (the reason is recorded, it is not a failure)."""


class Checker:
    def __init__(self, device: str, dry: bool, tmp: Path):
        self.device, self.dry, self.tmp = device, dry, tmp
        self.results: dict[str, dict] = {}
        # sizes: tiny on the CPU dry run; the bundled DINOv2-S at 224 px on a GPU
        self.teacher = "tiny:dinov2" if dry else "bundled:dinov2-s"
        self.size = "28" if dry else "224"
        self.n = "24" if dry else "512"
        self.steps = "3" if dry else "50"

    def run(self, name: str, fn, gpu_only: bool = False) -> None:
        if gpu_only and self.device == "cpu":
            self.results[name] = {"status": "skipped", "reason": "needs a CUDA GPU (dry run)"}
            return
        t0 = time.perf_counter()
        try:
            figures = fn() or {}
            self.results[name] = {"status": "pass", "seconds": round(time.perf_counter() - t0, 2), **figures}
        except _Skip as e:
            self.results[name] = {"status": "skipped", "reason": str(e)}
        except Exception as e:  # noqa: BLE001 - every failure is a result line, the other checks still run
            self.results[name] = {"status": "fail", "seconds": round(time.perf_counter() - t0, 2),
                                  "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                                  "traceback": traceback.format_exc()[-2000:]}
            print(f"FAIL {name}: {self.results[name]['reason']}", flush=True)

    # ---- checks ----------------------------------------------------------------------------------------------
    def extract(self) -> dict:
        from raptor.store import TrajectoryStore

        common = ["extract", "--teacher", self.teacher, "--data", "bundled:digits", "--limit", self.n,
                  "--image-size", self.size, "--no-progress", "--workers", "0"]
        t0 = time.perf_counter()
        _cli([*common, "--device", self.device, "--autocast", "bfloat16", "--out", self.tmp / "bf16.zarr"])
        ips = int(self.n) / (time.perf_counter() - t0)
        _cli([*common, "--device", self.device, "--dtype", "float32", "--out", self.tmp / "dev.zarr"])
        _cli([*common, "--device", "cpu", "--dtype", "float32", "--out", self.tmp / "cpu.zarr"])
        a = TrajectoryStore(self.tmp / "dev.zarr").read(slice(None))
        b = TrajectoryStore(self.tmp / "cpu.zarr").read(slice(None))
        rel = float((a - b).norm() / b.norm())
        tol = 1e-6 if self.device == "cpu" else 1e-3
        if not rel <= tol:
            raise AssertionError(f"device store differs from the CPU store: relative {rel:.2e} > {tol:g}")
        return {"images_per_s_bf16_incl_startup": round(ips, 1), "store_relative_diff_vs_cpu": rel}

    def analyze(self) -> dict:
        """``analyze --device``: the teacher and the similarity products on the device (float64 sums), from the
        extract check's CPU store and live; every matrix against the CPU's."""
        res = {}
        for how, src in (("store", ["--store", self.tmp / "cpu.zarr"]),
                         ("live", ["--data", "bundled:digits", "--limit", self.n, "--image-size", self.size])):
            runs = []
            for i, dev in enumerate((self.device, "cpu")):  # the dry run: the CPU twice, two separate runs
                out = self.tmp / f"an_{how}_{i}_{dev}"
                t0 = time.perf_counter()
                _cli(["analyze", "--teacher", self.teacher, *src, "--device", dev, "--null-resamples", "20",
                      "--no-progress", "--out", out])
                res[f"{how}_{'device' if i == 0 else 'cpu'}_s"] = round(time.perf_counter() - t0, 2)
                runs.append(json.loads((out / "analysis.json").read_text()))
            worst = max(float(np.abs(np.array(m["matrix"]) - np.array(runs[1]["metrics"][k]["matrix"])).max())
                        for k, m in runs[0]["metrics"].items())
            tol = 0.0 if self.device == "cpu" else 1e-4
            if not worst <= tol:
                raise AssertionError(f"analyze ({how}) on the device differs from the CPU by {worst:.2e} > {tol:g}")
            res[f"{how}_max_abs_diff"] = worst
        return res

    def dynamics(self) -> dict:
        """``dynamics --device``: the teacher, its random-weight nulls (drawn on the CPU) and the per-image metrics
        on the device, from the extract check's CPU store; γ, speed, ranks and perturbation recovery against the
        CPU run's."""
        runs, res = [], {}
        for i, dev in enumerate((self.device, "cpu")):
            out = self.tmp / f"dyn_{i}_{dev}"
            t0 = time.perf_counter()
            _cli(["dynamics", "--teacher", self.teacher, "--store", self.tmp / "cpu.zarr", "--phases",
                  "1/2-3" if self.dry else "1-7/8-12", "--perturb-images", "8", "--rank-images", "8",
                  "--null-draws", "2", "--device", dev, "--no-progress", "--out", out])
            res[f"{'device' if i == 0 else 'cpu'}_s"] = round(time.perf_counter() - t0, 2)
            runs.append(json.loads((out / "dynamics.json").read_text())["models"]["teacher"])
        a, b = runs

        def gap(x, y):
            return float(np.abs(np.array(x) - np.array(y)).max())

        worst = max([gap(a[key][g]["mean"], b[key][g]["mean"]) for key in ("gamma", "speed") for g in a[key]] +
                    [gap(r["distance"]["all"], q["distance"]["all"]) for r, q in
                     zip(a["perturbation"]["runs"], b["perturbation"]["runs"])])
        rank = gap(a["ranks"]["effective_rank"]["mean"], b["ranks"]["effective_rank"]["mean"])
        tol = 1e-6 if self.device == "cpu" else 1e-3
        if not (worst <= tol and rank <= 100 * tol):
            raise AssertionError(f"dynamics on the device differs from the CPU: {worst:.2e} (gamma, speed, recovery), "
                                 f"{rank:.2e} (effective rank)")
        return {**res, "max_abs_diff": worst, "effective_rank_max_abs_diff": rank}

    def study(self) -> dict:
        """``study --device``: a one-run study (p = 0, so no drop-path masks: the device's random stream does not
        enter) trains its ViT, analyses it and fits k = 2 on the device; its teacher accuracy, similarity matrix
        and Raptor R² against the CPU run's (a few epochs of training amplify kernel differences: loose tolerances
        on a GPU; exact on the CPU)."""
        runs, res = [], {}
        for i, dev in enumerate((self.device, "cpu")):
            out = self.tmp / f"study_{i}_{dev}"
            t0 = time.perf_counter()
            _cli(["study", "--data", "bundled:digits", "--limit", "240", "--sd", "0", "--seeds", "0", "--ks", "2",
                  "--random", "0", "--swap-samples", "0", "--no-references", "--depth", "4", "--dim", "32",
                  "--heads", "2", "--epochs", "2", "--steps1", "5", "--steps2", "5", "--device", dev,
                  "--no-progress", "--out", out])
            res[f"{'device' if i == 0 else 'cpu'}_s"] = round(time.perf_counter() - t0, 2)
            runs.append(json.loads((out / "study.json").read_text())["runs"][0])
        a, b = runs
        acc = abs(a["teacher_accuracy"] - b["teacher_accuracy"])
        dist = float(np.abs(np.array(a["phases"]["distance"]) - np.array(b["phases"]["distance"])).max())
        r2 = abs(a["fits"]["2"]["dp"]["r2_mean"] - b["fits"]["2"]["dp"]["r2_mean"])
        tol = (0.0, 0.0, 0.0) if self.device == "cpu" else (0.1, 0.05, 0.1)
        if not (acc <= tol[0] and dist <= tol[1] and r2 <= tol[2]):
            raise AssertionError(f"study on the device differs from the CPU: accuracy {acc:.3f}, distance {dist:.2e}, "
                                 f"Raptor R² {r2:.3f}")
        return {**res, "teacher_accuracy_diff": acc, "distance_max_abs_diff": dist, "raptor_r2_diff": r2}

    def _fit(self, out: str, device: str, *extra) -> dict:
        _cli(["fit", "--teacher", self.teacher, "--store", self.tmp / "cpu.zarr", "--phases", "1/2-3" if self.dry
              else "1-7/8-12", "--steps1", self.steps, "--steps2", self.steps, "--batch-size", "8", "--val-images",
              "4" if self.dry else "32", "--stats-images", "8", "--probe-data", "none", "--no-progress",
              "--device", device, "--out", self.tmp / out, *extra])
        return json.loads((self.tmp / out / "metrics.json").read_text())

    def fit_store(self) -> dict:
        t0 = time.perf_counter()
        dev = self._fit("fit_dev", self.device)
        secs = time.perf_counter() - t0
        cpu = self._fit("fit_cpu", "cpu") if self.device != "cpu" else dev
        rel = _stage2_gap(dev, cpu)
        tol = 1e-5 if self.device == "cpu" else 5e-2
        if not rel <= tol:
            raise AssertionError(f"device stage-2 losses differ from the CPU run's: relative {rel:.2e} > {tol:g}")
        return {"seconds_incl_eval": round(secs, 1), "stage2_loss_relative_diff_vs_cpu": rel,
                "mean_ar_r2": dev["validation"]["autoregressive"]["r2_mean"]}

    def fit_online(self) -> dict:
        _cli(["fit", "--teacher", self.teacher, "--data", "bundled:digits", "--limit", self.n, "--image-size",
              self.size, "--k", "2", "--steps1", self.steps, "--steps2", self.steps, "--batch-size", "8",
              "--val-images", "4" if self.dry else "32", "--stats-images", "8", "--probe-data", "none", "--workers",
              "0", "--autocast", "bfloat16", "--no-progress", "--device", self.device, "--out", self.tmp / "online"])
        m = json.loads((self.tmp / "online" / "metrics.json").read_text())
        return {"mean_ar_r2": m["validation"]["autoregressive"]["r2_mean"], "train_seconds": m["train_seconds"]}

    def compile(self) -> dict:
        import torch._dynamo

        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch._logging.set_logs(recompiles=True)  # each recompile's reason in the log
        try:
            self._fit("fit_compile", self.device, "--compile")
        finally:
            torch._logging.set_logs()
        graphs = int(torch._dynamo.utils.counters["stats"].get("unique_graphs", 0))
        limit_hits = sum(v for k, v in torch._dynamo.utils.counters["recompiles"].items()) \
            if "recompiles" in torch._dynamo.utils.counters else 0
        if graphs > 4 * 2:  # 2 blocks; a few graphs each (train / eval, grad / no-grad) is fine
            raise AssertionError(f"{graphs} graphs compiled for 2 blocks: a block recompiles per layer index")
        return {"unique_graphs": graphs, "recompiles": int(limit_hits)}

    def extract_vit_b(self) -> dict:
        from raptor.data import open_source
        from raptor.store import extract
        from raptor.teachers.hf import build_tiny_teacher

        dims = dict(dim=64, depth=2, heads=2, image_size=28) if self.dry else \
            dict(dim=768, depth=12, heads=12, image_size=224)
        teacher = build_tiny_teacher("dinov2", **dims)
        n = 16 if self.dry else 1024
        src = open_source("bundled:digits").subset(n)
        kw = dict(image_size=dims["image_size"], autocast="bfloat16", batch_size=8 if self.dry else 64,
                  progress=False, device=torch.device(self.device), workers=None)
        extract(teacher, src.subset(min(n, 128)), self.tmp / "vitb_warm.zarr", **kw)  # warm-up: kernels, workers
        s = extract(teacher, src, self.tmp / "vitb.zarr", **kw)
        return {"images_per_s_bf16": round(s.images_per_s, 1), "images": s.n_extracted,
                "official_anchor_images_per_s": 71, "goal_images_per_s": 1000}

    def train_step(self) -> dict:
        from bench_train import ours_step  # the benchmark's own step, on the device here
        from official_reference import OfficialBlock, OfficialRaptor, official_autoreg_step
        from raptor.surrogate.block import BlockConfig, to_official_state_dict
        from raptor.surrogate.model import RaptorModel, SurrogateConfig
        from raptor.teachers.base import TokenLayout

        D, H, B, L, grid = (64, 2, 4, 4, (2, 2)) if self.dry else (768, 12, 64, 12, (16, 16))
        T = 1 + grid[0] * grid[1]
        dev = torch.device(self.device)
        cut = L // 2
        phases = [list(range(1, cut + 1)), list(range(cut + 1, L + 1))]
        torch.manual_seed(0)
        traj = (torch.randn(B, L + 1, T, D).cumsum(1) * 0.3).to(dev)
        layout = TokenLayout(1, 0, grid)
        ours = RaptorModel(SurrogateConfig(phases, BlockConfig(D, H))).to(dev)
        ref = OfficialRaptor([OfficialBlock(D, H) for _ in phases], thresholds=[cut]).to(dev)
        for rb, ob in zip(ref.blocks, ours.blocks):
            rb.load_state_dict(to_official_state_dict(ob))
        o_ours = torch.optim.AdamW(ours.parameters(), lr=3e-4)
        o_ref = torch.optim.AdamW(ref.parameters(), lr=3e-4)

        def step(autocast):
            ours_step(ours, o_ours, traj, autocast, layout)

        def timed(fn, n=2 if self.dry else 10):
            fn()
            fn()  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return n / (time.perf_counter() - t0)

        ref_sps = timed(lambda: official_autoreg_step(ref, o_ref, traj))
        fp32 = timed(lambda: step(None))
        bf16 = timed(lambda: step("bfloat16"))
        return {"dims": f"D{D} T{T} B{B} L{L}", "reference_steps_per_s": round(ref_sps, 3),
                "ours_fp32_steps_per_s": round(fp32, 3), "ours_bf16_steps_per_s": round(bf16, 3),
                "fp32_vs_reference": round(fp32 / ref_sps, 2), "bf16_vs_reference": round(bf16 / ref_sps, 2)}

    def torchrun(self) -> dict:
        import subprocess

        if self.device == "cuda" and torch.cuda.device_count() < 2:
            raise _Skip("one GPU visible: NCCL needs one GPU per rank (run on a 2-GPU node)")
        trace = self.tmp / "trace"
        env = {**os.environ, "RAPTOR_TRACE_COLLECTIVES": str(trace), "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
        args = ["fit", "--teacher", self.teacher, "--store", self.tmp / "cpu.zarr", "--phases",
                "1/2-3" if self.dry else "1-7/8-12", "--steps1", self.steps, "--steps2", self.steps, "--batch-size",
                "8", "--val-images", "4" if self.dry else "32", "--stats-images", "8", "--probe-data", "none",
                "--no-progress", "--device", self.device, "--out", self.tmp / "fit_2ranks"]
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            "-m", "raptor.cli", *map(str, args)], capture_output=True, text=True, env=env,
                           timeout=600)
        if r.returncode != 0:
            raise AssertionError("torchrun fit failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:300])
        seqs = [[json.loads(x) for x in (trace / f"rank{k}.jsonl").read_text().splitlines()] for k in (0, 1)]
        if [(x["op"], x.get("dtype")) for x in seqs[0]] != [(x["op"], x.get("dtype")) for x in seqs[1]]:
            raise AssertionError("the two ranks issued different collectives (see the trace)")
        devices = {x["device"] for x in seqs[0] + seqs[1] if "device" in x}
        two = json.loads((self.tmp / "fit_2ranks" / "metrics.json").read_text())
        one = self._fit("fit_1rank", self.device) if not (self.tmp / "fit_dev").exists() else \
            json.loads((self.tmp / "fit_dev" / "metrics.json").read_text())
        rel = _stage2_gap(two, one)
        tol = 1e-4 if self.device == "cpu" else 5e-2
        if not rel <= tol:
            raise AssertionError(f"2-rank stage-2 losses differ from 1 rank's: relative {rel:.2e} > {tol:g}")
        return {"collectives_per_rank": len(seqs[0]), "tensor_devices": sorted(devices),
                "stage2_loss_relative_diff_vs_1_rank": rel}

    def probe_init_head(self) -> dict:
        bb, head = _official_checkpoint(self.tmp)
        out = self.tmp / "probe"
        _cli(["probe", "--task", "cls", "--backbone", f"dinov2-pth:{bb}", "--data", "bundled:lfw", "--limit", "8",
              "--seeds", "0", "--epochs", "1", "--image-size", "28", "--init-head", head, "--device", self.device,
              "--no-progress", "--out", out])
        rec = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
        return {"top1": rec[-1]["value"]}

    def timm_parity(self) -> dict:
        """The timm: adapter against timm's own forward_intermediates(norm=False) on random-weight ViTs (cls; cls +
        registers with no_embed_class; a norm_pre model; a dynamic_img_size model at another size)."""
        try:
            import timm
        except Exception as e:  # noqa: BLE001 - the CUDA-built wheel may not import on a CPU machine
            raise _Skip(f"timm is not importable here ({type(e).__name__}); pip install timm to run it") from None
        from raptor.teachers.timm_vit import TimmTeacher

        dev = torch.device(self.device)
        s16, s14 = (64, 56) if self.dry else (224, 224)
        cases = [("vit_small_patch16_224", {}, s16, s16), ("vit_small_patch14_reg4_dinov2", {}, s14, s14),
                 ("vit_base_patch16_clip_224", {}, s16, s16),
                 ("vit_small_patch16_224", {"dynamic_img_size": True}, s16, s16 + 32)]  # resampled pos_embed
        worst = {}
        for name, kw, size, at in cases:
            torch.manual_seed(0)
            model = timm.create_model(name, pretrained=False, img_size=size, **kw).to(dev).eval()
            t = TimmTeacher(model, spec=f"timm:{name}")
            x = torch.randn(2, 3, at, at, device=dev)
            traj = t.trajectory(x)
            with torch.no_grad():
                inter = model.forward_intermediates(x, norm=False, output_fmt="NLC", return_prefix_tokens=True,
                                                    intermediates_only=True)
                ref = [model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))]
                ref += [torch.cat([prefix, spatial], dim=1) for spatial, prefix in inter]
            ref = torch.stack(ref, dim=1).float()
            rel = float((traj - ref).norm() / ref.norm())
            worst[f"{name}{'_dynamic' if kw else ''}@{at}"] = rel
            tol = 1e-6 if self.device == "cpu" else 1e-4
            if not rel <= tol:
                raise AssertionError(f"timm:{name} at {at} px differs from forward_intermediates: relative "
                                     f"{rel:.2e} > {tol:g}")
        return {"relative_diff_vs_forward_intermediates": worst, "timm": timm.__version__}

    def open_clip_parity(self) -> dict:
        """The open_clip: adapter against the tower's own forward (hooks on ln_pre and every residual block) and
        its pooled, projected image embedding (ln_post on the cls token @ proj), random weights."""
        try:
            import open_clip
        except Exception as e:  # noqa: BLE001
            raise _Skip(f"open_clip is not importable here ({type(e).__name__}); pip install open_clip_torch to "
                        "run it") from None
        from raptor.teachers.open_clip_vit import OpenClipTeacher

        dev = torch.device(self.device)
        torch.manual_seed(0)
        visual = open_clip.create_model("ViT-B-32", pretrained=None).visual.to(dev).float().eval()
        t = OpenClipTeacher(visual, spec="open_clip:ViT-B-32")
        x = torch.randn(2, 3, 224, 224, device=dev)
        traj = t.trajectory(x)
        seen = []

        def keep(_m, _i, out):
            seen.append(out if out.shape[0] == x.shape[0] else out.transpose(0, 1))

        hooks = [visual.ln_pre.register_forward_hook(keep)]
        hooks += [b.register_forward_hook(keep) for b in visual.transformer.resblocks]
        try:
            with torch.no_grad():
                pooled = visual(x)
        finally:
            for h in hooks:
                h.remove()
        ref = torch.stack(seen, dim=1).float()
        rel = float((traj - ref).norm() / ref.norm())
        with torch.no_grad():
            ours = visual.ln_post(traj[:, -1])[:, 0] @ visual.proj
        rel_pooled = float((ours - pooled).norm() / pooled.norm())
        tol = 1e-6 if self.device == "cpu" else 1e-4
        if not max(rel, rel_pooled) <= tol:
            raise AssertionError(f"open_clip ViT-B-32 differs from its own forward: relative {rel:.2e} (layers), "
                                 f"{rel_pooled:.2e} (pooled embedding) > {tol:g}")
        return {"relative_diff_layers": rel, "relative_diff_pooled": rel_pooled, "open_clip": open_clip.__version__}

    def host_syncs(self) -> dict:
        from raptor.surrogate.block import BlockConfig
        from raptor.surrogate.model import RaptorModel, SurrogateConfig

        dev = torch.device(self.device)
        model = RaptorModel(SurrogateConfig([list(range(1, 8)), list(range(8, 13))],
                                            BlockConfig(dim=384, num_heads=6))).to(dev)
        x = torch.randn(8, 257, 384, device=dev)
        model(x, 0, 12)[-1].float().pow(2).mean().backward()  # warm-up
        torch.cuda.synchronize()
        import warnings

        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(x, 0, 12)
                out[-1].float().pow(2).mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        if syncs:
            raise AssertionError(f"{syncs} host syncs in one stage-2 forward + backward")
        return {"host_syncs_per_step": syncs}

    def peak_memory(self) -> dict:
        return {"max_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--dry-run", action="store_true", help="the same checks on the CPU at tiny sizes")
    a = p.parse_args(argv)
    device = "cpu" if a.dry_run else "cuda"
    if not a.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU visible to this torch; run with --dry-run on a CPU", file=sys.stderr)
        return 2
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="raptor-gpu-check-") as tmp:
        c = Checker(device, a.dry_run, Path(tmp))
        c.run("extract", c.extract)
        c.run("analyze", c.analyze)
        c.run("dynamics", c.dynamics)
        c.run("study", c.study)
        c.run("fit_store", c.fit_store)
        c.run("fit_online", c.fit_online)
        c.run("compile", c.compile)
        c.run("probe_init_head", c.probe_init_head)
        c.run("extract_vit_b", c.extract_vit_b)
        c.run("train_step", c.train_step)
        c.run("torchrun", c.torchrun)
        c.run("timm_parity", c.timm_parity)
        c.run("open_clip_parity", c.open_clip_parity)
        c.run("host_syncs", c.host_syncs, gpu_only=True)
        c.run("peak_memory", c.peak_memory, gpu_only=True)
    report = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "dry_run": a.dry_run, "seconds": round(time.perf_counter() - t0, 1),
              "checks": c.results,
              "not_covered": ["2 ranks on one GPU (NCCL refuses duplicate GPUs; a 1-GPU machine skips torchrun)",
                              "real DINOv2-B weights (the ViT-B-shaped teacher is random: speed, not accuracy)"]}
    (a.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    lines = [f"# GPU check: {report['device']} (torch {report['torch']}, {report['seconds']} s)", "",
             "| check | status | seconds | figures |", "|---|---|---|---|"]
    for name, r in c.results.items():
        figs = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("status", "seconds", "traceback"))
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {figs} |")
    lines += ["", "Not covered yet: " + "; ".join(report["not_covered"]) + "."]
    (a.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    failed = [n for n, r in c.results.items() if r["status"] == "fail"]
    print(f"gpu check: {len(c.results) - len(failed)} of {len(c.results)} checks pass or are skipped; wrote "
          f"{a.out / 'gpu_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
