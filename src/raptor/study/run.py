"""``raptor study``: train one small ViT per (stochastic-depth p, seed), then for each: accuracy, layer similarity,
phases, phase-structure metrics, Raptor fits (the DP phases against partition nulls of the same k: balanced random
contiguous partitions and shuffled non-contiguous partitions with the DP phase sizes; or, as before, any random
contiguous partitions) and the layer-swap tests (the paper's random draws, and all single swaps compared at equal
depth distance against contiguous partitions as the null, phases chosen and swaps scored on different images);
finally correlations across the sweep and the paper's Figures 3 and 4 (docs/method.md §8).

Everything a run produces is cached under ``OUT/runs/p<p>_s<seed>/`` and marked complete by ``result.json``
(written last); the ViT trains with per-epoch checkpoints and each fit resumes from its own checkpoint, so an
interrupted sweep resumes where it stopped without retraining anything finished.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from raptor.config import atomic_write_text, save_config, to_dict
from raptor.data import ImageItem, ImageSource
from raptor.data.sampling import check_sample_order
from raptor.distributed import resolve_device
from raptor.errors import RaptorError, check_positive
from raptor.lifecycle import command_run
from raptor.outputs import safe_name
from raptor.phases import (
    contiguous_partitions,
    contiguous_segmentation,
    is_contiguous,
    phase_metrics,
    recursive_max_cut,
)
from raptor.progress import console
from raptor.similarity import SimilarityAccumulator
from raptor.store import extract
from raptor.study import report
from raptor.study.swap import head_top1, layer_swap_test, matched_swap_test
from raptor.study.vit import TrainConfig, ViTConfig, load_split, train_vit
from raptor.surrogate.config import FitConfig
from raptor.surrogate.fit import run_fit
from raptor.surrogate.run_dir import FitRun
from raptor.teachers import load_teacher
from raptor.tracking import Tracker, check_log_to

PRIMARY = "mean_layer_similarity"
# the nulls the DP phases are compared with (``--partitions``): "random" = any contiguous partition of the same k
# (the published study's baseline, dominated by degenerate cuts such as [1, 11]); "balanced" = contiguous partitions
# whose every phase has at least balanced_min_size layers; "shuffled" = non-contiguous partitions with the DP phase
# sizes (the paper's shuffled control)
PARTITION_FAMILIES = ("random", "balanced", "shuffled")


@dataclass
class FitBudget:
    """The study's Raptor fits: the validated short recipe (docs/surrogate.md: a gentle stage 2, lr2 3e-4, the loss
    spread evenly over the tokens) at a small budget. Studies before this recipe used lr2 1e-3 and the paper's
    stage-2 weights 0.45/0.10/0.45, which lower held-out R² at this budget."""
    steps1: int = 80
    steps2: int = 40
    batch_size: int = 32
    lr: float = 3e-3
    lr2: float = 3e-4
    val_images: int = 128
    stats_images: int = 256
    stage2_weights: tuple[float, float, float] | None = None


@dataclass
class StudyConfig:
    data: str = "bundled:digits"
    out: str = "runs/study"
    sd: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5)
    seeds: tuple[int, ...] = (0, 1)
    ks: tuple[int, ...] = (2, 3)
    random_partitions: int = 10  # partitions per family and k
    partitions: tuple[str, ...] = ("balanced", "shuffled")
    references: bool = True  # the paper's Figure 13 points: an untrained and an over-fitted ViT (p = 0, seed 0)
    swap_samples: int = 10
    limit: int | None = None
    sample: str = "random"  # --limit: a seeded random sample (stratified by class) | sorted: the first N
    sample_seed: int = 1
    vit: ViTConfig = field(default_factory=ViTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fit: FitBudget = field(default_factory=FitBudget)
    device: str = "auto"  # the ViTs' training, the similarity pass, extraction and the Raptor fits
    log_to: tuple[str, ...] = ()  # live tracking (raptor.tracking): any of jsonl, tensorboard, wandb
    log_every: int = 1  # TensorBoard / wandb: every N epochs of a ViT's training loss

    def check(self) -> None:
        if not self.sd or not self.seeds or not self.ks:
            raise RaptorError("--sd, --seeds and --ks must each name at least one value")
        bad = [p for p in self.sd if not 0 <= p < 1]
        if bad:
            raise RaptorError(f"--sd values are drop probabilities in [0, 1), got {bad[0]}")
        if len(set(self.sd)) != len(self.sd) or len(set(self.seeds)) != len(self.seeds):
            raise RaptorError("--sd and --seeds must not repeat a value")
        if any(s < 0 for s in self.seeds):
            raise RaptorError("--seeds must be >= 0")
        self.vit.check()
        self.train.check()
        bad_k = [k for k in self.ks if not 2 <= k < self.vit.depth]
        if bad_k:
            raise RaptorError(f"--ks must lie in 2..{self.vit.depth - 1} (the ViT's depth is {self.vit.depth}), "
                              f"got {bad_k[0]}")
        if self.random_partitions < 0 or self.swap_samples < 0:
            raise RaptorError("--random and --swap-samples must be >= 0")
        bad_f = [f for f in self.partitions if f not in PARTITION_FAMILIES]
        if bad_f or len(set(self.partitions)) != len(self.partitions):
            raise RaptorError(f"--partitions takes distinct names from {', '.join(PARTITION_FAMILIES)}, got "
                              f"{','.join(self.partitions)}")

        check_sample_order(self.sample)
        check_positive(limit=self.limit, log_every=self.log_every, **{k: v for k, v in asdict(self.fit).items() if k
                                                                       in ("steps1", "steps2", "batch_size",
                                                                           "val_images", "stats_images")})
        if self.log_to:
            check_log_to(self.log_to)


def run_name(p: float, seed: int) -> str:
    return safe_name(f"p{p:g}_s{seed}")


def random_partitions(depth: int, k: int, n: int, exclude: list[list[int]], seed: int,
                      min_size: int = 1) -> list[list[list[int]]]:
    """``n`` distinct random contiguous partitions of layers 1..depth into k phases of at least ``min_size`` layers,
    none equal to ``exclude`` (all of them when fewer exist)."""
    parts = [p for p in contiguous_partitions(depth, k, min_size) if p != exclude]
    if not parts:
        return []
    pick = np.random.default_rng(seed).choice(len(parts), size=min(n, len(parts)), replace=False)
    return [parts[i] for i in sorted(pick)]


def balanced_min_size(depth: int, k: int) -> int:
    """The smallest phase of a 'balanced' partition: half the equal share, at least 2 (12 layers: k=2 -> 3)."""
    return max(2, depth // (2 * k))


def shuffled_partitions(depth: int, sizes: list[int], n: int, seed: int, tries: int = 10_000) -> list[list[list[int]]]:
    """``n`` distinct non-contiguous partitions of layers 1..depth into phases of the given sizes (each phase
    sorted, the phases ordered by their first layer): random permutations cut into ``sizes``, keeping those where
    some phase is not one stretch of consecutive layers (fewer when fewer exist)."""
    rng = np.random.default_rng(seed)
    seen, out = set(), []
    for _ in range(tries):
        if len(out) == n:
            break
        perm = rng.permutation(np.arange(1, depth + 1))
        cuts = np.cumsum([0] + list(sizes))
        part = sorted((sorted(int(x) for x in perm[cuts[i]:cuts[i + 1]]) for i in range(len(sizes))),
                      key=lambda p: p[0])
        key = str(part)
        if key in seen or is_contiguous(part):
            continue
        seen.add(key)
        out.append(part)
    return out


def partition_null(family: str, depth: int, k: int, found: list[list[int]], n: int, seed: int):
    """The ``n`` partitions of one null family for the found phases (see PARTITION_FAMILIES)."""
    if family == "random":
        return random_partitions(depth, k, n, found, seed)
    if family == "balanced":
        return random_partitions(depth, k, n, found, seed + 7, min_size=balanced_min_size(depth, k))
    return shuffled_partitions(depth, [len(p) for p in found], n, seed + 13)


def null_comparison(dp: dict, null: list[dict], keys=("r2_mean", "accuracy")) -> dict:
    """The DP fit against one family of partition fits, per score: the family's mean and sample std, the gap in
    σ, and the DP fit's rank among DP + family (1 = best; ties count for the DP)."""
    out = {"n": len(null)}
    for key in keys:
        vals = np.array([r[key] for r in null], dtype=float)
        sd = float(vals.std(ddof=1)) if len(vals) > 1 else None
        out[key] = {"dp": dp[key], "mean": float(vals.mean()) if len(vals) else None, "std": sd,
                    "gap_sigma": (dp[key] - float(vals.mean())) / sd if sd else None,
                    "rank": 1 + int((vals > dp[key]).sum()), "of": len(vals) + 1}
    return out


