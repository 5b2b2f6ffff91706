"""``raptor dynamics``: the paper's dynamical reading of a ViT (docs/method.md §9) for a teacher and, side by side, a
Raptor surrogate rolled out from the teacher's layer 0.

One pass over the images (live through the teacher, or from a trajectory store holding every layer 0..L) gives the
per-image metrics; class basins are scored on the kept read-out directions; perturbation recovery then re-runs the
remaining layers on the first ``perturb_images`` images. Outputs in OUT: ``dynamics.json`` (written last: a
directory without it is an unfinished run), ``report.md`` (each of the paper's three findings stated as holds /
partly holds / does not hold, with its numbers and the criterion), ``config.yaml`` and the plots.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raptor.analyze import PRIMARY, AnalyzeConfig
from raptor.config import atomic_write_text, save_config, to_dict
from raptor.data import open_source
from raptor.data.sampling import check_sample_order
from raptor.data.transforms import check_transform
from raptor.distributed import resolve_device
from raptor.dynamics import criteria, report
from raptor.dynamics.accumulate import DynamicsAccumulator
from raptor.dynamics.metrics import boundary_jump_ratio, cosine_silhouette, knn_accuracy, knn_correct, s_shape
from raptor.dynamics.perturb import recovery, summarize, surrogate_runner, teacher_runner
from raptor.dynamics.verdicts import random_weight_teacher, robustness, surrogate_agreement, verdicts
from raptor.errors import RaptorError, check_positive
from raptor.lifecycle import command_run
from raptor.phases import PhaseSpec, choose_k, contiguous_segmentation, is_contiguous
from raptor.progress import progress_bar
from raptor.similarity import SimilarityAccumulator
from raptor.surrogate.hub import surrogate_folder
from raptor.surrogate.run_dir import FitRun
from raptor.teachers import load_teacher
from raptor.teachers.base import check_autocast
from raptor.trajectories import LiveTrajectories, StoreTrajectories

SPACES = ("raw", "normed")
BASIN_IMAGES = 5000  # kNN and silhouette are O(n²): beyond this, a uniform random sample of the labelled images


@dataclass
class DynamicsConfig:
    teacher: str = "bundled:dinov2-s"
    surrogate: str | None = None               # a raptor fit run directory for the same teacher
    data: str = "bundled:photos"
    store: str | None = None                   # read trajectories (every layer 0..L) instead of running the teacher
    out: str = "runs/dynamics"
    phases: list[list[int]] | None = None      # explicit phases (output layers 1..L)
    phases_file: str | None = None             # or an analysis.json (its chosen phases)
    limit: int | None = None
    sample: str = "random"                     # --limit: seeded random sample (stratified by class) | sorted
    sample_seed: int = 1
    batch_size: int = 16
    image_size: int | None = None
    transform: str = "paper"                   # paper | model (the teacher's own processor config)
    eps: tuple[float, ...] = (0.05, 0.2)       # relative noise sizes for perturbation recovery
    inject: list[int] | None = None            # injection layers (default: each phase's entry layer)
    perturb_images: int = 64
    rank_images: int = 64                      # ranks' relative spread over images is ~5-15 %: 64 give a ~1-2 % SE
    knn_k: int = 5
    seed: int = 0
    space: str = "raw"                         # raw: the residual stream x_ℓ (the paper's); normed: final_norm(x_ℓ)
    autocast: str | None = None
    null_draws: int = 4                        # random-weight teachers the verdicts are tested against (0: none)
    device: str = "auto"                       # the forward passes and the per-image metrics (auto: CUDA if present)

    def check(self) -> None:
        check_positive(limit=self.limit, batch_size=self.batch_size, image_size=self.image_size,
                       perturb_images=self.perturb_images, rank_images=self.rank_images, knn_k=self.knn_k)
        if self.null_draws == 1 or not 0 <= self.null_draws <= 100:
            raise RaptorError(f"--null-draws must be 0 (no random-weight null) or 2..100 (their spread is part of the "
                              f"test), got {self.null_draws}")
        if not self.eps:
            raise RaptorError("--eps is empty: give e.g. 0.05,0.2")
        check_transform(self.transform)
        if self.store and self.transform != "paper":
            raise RaptorError("--transform is for live data (--data); a --store keeps the transform it was "
                             "extracted with")
        bad = [e for e in self.eps if not (np.isfinite(e) and e > 0)]
        if bad:
            raise RaptorError(f"--eps must be > 0 (a relative noise size), got {bad[0]}")
        if self.inject is not None and (not self.inject or min(self.inject) < 0):
            raise RaptorError(f"--inject layers must be >= 0, got {self.inject}")
        if self.space not in SPACES:
            raise RaptorError(f"unknown --space {self.space!r} (use {' or '.join(SPACES)})")
        if self.phases is not None and self.phases_file is not None:
            raise RaptorError("give --phases as layers or as an analysis.json, not both")

        check_sample_order(self.sample)
        check_autocast(self.autocast)


def _summary(a: np.ndarray) -> dict:
    """Mean, std and standard error of the mean over images, per layer."""
    return {"mean": a.mean(0).tolist(), "std": a.std(0).tolist(), "sem": (a.std(0) / np.sqrt(len(a))).tolist()}


def _open_inputs(cfg: DynamicsConfig):
    """Cheap checks before the output directory or any model is touched: the surrogate run, the store or data."""
    sur = None
    if cfg.surrogate:
        folder = surrogate_folder(cfg.surrogate)  # hf-raptor:<folder or repo>: a shared surrogate
        if not folder.is_dir():
            raise RaptorError(f"--surrogate {cfg.surrogate}: no such run directory")
        sur = FitRun(folder).require_weights(f"--surrogate {cfg.surrogate}")
        sur.surrogate_config  # a damaged surrogate.json is one error line before the teacher loads
        if sur.teacher_spec != cfg.teacher:
            raise RaptorError(f"surrogate run {cfg.surrogate} was fit on teacher {sur.teacher_spec}, not "
                              f"{cfg.teacher} (pass --teacher {sur.teacher_spec})")
    st = src = None
    if cfg.store:
        st = StoreTrajectories.open(cfg.store, command="dynamics", limit=cfg.limit, seed=cfg.sample_seed,
                                    order=cfg.sample, every_layer=True, teacher_spec=cfg.teacher)
    else:
        src = open_source(cfg.data).subset(cfg.limit, cfg.sample_seed, cfg.sample)
    if cfg.phases_file is not None:
        if not Path(cfg.phases_file).is_file():
            raise RaptorError(f"--phases {cfg.phases_file}: no such file")
        PhaseSpec(file=cfg.phases_file).count()  # a bad file is one error line before the teacher loads
    return sur, st, src


def run_dynamics(cfg: DynamicsConfig, progress: bool = True) -> dict:
    cfg.check()
    resolve_device(cfg.device)  # a missing GPU is refused before anything is read or written
    sur, st, src = _open_inputs(cfg)
    out = Path(cfg.out)
    with command_run(out, final="dynamics.json") as run:
        return _run(cfg, sur, st, src, run.stage, progress)


def _given_phases(cfg, depth: int) -> tuple[list[list[int]], str] | None:
    """Phases from --phases (layers or an analysis.json), checked against the teacher before the pass."""
    if cfg.phases is not None:
        phases = PhaseSpec.of(cfg).resolve(depth)
        if not is_contiguous(phases) or phases != sorted(phases):
            raise RaptorError(f"dynamics --phases must be contiguous phases in depth order (they set the phase "
                              f"boundaries and entry layers), got {cfg.phases}; a surrogate with non-contiguous "
                              f"phases is fine as --surrogate")
        return phases, "given (--phases)"
    if cfg.phases_file is not None:
        phases = PhaseSpec.of(cfg).resolve(depth)
        if phases[-1][-1] != depth:
            raise RaptorError(f"--phases {cfg.phases_file} covers layers 1..{phases[-1][-1]}, the teacher has "
                              f"{depth}")
        return phases, f"{cfg.phases_file} (its chosen phases)"
    return None


def _computed_phases(depth: int, sim) -> tuple[list[list[int]], str]:
    """The phases ``raptor analyze`` would choose with its defaults (DP on its primary metric, k by its rule)."""
    d = AnalyzeConfig()
    dp = contiguous_segmentation(sim.result().distance(PRIMARY), k_max=min(d.k_max, depth))
    k = choose_k(dp, d.k_rule, d.k_frac)
    return [[x + 1 for x in p] for p in dp.phases(k)], (
        f"computed in this pass: DP on the paper's cosine distance over layers 1..{depth}, k = {k} by the "
        f"{d.k_rule} rule (as raptor analyze)")


def _basins(res: dict, k: int) -> dict:
    """kNN accuracy and silhouette per layer on the kept labelled images (at most BASIN_IMAGES, a uniform sample)."""
    y = res["labels"]
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2 or counts.min() < 2:
        return {"available": False, "reason": "needs labels with at least 2 classes of at least 2 images each "
                                              f"(labelled images: {len(y)}, classes: {len(classes)})"}
    feats = res["readout"]
    knn, sil = [], []
    for layer in range(feats.shape[1]):
        knn.append(knn_accuracy(feats[:, layer], y, k=k))
        sil.append(cosine_silhouette(feats[:, layer], y))
    chance = float(np.bincount(y).max() / len(y))
    emb = res["embedded"]
    return {"available": True, "n_images": int(len(y)), "n_labelled": int(res["n_labelled"]),
            "n_classes": int(len(classes)), "knn_k": k,
            "knn_accuracy": knn, "silhouette": sil, "majority_baseline": chance,
            "embedded_baseline": {"knn_accuracy": knn_accuracy(emb, y, k=k), "silhouette": cosine_silhouette(emb, y)}}


def _basin_correct(res: dict, null_results: dict, basins: dict, k: int) -> dict | None:
    """Per labelled image: LOO kNN right at the model's best layer, with the embedded pixels, and with each null
    teacher at that layer (for the basin verdict)."""
    if not basins.get("available"):
        return None
    best = int(np.argmax(basins["knn_accuracy"]))
    y = res["labels"]
    nulls = []
    for n in null_results.values():  # each null at its own best layer: the same selection as the model's
        if len(n["labels"]) != len(y):
            continue
        own = int(np.argmax([knn_accuracy(n["readout"][:, layer], n["labels"], k)
                             for layer in range(n["readout"].shape[1])]))
        nulls.append(knn_correct(n["readout"][:, own], n["labels"], k))
    return {"best_layer": best, "correct_best": knn_correct(res["readout"][:, best], y, k),
            "correct_embedded": knn_correct(res["embedded"], y, k), "null_correct_best": nulls}


def _model_summary(res: dict, phases, basins: dict) -> dict:
    d = {"n_images": res["n_images"], "n_ranked": res["n_ranked"],
         "gamma": {g: _summary(v) for g, v in res["gamma"].items()},
         "speed": {g: _summary(v) for g, v in res["speed"].items()},
         "coherence": _summary(res["coherence"]),
         "ranks": {k: _summary(v) for k, v in res["ranks"].items()},
         "basins": basins}
    d["s_shape"] = {g: s_shape(np.asarray(v["mean"])) for g, v in d["gamma"].items()}
    d["speed_boundary_jump_ratio"] = {g: boundary_jump_ratio(np.asarray(v["mean"]), phases)
                                      for g, v in d["speed"].items()}
    return d


def _run(cfg: DynamicsConfig, sur, st, src, stage: Path, progress: bool) -> dict:
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher)
    # the verdicts' null: the same architecture and embedding with freshly initialised blocks, on the same images
    # (drawn from the teacher on the CPU, before it moves: no extra device copy of it)
    nulls = {f"random_weights_{i}": random_weight_teacher(teacher, cfg.seed * 1000 + i + 1).to(device)
             for i in range(cfg.null_draws)}
    teacher = teacher.to(device)
    if st is not None:
        st.store.check_teacher(teacher)
    trajs = st if st is not None else LiveTrajectories(teacher, src, cfg.image_size, cfg.autocast, cfg.transform)
    layout = trajs.layout
    model = sur.model(teacher).to(device) if sur is not None else None
    L = teacher.depth
    view = _view(teacher, cfg.space)
    given = _given_phases(cfg, L)  # refuse bad phases before the pass
    if cfg.inject is not None and max(cfg.inject) >= L:
        raise RaptorError(f"--inject layers must lie in 0..{L - 1} (noise at layer L has no layers left to run)")

    accs = {name: DynamicsAccumulator(layout, L + 1, cfg.rank_images, BASIN_IMAGES, cfg.seed)
            for name in (("teacher", "surrogate") if model is not None else ("teacher",))}
    null_accs = {name: DynamicsAccumulator(layout, L + 1, cfg.rank_images, BASIN_IMAGES, cfg.seed) for name in nulls}
    sim = SimilarityAccumulator(layout, list(range(1, L + 1)), cka_groups=(), token_groups=(), device=device) \
        if given is None else None
    x0_keep: list[torch.Tensor] = []
    n_keep = 0
    t_pass = time.perf_counter()
    with progress_bar(len(trajs), "dynamics" + (" (store)" if st is not None else ""), "img",
                      enabled=progress) as bar:
        for traj, labels, _ in trajs.batches(cfg.batch_size, None, bar):
            traj = traj.to(device)  # a store's rows arrive on the CPU
            accs["teacher"].update(view(traj), labels)
            if sim is not None:
                sim.update(traj[:, 1:])
            if model is not None:
                with torch.no_grad():
                    own = torch.stack([traj[:, 0]] + model(traj[:, 0].clone()), 1)
                accs["surrogate"].update(view(own), labels)
            for name, nt in nulls.items():
                null_accs[name].update(view(teacher_runner(nt)(traj[:, 0].float(), 0)), labels)
            if n_keep < cfg.perturb_images:
                x0_keep.append(traj[: cfg.perturb_images - n_keep, 0].clone())
                n_keep += len(x0_keep[-1])
    seconds_pass = time.perf_counter() - t_pass
    if accs["teacher"].n == 0:
        raise RaptorError("no images could be read")
    phases, phases_source = given or _computed_phases(L, sim)
    inject = sorted(set(cfg.inject)) if cfg.inject is not None else sorted({p[0] - 1 for p in phases})

    results = {name: acc.result() for name, acc in accs.items()}
    null_results = {name: acc.result() for name, acc in null_accs.items()}
    t_basin = time.perf_counter()
    basins = {name: _basins(r, cfg.knn_k) for name, r in results.items()}
    seconds_basins = time.perf_counter() - t_basin
    models = {name: _model_summary(r, phases, basins[name]) for name, r in results.items()}

    # perturbation recovery: states at the injection layers from layer 0 by each model's own dynamics
    t_pert = time.perf_counter()
    x0 = torch.cat(x0_keep)
    runners = {"teacher": teacher_runner(teacher)}
    if model is not None:
        runners["surrogate"] = surrogate_runner(model)
    runners.update({name: teacher_runner(nt) for name, nt in nulls.items()})
    null_recovery = {}
    groups = accs["teacher"].groups
    n_runs = len(runners) * len(inject) * len(x0)
    with progress_bar(n_runs, "perturbation recovery", "img", enabled=progress) as bar:
        for name, run in runners.items():  # states at the injection layers, batch by batch from layer 0
            parts = [run(x0[s:s + cfg.batch_size], 0)[:, inject] for s in range(0, len(x0), cfg.batch_size)]
            states = dict(zip(inject, torch.cat(parts).unbind(1)))
            rec = recovery(run, states, list(cfg.eps), layout, phases, groups=groups, seed=cfg.seed,
                           batch_size=cfg.batch_size, bar=bar, view=view)
            if name in nulls:
                null_recovery[name] = rec
            else:
                models[name]["perturbation"] = {"runs": rec, "summary": summarize(rec)}
    seconds_pert = time.perf_counter() - t_pert
    t_tests = time.perf_counter()
    tests = {name: verdicts(results[name], list(null_results.values()),
                            {"model": models[name]["perturbation"]["runs"], "nulls": list(null_recovery.values())},
                            phases, L, _basin_correct(results[name], null_results, basins[name], cfg.knn_k),
                            seed=cfg.seed) for name in models}
    seconds_tests = time.perf_counter() - t_tests

    findings = {name: criteria.findings(m, phases, L) for name, m in models.items()}
    dyn = {
        "config": to_dict(cfg),
        "teacher": teacher.describe(),
        "surrogate": {"run": str(sur.path.resolve()), "phases": sur.surrogate_config.phases} if sur else None,
        "data": {"spec": None if st is not None else cfg.data, "store": cfg.store, "n_images": results["teacher"]
                 ["n_images"], "source": "store" if st is not None else "live",
                 "sample": trajs.sample_record()},
        "layout": layout.to_dict(),
        "layers": list(range(L + 1)),
        "layer_convention": "layer 0 = embedding output; layer l = output of block l (before the final norm); "
                            "speed and rank entry i is the step from layer i to i + 1",
        "phases": phases, "phases_source": phases_source,
        "readout": accs["teacher"].readout_name,
        "space": cfg.space,
        "inject_layers": inject, "eps": list(cfg.eps), "perturb_images": int(len(x0)),
        "definitions": criteria.DEFINITIONS,
        "models": models,
        "findings": findings,
        "verdicts": tests,
        "surrogate_agreement": surrogate_agreement(results["teacher"], results["surrogate"], cfg.seed)
        if "surrogate" in results else None,
        "robustness": {name: robustness(v) for name, v in tests.items()},
        "null": {"draws": cfg.null_draws, "what": "random-weight teachers: the teacher's embedding and final norm, "
                 "every block parameter redrawn by the architecture's own initialiser (seeded)",
                 "summaries": {name: {"gamma_all": _summary(r["gamma"]["all"])["mean"]}
                               for name, r in null_results.items()}},
        "timing": {"pass_s": round(seconds_pass, 3), "basins_s": round(seconds_basins, 3),
                   "perturbation_s": round(seconds_pert, 3), "tests_s": round(seconds_tests, 3),
                   "total_s": round(time.perf_counter() - t_start, 3)},
    }
    dyn["figures"] = report.plots(stage, dyn, results, basins)
    save_config(cfg, stage / "config.yaml")
    atomic_write_text(stage / "report.md", report.render(dyn))
    atomic_write_text(stage / "dynamics.json", json.dumps(dyn, indent=1, default=_json_default))
    return dyn


def _view(teacher, space: str):
    """The space the metrics read: the residual stream as is, or every layer through the teacher's final norm."""
    if space == "raw":
        return lambda t: t

    @torch.no_grad()
    def normed(t: torch.Tensor) -> torch.Tensor:
        return teacher.final_norm(t)

    return normed


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)