def _similarity(teacher, x: torch.Tensor, layout) -> np.ndarray:
    acc = SimilarityAccumulator(layout, list(range(1, teacher.depth + 1)), cka_groups=(), token_groups=(),
                                device=x.device)
    for s in range(0, len(x), 128):
        acc.update(teacher.trajectory(x[s:s + 128], layers=range(1, teacher.depth + 1)))
    return acc.result().distance("paper_cosine_distance")


def _phase_analysis(D: np.ndarray, ks) -> dict:
    L = D.shape[0]
    dp = contiguous_segmentation(D, k_max=max(ks))
    iu = np.triu_indices(L, 1)
    out = {"distance": D.tolist(), PRIMARY: float(1 - D[iu].mean()), "dp": {}, "maxcut": {}}
    for k in ks:
        ph = [[x + 1 for x in p] for p in dp.phases(k)]
        out["dp"][str(k)] = {"phases": ph, "metrics": phase_metrics(D, dp.phases(k))}
    for frac in (0.2, 0.1):
        out["maxcut"][str(frac)] = [[x + 1 for x in p] for p in sorted(recursive_max_cut(D, frac=frac))]
    return out


def _surrogate_accuracy(run: Path, teacher, x: torch.Tensor, y: torch.Tensor, layout) -> float:
    model = FitRun(run).model(teacher).to(x.device)
    return head_top1(teacher, x, y, layout, lambda h: model(h)[-1])


def _baselines(metrics: dict) -> dict:
    """Mean held-out R² of the fit's baselines (identity and ridge teacher-forced; copy-layer-0 and chained ridge
    autoregressive, the fair comparison for the autoregressive Raptor R²)."""
    return {k: v["r2_mean"] for k, v in metrics["validation"].get("baselines", {}).items()}


def _fit(cfg: StudyConfig, teacher_spec: str, store: Path, phases, out: Path, seed: int, teacher, x_te, y_te,
         layout) -> dict:
    """One Raptor fit (cached: ``out/study_fit.json`` last), evaluated by R² on its held-out images and by the
    teacher head's accuracy on the test split."""
    done = out / "study_fit.json"
    if done.is_file():
        res = json.loads(done.read_text())
        if "baselines_r2_mean" not in res and (out / "metrics.json").is_file():  # cached by an earlier version
            res["baselines_r2_mean"] = _baselines(json.loads((out / "metrics.json").read_text()))
        return res

    if out.exists() and not (out / "checkpoints" / "latest.json").is_file() and not (out / "metrics.json").is_file():
        shutil.rmtree(out)  # killed before its first checkpoint: nothing to keep
    b = cfg.fit
    fc = FitConfig(teacher=teacher_spec, data=None, store=str(store), out=str(out), phases=phases,
                   steps1=b.steps1, steps2=b.steps2, batch_size=b.batch_size, lr=b.lr, lr2=b.lr2,
                   val_images=b.val_images, stats_images=b.stats_images, probe_data=None, seed=seed,
                   stage2_weights=b.stage2_weights, ckpt_every=max(b.steps1, b.steps2), device=cfg.device)
    if (out / "metrics.json").is_file():
        m = json.loads((out / "metrics.json").read_text())
    else:
        m = run_fit(fc, resume=(out / "checkpoints" / "latest.json").is_file(), progress=False, teacher=teacher)
    ar = m["validation"]["autoregressive"]
    res = {"phases": phases, "r2_mean": ar["r2_mean"], "r2": ar["r2"],
           "r2_groups_mean": {g: float(np.mean(v)) for g, v in ar["r2_groups"].items()},
           "identity_r2_mean": m["validation"]["baselines"]["identity"]["r2_mean"],
           "baselines_r2_mean": _baselines(m),
           "accuracy": _surrogate_accuracy(out, teacher, x_te, y_te, layout), "train_seconds": m["train_seconds"]}
    atomic_write_text(done, json.dumps(res, indent=1))
    return res


REFERENCES = {
    "untrained": "the ViT at its initialisation (0 epochs)",
    "overfit": "trained on 1/8 of the training split for 4 x the epochs, no augmentation, no weight decay",
}


def _reference_run(cfg: StudyConfig, kind: str, data, run_dir: Path, progress: bool) -> dict:
    """One Figure-13 reference point (p = 0, seed 0): the same pipeline (similarity, phases, DP fits; no partition
    nulls or swaps) on an untrained or an over-fitted ViT."""
    import dataclasses

    sub = dataclasses.replace(cfg, partitions=(), swap_samples=0)
    if kind == "untrained":
        sub.train = dataclasses.replace(cfg.train, epochs=0)
    else:
        sub.train = dataclasses.replace(cfg.train, epochs=4 * cfg.train.epochs, shift=0, flip=False,
                                        weight_decay=0.0)
        g = torch.Generator().manual_seed(4321)
        keep = torch.randperm(len(data.x_train), generator=g)[: max(len(data.x_train) // 8, 2)].sort().values
        # the ViT over-fits 1/8 of the training split; its Raptor fits train on the whole split, as in the sweep
        return _tag(_one_run(sub, 0.0, 0, data, run_dir, progress, vit_train=(data.x_train[keep],
                                                                                 data.y_train[keep])), kind)
    return _tag(_one_run(sub, 0.0, 0, data, run_dir, progress), kind)


def _tag(res: dict, kind: str) -> dict:
    res["reference"] = {"kind": kind, "what": REFERENCES[kind]}
    return res


def _one_run(cfg: StudyConfig, p: float, seed: int, data, run_dir: Path, progress: bool,
             vit_train: tuple | None = None, tracker: Tracker | None = None) -> dict:
    done = run_dir / "result.json"
    if done.is_file():
        return _upgrade(json.loads(done.read_text()), run_dir)
    x_tr, y_tr, x_te, y_te, tf = data.x_train, data.y_train, data.x_test, data.y_test, data.transform
    if vit_train is not None:  # the ViT trains on these (the Figure-13 over-fitted reference); the fits on data
        x_tr, y_tr = vit_train
    t0 = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    on_epoch = None
    if tracker is not None:
        def on_epoch(epoch: int, loss: float) -> None:
            tracker.log_metrics(f"vit/{run_dir.name}", epoch, {"train_loss": loss}, p=p, seed=seed,
                                last=epoch == cfg.train.epochs)
    summary = train_vit(cfg.vit, cfg.train, p, seed, x_tr, y_tr, x_te, y_te, run_dir / "vit", tf.mean, tf.std,
                        progress=progress, on_epoch=on_epoch)
    spec = f"hf:{(run_dir / 'vit' / 'model').resolve()}"
    device = x_te.device  # run_study put the data on --device
    teacher = load_teacher(spec).to(device)
    layout = teacher.layout(cfg.vit.image_size)
    D = _similarity(teacher, x_te, layout)
    phases = _phase_analysis(D, cfg.ks)
    store = run_dir / "store"  # without labels: the study scores accuracy through the ViT's own head, so the fits
    # need not fit their own logistic-regression probes
    unlabelled = [ImageItem(it.id, it.load) for it in data.items_train]
    extract(teacher, ImageSource(data.source.spec, unlabelled), store, dtype="float32", image_size=cfg.vit.image_size,
            progress=False, device=device)
    fits: dict = {}
    for k in cfg.ks:
        dp_ph = phases["dp"][str(k)]["phases"]
        fits[str(k)] = {"dp": _fit(cfg, spec, store, dp_ph, run_dir / f"fit_k{k}", seed, teacher, x_te, y_te, layout),
                        "nulls": {}}
        for family in cfg.partitions:
            parts = partition_null(family, cfg.vit.depth, k, dp_ph, cfg.random_partitions, seed * 100 + k)
            fits[str(k)][family] = [_fit(cfg, spec, store, ph, run_dir / f"{family}_k{k}_{i}", seed, teacher, x_te,
                                         y_te, layout) for i, ph in enumerate(parts)]
            fits[str(k)]["nulls"][family] = null_comparison(fits[str(k)]["dp"], fits[str(k)][family])
        if "random" in cfg.partitions:  # the published study's fields
            for key in ("r2_mean", "accuracy"):
                c = fits[str(k)]["nulls"]["random"][key]
                fits[str(k)][f"gap_sigma_{key}"] = c["gap_sigma"]
                fits[str(k)][f"random_{key}_mean"], fits[str(k)][f"random_{key}_std"] = c["mean"], c["std"]
    swap_k = max(cfg.ks)
    swap = layer_swap_test(teacher, x_te, y_te, layout, phases["dp"][str(swap_k)]["phases"],
                           samples=cfg.swap_samples, seed=seed) if cfg.swap_samples else {}
    if cfg.swap_samples:
        swap["matched"] = _matched_swaps(teacher, x_te, y_te, layout, swap_k, seed)
    result = {"p": p, "seed": seed, "teacher": spec, "train": summary, "teacher_accuracy": summary["test_accuracy"],
              "phases": phases, "fits": fits, "swap": swap, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(done, json.dumps(result, indent=1))
    return result


def _track_run(tracker: Tracker, cfg: StudyConfig, i: int, r: dict) -> None:
    """One finished (p, seed) run, at step = its place in the grid: teacher accuracy, block similarity and, per k,
    the DP fit's R² and top-1 (and its gap to each partition null, in σ)."""
    vals = {"p": r["p"], "teacher_accuracy": r["teacher_accuracy"], PRIMARY: r["phases"][PRIMARY]}
    for k, f in r["fits"].items():
        vals[f"raptor_k{k}_r2_mean"] = f["dp"]["r2_mean"]
        vals[f"raptor_k{k}_top1"] = f["dp"]["accuracy"]
        for family, c in f.get("nulls", {}).items():
            vals[f"raptor_k{k}_r2_gap_sigma_vs_{family}"] = c["r2_mean"]["gap_sigma"]
    tracker.log_metrics("study", i, vals, p=r["p"], seed=r["seed"], last=i == len(cfg.sd) * len(cfg.seeds) - 1)


def _matched_swaps(teacher, x: torch.Tensor, y: torch.Tensor, layout, k: int, seed: int) -> dict:
    """The depth-matched swap test on held-out images: the test images are split in two by a seeded permutation;
    the DP phases for k are chosen on the first half's similarity, and every single swap is scored on the second."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 1))
    a, b = perm[: len(x) // 2], perm[len(x) // 2:]
    dp = contiguous_segmentation(_similarity(teacher, x[a], layout), k_max=k)
    phases = [[t + 1 for t in p] for p in dp.phases(k)]
    res = matched_swap_test(teacher, x[b], y[b], layout, phases)
    res.update(chosen_on=f"{len(a)} test images", scored_on=f"the other {len(b)} test images")
    return res


def _upgrade(result: dict, run_dir: Path) -> dict:
    """Fill in what an earlier version did not cache (the fits' baselines; the comparison with the random
    partitions in the current form) from the fits' own files."""
    for f in result["fits"].values():
        if "nulls" not in f and "random" in f:
            f["nulls"] = {"random": null_comparison(f["dp"], f["random"])}
    for k, f in result["fits"].items():
        dirs = [(f["dp"], run_dir / f"fit_k{k}")] + [(fit, run_dir / f"{fam}_k{k}_{i}") for fam in PARTITION_FAMILIES
                                                     for i, fit in enumerate(f.get(fam, []))]
        for fit, d in dirs:
            if "baselines_r2_mean" not in fit and (d / "metrics.json").is_file():
                fit["baselines_r2_mean"] = _baselines(json.loads((d / "metrics.json").read_text()))
    return result


def spearman_ci(x, y, n_boot: int = 2000, seed: int = 0) -> dict:
    """Spearman ρ with a percentile bootstrap 95 % CI over the runs (pairs resampled)."""
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": None, "ci95": None, "p_value": None, "n": int(len(x))}
    r = spearmanr(x, y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0 and np.ptp(y[i]) > 0:
            boots.append(spearmanr(x[i], y[i]).statistic)
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if boots else (np.nan, np.nan))
    return {"rho": float(r.statistic), "ci95": [float(lo), float(hi)], "p_value": float(r.pvalue), "n": int(len(x))}


def partial_spearman_ci(x, y, z, n_boot: int = 2000, seed: int = 0) -> dict:
    """Spearman ρ of x and y controlling for z: the Pearson correlation of the ranks of x and y after a linear
    regression of each on the ranks of z (with an intercept), a percentile bootstrap 95 % CI over runs, and the t-test
    p-value with n − 3 degrees of freedom. Over a stochastic-depth sweep (z = p) it asks whether block structure and
    fit go together beyond both following p."""
    from scipy.stats import rankdata
    from scipy.stats import t as student

    x, y, z = (np.asarray(v, dtype=float) for v in (x, y, z))
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    x, y, z = x[ok], y[ok], z[ok]

    def rho(i):
        rx, ry, rz = rankdata(x[i]), rankdata(y[i]), rankdata(z[i])
        A = np.column_stack([np.ones(len(rz)), rz])
        ex = rx - A @ np.linalg.lstsq(A, rx, rcond=None)[0]
        ey = ry - A @ np.linalg.lstsq(A, ry, rcond=None)[0]
        if ex.std() < 1e-12 or ey.std() < 1e-12:
            return None
        return float(np.corrcoef(ex, ey)[0, 1])

    n = len(x)
    r = rho(np.arange(n)) if n >= 4 else None
    if r is None:
        return {"rho": None, "ci95": None, "p_value": None, "n": int(n)}
    rng = np.random.default_rng(seed)
    boots = [b for b in (rho(rng.integers(0, n, n)) for _ in range(n_boot)) if b is not None]
    tstat = r * np.sqrt((n - 3) / max(1e-12, 1 - r * r))
    return {"rho": r, "ci95": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots else None,
            "p_value": float(2 * student.sf(abs(tstat), n - 3)), "n": int(n)}


def summarize(cfg: StudyConfig, results: list[dict]) -> dict:
    k0 = str(min(cfg.ks))
    block = [r["phases"][PRIMARY] for r in results]
    p = [r["p"] for r in results]
    r2 = [r["fits"][k0]["dp"]["r2_mean"] for r in results]
    corr = {f"rho(p, {PRIMARY})": spearman_ci(p, block),
            f"rho({PRIMARY}, raptor k={k0} R2)": spearman_ci(block, r2),
            f"rho(p, raptor k={k0} R2)": spearman_ci(p, r2),
            "rho(p, teacher accuracy)": spearman_ci(p, [r["teacher_accuracy"] for r in results])}
    # the same question with p held fixed: do block structure and fit go together beyond both following p?
    corr[f"partial rho({PRIMARY}, raptor k={k0} R2 | p)"] = partial_spearman_ci(block, r2, p)
    corr[f"partial rho({PRIMARY}, raptor k={k0} top-1 | p)"] = partial_spearman_ci(
        block, [r["fits"][k0]["dp"]["accuracy"] for r in results], p)
    for base in ("identity", "ridge_autoregressive"):  # do the baselines rise with p too?
        vals = [r["fits"][k0]["dp"].get("baselines_r2_mean", {}).get(base) for r in results]
        if all(v is not None for v in vals):
            corr[f"rho(p, baseline {base} R2)"] = spearman_ci(p, vals)
    for k in cfg.ks:
        corr[f"rho(p, dp k={k} contrast)"] = spearman_ci(p, [r["phases"]["dp"][str(k)]["metrics"]["contrast"]
                                                             for r in results])
    nulls: dict = {}
    for k in cfg.ks:
        for family in cfg.partitions:
            per = [r["fits"][str(k)].get("nulls", {}).get(family) for r in results]
            per = [c for c in per if c is not None and c["n"] > 0]
            nulls.setdefault(str(k), {})[family] = {
                key: {"runs": len(per),
                      "fraction_gap_above_1_sigma": float(np.mean([(c[key]["gap_sigma"] or 0) > 1 for c in per]))
                      if per else None,
                      "fraction_dp_beats_mean": float(np.mean([c[key]["dp"] > c[key]["mean"] for c in per]))
                      if per else None,
                      "mean_gap_sigma": float(np.mean([c[key]["gap_sigma"] for c in per
                                                       if c[key]["gap_sigma"] is not None]))
                      if any(c[key]["gap_sigma"] is not None for c in per) else None,
                      "mean_rank": float(np.mean([c[key]["rank"] for c in per])) if per else None,
                      "of": int(np.max([c[key]["of"] for c in per])) if per else None}
                for key in ("r2_mean", "accuracy")}
    matched = [r["swap"]["matched"] for r in results
               if r.get("swap", {}).get("matched") and r["swap"]["matched"].get("p_value") is not None]
    swaps = {"runs": len(matched),
             "fraction_significant": float(np.mean([m["p_value"] < 0.05 for m in matched])) if matched else None,
             "mean_effect": float(np.mean([m["effect"] for m in matched])) if matched else None}
    return {"correlations": corr, "partition_nulls": nulls, "matched_swaps": swaps}


def run_study(cfg: StudyConfig, progress: bool = True, after_run=None) -> dict:
    """Run or resume the sweep. ``after_run(name)`` is called after each finished (p, seed) (tests use it to
    interrupt)."""
    cfg.check()
    device = resolve_device(cfg.device)  # a missing GPU is refused before anything is read or written
    out = Path(cfg.out)
    data = load_split(cfg.data, cfg.vit.image_size, limit=cfg.limit, sample_seed=cfg.sample_seed, sample=cfg.sample)
    data = data._replace(**{f: getattr(data, f).to(device) for f in ("x_train", "y_train", "x_test", "y_test")})
    prev = out / "config.json"
    if prev.is_file():  # a resumed sweep must be the same sweep (new p or seeds may be added)
        old = json.loads(prev.read_text())
        mine = to_dict(cfg)
        was = {"sample": "sorted", "sample_seed": 1}  # studies before --sample took the first --limit images
        diff = [k for k in ("data", "vit", "train", "fit", "ks", "random_partitions", "swap_samples", "limit")
                if old.get(k) != mine.get(k)]
        diff += [k for k, default in (("references", False),) if old.get(k, default) != mine[k]]
        if old.get("partitions", ["random"]) != list(mine["partitions"]):  # studies before --partitions: random
            diff.append("partitions")
        if cfg.limit is not None:
            diff += [k for k in was if old.get(k, was[k]) != mine[k]]
        if diff:
            raise RaptorError(f"{out} holds a study with other settings ({', '.join(diff)}): use another --out")
        was_on = old.get("device_type", "cpu")  # sweeps from before --device ran on the CPU
        if was_on != device.type:
            raise RaptorError(f"{out} holds a study run on the {was_on}; finishing it on the {device.type} would mix "
                              f"devices within one sweep: pass --device {was_on} or use another --out")

    def has_progress(path: Path) -> bool:
        return (path / "runs").is_dir()

    with command_run(out, has_progress=has_progress), contextlib.ExitStack() as stack:
        atomic_write_text(prev, json.dumps({**to_dict(cfg), "device_type": device.type}, indent=1))
        save_config(cfg, out / "config.yaml")
        tracker = Tracker(out, cfg.log_to, every=cfg.log_every, config=to_dict(cfg)) if cfg.log_to else None
        if tracker is not None:
            stack.callback(tracker.close)
        results = []
        grid = [(p, s) for p in cfg.sd for s in cfg.seeds]
        for i, (p, s) in enumerate(grid):
            name = run_name(p, s)
            t = time.perf_counter()
            fresh = not (out / "runs" / name / "result.json").is_file()
            results.append(_one_run(cfg, p, s, data, out / "runs" / name, progress, tracker=tracker))
            if tracker is not None and fresh:  # a resumed sweep logs only the runs it finishes
                _track_run(tracker, cfg, i, results[-1])
            if progress:
                console.print(f"[{i + 1}/{len(grid)}] {name}: teacher top-1 {results[-1]['teacher_accuracy']:.3f}, "
                              f"{PRIMARY} {results[-1]['phases'][PRIMARY]:.3f}, Raptor k={min(cfg.ks)} R² "
                              f"{results[-1]['fits'][str(min(cfg.ks))]['dp']['r2_mean']:.3f} "
                              f"({time.perf_counter() - t:.0f} s)")
            if after_run is not None:
                after_run(name)
        refs = [_reference_run(cfg, kind, data, out / "runs" / f"ref_{kind}", progress) for kind in REFERENCES] \
            if cfg.references else []
        study = {"config": to_dict(cfg), "runs": results, "references": refs, **summarize(cfg, results),
                 "definitions": report.DEFINITIONS}
        study["figures"] = report.plots(out, cfg, results)
        atomic_write_text(out / "report.md", report.render(cfg, study))
        atomic_write_text(out / "study.json", json.dumps(study, indent=1))
    return study
