"""``raptor fit``: train a Raptor surrogate end to end and evaluate it against the teacher.

Wiring only: data (store rows or online images, whole images held out), training-set statistics
(:mod:`raptor.surrogate.stats`), the training loop (:mod:`raptor.surrogate.train`) and the evaluation with its
baselines and probes (:mod:`raptor.surrogate.evaluate`). Outputs in OUT: ``config.yaml``, ``checkpoints/``
(resumable; ``--resume`` on a finished run re-evaluates it), ``model.safetensors`` + ``surrogate.json``,
``metrics.json`` (written last) and plots ``r2_per_layer.png``, ``loss_curves.png``.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from raptor import plots
from raptor.analyze import PhaseFinder
from raptor.config import atomic_write_text, save_config, to_dict
from raptor.data import TrainTransform, load_images, open_source
from raptor.data.sources import ImageLoadWarning, ImageSource, image_source_of
from raptor.distributed import Dist, check_block_groups, rows_per_rank, setup
from raptor.errors import RaptorError
from raptor.lifecycle import command_run
from raptor.outputs import staged
from raptor.store import TrajectoryStore
from raptor.surrogate.batches import (
    OnlineBatches,
    StoreBatches,
    evenly_spaced,
    holdout_split,
    to_device,
    training_bytes,
)
from raptor.surrogate.checkpoint import save_tensors
from raptor.surrogate.config import FitConfig
from raptor.surrogate.evaluate import head_agreement, probe_evaluation, validate
from raptor.surrogate.losses import effective_group_weights
from raptor.surrogate.run_dir import FitRun, block_checkpoints, check_existing_run
from raptor.surrogate.train import build_model, compute_stats, train
from raptor.teachers import load_teacher
from raptor.trajectories import StoreTrajectories

log = logging.getLogger("raptor")


@dataclass
class FitPlan:
    """A fit resolved once, before the teacher loads: what it trains on (a store's sampled ``rows`` or an image
    ``source``), what it holds out (positions in that data, or the whole photos of ``--val-data``), the ``--limit``
    record, and the number of blocks when the phases are known without data."""

    store: TrajectoryStore | None
    source: ImageSource | None
    rows: np.ndarray | None
    train_pos: np.ndarray
    val_pos: np.ndarray
    train_items: list | None
    val_items: list | None
    sample: dict
    n_blocks: int | None
    warnings: list[str]  # said once the run is claimed (a refused run prints only its error line)


def _split(n: int, val_images: int, said: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`holdout_split`, its warning kept in ``said`` for later."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = holdout_split(n, val_images)
    said += [str(w.message) for w in caught]
    return out


def resolve_fit(cfg: FitConfig) -> FitPlan:
    """The data, hold-out and phases of ``cfg``, checked: every refusal here comes before the teacher loads."""
    cfg.check()
    st = src = rows = tr_items = val_items = None
    said: list[str] = []
    if cfg.store:
        trajs = StoreTrajectories.open(cfg.store, command="fit", limit=cfg.limit, seed=cfg.sample_seed,
                                       order=cfg.sample, complete_why="fit never trains on part of a store",
                                       teacher_spec=cfg.teacher, every_layer=True)
        st, rows = trajs.store, trajs.rows
        depth = trajs.depth
        tr_pos, val_pos = _split(len(rows), cfg.val_images, said)
        if cfg.phase_spec.layers is not None:
            cfg.phase_spec.resolve(depth)
        elif cfg.phases_file is None and cfg.k is not None and cfg.k > depth:
            raise RaptorError(f"--k must lie in 1..{depth} (the teacher's depth), got {cfg.k}")
        sample = trajs.sample_record()
    else:
        src = open_source(cfg.data).subset(cfg.limit, cfg.sample_seed, cfg.sample)
        sample = src.sample_info()
        if cfg.val_data:  # whole photos held out: no crop of a held-out photo is ever trained on
            try:
                val_src = open_source(cfg.val_data)
            except RaptorError as e:
                raise RaptorError(f"--val-data: {e}") from None
            tr_items, val_items, holdout = held_out_photos(src, val_src)  # refused if nothing is left to train on
            train_ids = {x.id for x in tr_items}
            tr_pos = np.array([i for i, it in enumerate(src.items) if it.id in train_ids])
            val_pos = np.zeros(0, np.int64)
            sample = {**sample, "holdout": holdout}
        else:
            tr_pos, val_pos = _split(len(src.items), cfg.val_images, said)
            tr_items, val_items = [src.items[i] for i in tr_pos], [src.items[i] for i in val_pos]
    n_blocks = cfg.phase_spec.count(depth if st is not None else None)
    return FitPlan(st, src, rows, tr_pos, val_pos, tr_items, val_items, sample, n_blocks, said)


def run_fit(cfg: FitConfig, resume: bool = False, progress: bool = True, on_step=None, teacher=None) -> dict:
    """Validate (settings, data, phases, an existing run: all before the teacher loads), lock ``cfg.out``, train,
    evaluate. A refused or failed run never harms an earlier result and leaves no directory it created without a
    checkpoint; the final files move in together at the end (``metrics.json`` last). ``teacher``: the already
    loaded teacher of ``cfg.teacher`` (a sweep of many fits loads it once)."""
    out = Path(cfg.out)
    plan = resolve_fit(cfg)
    n_blocks = plan.n_blocks
    if cfg.probe_data:
        open_source(cfg.probe_data)
    if cfg.init_from is not None:
        FitRun(cfg.init_from).surrogate_config
    check_existing_run(cfg, resume)  # refuse early; checked again under the lock
    dist, device = setup(cfg.device)
    check_device_autocast(cfg.autocast, device)
    rows_per_rank(cfg.batch_size, dist.world)  # refused before the teacher loads
    if cfg.image_loss > 0 and cfg.batch_size // dist.world < 2:
        raise RaptorError(f"--image-loss needs >= 2 images per process to compare (--batch-size {cfg.batch_size} "
                          f"over {dist.world} processes)")
    if cfg.parallel_blocks and cfg.stage in ("1", "both") and n_blocks and n_blocks > 1:
        check_block_groups(cfg.batch_size, n_blocks, dist.world)  # every rank, before any data or output

    def has_checkpoint(path: Path) -> bool:
        return (path / "checkpoints" / "latest.json").is_file() or bool(block_checkpoints(path))

    # rank 0 holds the lock and writes every file; the other ranks (torchrun) train their shares
    with command_run(out, placed=(dist, device), has_progress=has_checkpoint,
                     then=lambda: check_existing_run(cfg, resume)):
        return _run_fit(cfg, plan, out, resume, progress and dist.main, on_step, teacher, dist, device)


def _run_fit(cfg: FitConfig, plan: FitPlan, out: Path, resume: bool, progress: bool, on_step, teacher=None,
             dist=None, device=None) -> dict:
    st, src, sample, tr_pos, val_pos = plan.store, plan.source, plan.sample, plan.train_pos, plan.val_pos
    dist = dist or Dist()
    device = device or torch.device("cpu")
    if teacher is None:
        teacher = load_teacher(cfg.teacher)
    elif teacher.spec != cfg.teacher:
        raise RaptorError(f"the teacher passed in is {teacher.spec}, the config names {cfg.teacher}")
    # phases given (or equal ones): the model is built, and its phases checked, before any data is read; with --k
    # alone the phases come from the training images' similarity, found in the statistics pass below
    data_phases = cfg.phase_spec.from_data
    model = None if data_phases else build_model(cfg, teacher.describe(), teacher)
    if data_phases and not 1 <= cfg.k <= teacher.depth:
        raise RaptorError(f"--k must lie in 1..{teacher.depth} (the teacher's depth), got {cfg.k}")
    # labelled training data, if any: (a callable giving layer-0 tokens + labels of the probe's training images, the
    # labels of the held-out images, whose layer-0 tokens are val_traj[:, 0], data name)
    probe_inputs = None
    val_groups = None
    if st is not None:
        st.check_teacher(teacher)
    for message in plan.warnings:  # the hold-out's warning, once the model's phases and the store have passed
        warnings.warn(message, UserWarning, stacklevel=2)
    if st is not None:
        rows = plan.rows
        tr_rows, val_rows = rows[tr_pos], rows[val_pos]
        working = training_bytes(cfg.batch_size // dist.world, teacher.depth, st.layout.n_tokens, teacher.dim,
                                 len(model.blocks) if model is not None else cfg.k, cfg.autocast)
        data = StoreBatches(st, tr_rows, cfg.seed, cache_bytes=cfg.store_cache_gb * 1e9, progress=progress,
                            device=device, dist=dist, working_bytes=working, sampling=cfg.store_sampling)
        layout = st.layout
        size = int(st.meta["settings"]["transform"]["center_crop"])
        # the probes' images go through the transform the store was extracted with
        eval_tf = teacher.eval_transform(size, "model" if st.meta["settings"]["transform"].get("kind") == "model"
                                         else "paper")
        val_traj = st.read(np.sort(val_rows)) if dist.main else None
        n_train = len(tr_rows)
        labels = st.labels
        if (labels[rows] >= 0).all():
            ptr = np.sort(tr_rows[evenly_spaced(len(tr_rows), cfg.probe_limit)])
            probe_inputs = (lambda: (data.read(ptr, 0, 0)[:, 0].cpu(), labels[ptr]), labels[np.sort(val_rows)],
                            st.meta["settings"]["data"])
    else:
        tr_items, val_items = plan.train_items, plan.val_items
        eval_tf = teacher.eval_transform(cfg.image_size, cfg.transform)
        size = eval_tf.size
        data = OnlineBatches(teacher.to(device), tr_items, eval_tf, cfg.seed, cfg.crops, cfg.workers, device, dist,
                             cfg.autocast)
        layout = teacher.layout(size)
        vt, vkept = [], []
        if dist.main:
            if cfg.val_crops:
                vt, vkept = val_crop_views(val_items, cfg.val_crops, eval_tf, cfg.seed)
                val_groups = vkept  # the CI resamples photos, not the correlated crops of one photo
            else:
                vt, vkept, _ = load_images(val_items, eval_tf)
            if not vt:
                raise RaptorError("none of the held-out validation images could be read")
            # in batches, under the training targets' autocast: the held-out targets are the same teacher's
            val_traj = torch.cat([teacher.trajectory(to_device(torch.stack(vt[s:s + 64]), device),
                                                     autocast=cfg.autocast).float().cpu()
                                  for s in range(0, len(vt), 64)])
        n_train = len(tr_items)
        if (src.labels >= 0).all() and not cfg.val_data:
            ptr = tr_pos[evenly_spaced(len(tr_pos), cfg.probe_limit)]

            def probe_train():  # decoded only once training is over
                t, kept, _ = load_images([src.items[i] for i in ptr], eval_tf)
                return _embed(teacher, t), src.labels[ptr[kept]]

            probe_inputs = (probe_train, src.labels[val_pos[vkept]], cfg.data)
    if dist.main:
        save_config(cfg, out / "config.yaml")
    phase_pass = None
    if data_phases:
        phase_pass = PhaseFinder(layout, int(teacher.describe()["depth"]))
    stats = compute_stats(data, layout, cfg.stats_images, progress=progress,
                          on_batch=phase_pass.update if phase_pass else None)
    if phase_pass is not None:
        recorded = out / "phases.json"
        if resume and recorded.is_file():  # the phases this run was started with (a re-run finds the same ones)
            phases_info = _recorded_phases(recorded, phase_pass.choose(cfg.k))
        else:
            phases_info = phase_pass.choose(cfg.k, recorded if dist.main else None)
        if dist.main:
            log.info("phases (k=%s): %s  (%s)", cfg.k, phases_info["phases"], phases_info["how"])
        model = build_model(cfg, teacher.describe(), teacher, phases=phases_info["phases"])
    else:
        phases_info = {"phases": model.cfg.phases, "how": _phases_how(cfg)}
    if cfg.compile:
        for blk in model.blocks:
            blk.compile()

    def quick_val(m) -> float:  # mean held-out R^2 of the full autoregressive rollout, on the CPU
        m.cpu(), teacher.cpu()
        try:
            return validate(m, teacher, val_traj, layout, baselines=False)["autoregressive"]["r2_mean"]
        finally:
            m.to(device), teacher.to(device)

    state = train(cfg, model, data, layout, resume=resume, progress=progress, on_step=on_step,
                  validate_fn=quick_val, stats=stats, dist=dist, device=device)
    train_s = state.train_seconds  # summed over a resumed run's processes; a re-evaluation adds none
    model.cpu(), teacher.cpu()  # evaluation (128 images by default) runs on the CPU
    if not dist.main:
        return {}
    with staged(out, "metrics.json") as stage:
        return _finish(cfg, model, teacher, layout, eval_tf, probe_inputs, val_traj, state, stats, n_train, train_s,
                       stage, progress, {"phases_chosen": phases_info, "data_sample": sample}, val_groups)


def _finish(cfg: FitConfig, model, teacher, layout, eval_tf, probe_inputs, val_traj, state, stats, n_train: int,
            train_s: float, out: Path, progress: bool, record: dict, val_groups=None) -> dict:
    """Final weights, validation with baselines, probes and plots, all written into ``out`` (a staging dir)."""
    save_tensors(model.state_dict(), out / "model.safetensors")
    atomic_write_text(out / "surrogate.json", json.dumps({"surrogate": model.cfg.to_dict(), "teacher": teacher.spec},
                                                         indent=1))
    val = validate(model, teacher, val_traj, layout, stats, progress=progress, groups=val_groups)
    val["probes"] = _probes(cfg, model, teacher, layout, eval_tf, probe_inputs, val_traj[:, 0], progress)
    if teacher.head is not None:
        val["teacher_head"] = head_agreement(model, teacher, val_traj[:, 0], layout)
    params = sum(p.numel() for p in model.parameters())
    metrics = {
        "config": to_dict(cfg), "recipe": cfg.recipe_report(), **record, "surrogate": model.cfg.to_dict(),
        "teacher": teacher.describe(),
        "n_train_images": n_train, "n_val_images": len(val_traj), "parameters": params,
        "training_stats": stats.summary(),
        "group_weights": {"stage1_last": effective_group_weights(layout, cfg.stage1_last_weights),
                          "stage2": effective_group_weights(layout, cfg.stage2_weights)},
        "teacher_block_parameters": sum(p.numel() for p in teacher.blocks.parameters()),
        "validation": val, "loss_history": state.history, "train_seconds": round(train_s, 1),
        "metric_definitions": {
            "r2": "1 - SSE / sum over features of the target's variance (per-feature mean over validation tokens)",
            "r2_official": "1 - mean((pred-y)^2) / (var(pred) + 1e-6), global scalar mean (docs/method.md §6)",
            "r2_image_specific": "1 - SSE / SSE of the per-position training mean (image-blind): the share of the "
                                 "image-dependent variance explained; the position-mean baseline scores 0",
            "autoregressive": "full surrogate rolled out from teacher layer 0",
            "per_block_from_teacher": "each block rolled out over each run of its layers (a maximal stretch of "
                                      "consecutive layers; its whole phase when contiguous) from the teacher's layer "
                                      "before the run",
            "splice": "top-1 agreement with the teacher under the classifier (teacher head or a probe)"},
    }
    layers = val["layers"]
    bounds = [e + 0.5 for _, e, _ in model.cfg.runs[:-1]]  # where the block changes
    ar, sg = val["autoregressive"], val["per_block_from_teacher"]
    bl = val.get("baselines", {})
    series = {"Raptor AR (from layer 0)": ar["r2"], "Raptor per block (from teacher)": sg["r2"]}
    for key, label in (("identity", "baseline: identity l-1 → l (TF)"),
                       ("ridge_teacher_forced", "baseline: ridge l-1 → l (TF)"),
                       ("ridge_autoregressive", "baseline: ridge chained (AR)"),
                       ("copy_layer0", "baseline: copy layer 0 (AR)")):
        if key in bl:
            series[label] = bl[key]["r2"]
    plots.line_plot(out / "r2_per_layer.png", layers, series, xlabel="layer", ylabel="held-out R² (standard)",
                    title=f"Raptor k={len(model.cfg.phases)} vs {teacher.display_name} ({len(val_traj)} held-out "
                          f"images)", vlines=bounds, ylim=(-0.5, 1.02))
    if "r2_image_specific" in ar:
        series = {"Raptor AR (from layer 0)": ar["r2_image_specific"],
                  "Raptor per block (from teacher)": sg["r2_image_specific"]}
        for key, label in (("identity", "baseline: identity l-1 → l (TF)"),
                           ("ridge_autoregressive", "baseline: ridge chained (AR)"),
                           ("position_mean", "baseline: per-position mean (image-blind) = 0")):
            if key in bl:
                series[label] = bl[key]["r2_image_specific"]
        plots.line_plot(out / "r2_image_specific_per_layer.png", layers, series, xlabel="layer",
                        ylabel="held-out image-specific R²", vlines=bounds, ylim=(-1.0, 1.02),
                        title=f"Raptor k={len(model.cfg.phases)}: variance beyond the per-position mean "
                              f"({len(val_traj)} held-out images)")
    series = {name: [h[1] for h in hist] for name, hist in state.history.items()
              if hist and not name.startswith("val/")}
    if series:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, ys in series.items():
            ax.plot(ys, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=110)
        plt.close(fig)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def held_out_photos(src, val_src) -> tuple[list, list, dict]:
    """(training items, held-out items, record) when ``val_src``'s photos are held out of ``src``: every photo of
    ``val_src`` is removed from training, matched by id and by resolved file path (a folder's ids are relative to
    its root, so ``folder:/p`` and ``folder:/p/val`` name one file differently), and the record names the held-out
    ids and both sides' sources."""
    from collections import Counter

    val_ids = {it.id for it in val_src.items}
    val_paths = {it.path for it in val_src.items if it.path}
    train = [it for it in src.items if it.id not in val_ids and not (it.path and it.path in val_paths)]
    if len(train) < 2:
        raise RaptorError(f"--val-data {val_src.spec} leaves {len(train)} of the {len(src)} images of {src.spec} to "
                          f"train on")
    record = {"by": "photo", "val_data": val_src.spec, "n_val_photos": len(val_src.items),
              "n_removed_from_training": len(src.items) - len(train),
              "val_ids": sorted(val_ids), "n_train_photos": len(train), "train_ids": [it.id for it in train],
              "val_sources": dict(Counter(image_source_of(i) for i in val_ids)),
              "train_sources": dict(Counter(image_source_of(it.id) for it in train))}
    return train, list(val_src.items), record


def val_crop_views(items, n: int, eval_tf, seed: int) -> tuple[list, list[int]]:
    """``n`` random-resized crops (scale 0.25-1, no flip) of every held-out photo, each a function of (seed, photo
    id, crop number) alone; returns (tensors, the item position of each tensor). An unreadable photo is skipped
    with a warning."""
    import random

    tf = TrainTransform(size=eval_tf.size, scale=(0.25, 1.0), flip=False, mean=eval_tf.mean, std=eval_tf.std)
    views, pos = [], []
    for p, it in enumerate(items):
        try:
            img = it.load()
        except Exception as e:  # noqa: BLE001 - any decode failure means "skip and say so"
            warnings.warn(f"skipping unreadable image {it.id}: {type(e).__name__}: {str(e)[:120]}",
                          ImageLoadWarning, stacklevel=2)
            continue
        for c in range(n):
            views.append(tf(img, random.Random(f"val-crop/{seed}/{it.id}/{c}")))
            pos.append(p)
    return views, pos


def check_device_autocast(autocast: str | None, device: torch.device, bf16_supported=None) -> None:
    """bf16 autocast on a GPU without bf16 support (before Ampere) is refused up front, not emulated or failed
    mid-run. ``bf16_supported``: the device's answer (default: ask torch)."""
    if autocast in ("bfloat16", "bf16") and device.type == "cuda":
        ok = torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported
        if not ok:
            raise RaptorError(f"--autocast bfloat16: {device} has no bf16 support (needs compute capability >= 8.0); "
                              f"train in float32 (no --autocast)")


def _recorded_phases(path: Path, found: dict) -> dict:
    """A resumed run keeps the phases it started with; say so if the data now gives others."""
    try:
        rec = json.loads(path.read_text())
        phases = [[int(x) for x in p] for p in rec["phases"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RaptorError(f"cannot read {path} (the phases this run started with): {e}") from None
    if phases != found["phases"]:
        warnings.warn(f"the training images now give phases {found['phases']}; the run keeps {phases}, recorded in "
                      f"{path} when it started", UserWarning, stacklevel=2)
    return {**rec, "phases": phases}


def _phases_how(cfg: FitConfig) -> str:
    if cfg.phases is not None:
        return "given (--phases)"
    if cfg.phases_file is not None:
        return f"from {cfg.phases_file}" + (f" (its DP segmentation for k={cfg.k})" if cfg.k else "")
    return f"equal phases for k={cfg.k} (--phases equal)"


def _embed(teacher, tensors: list, batch: int = 64) -> torch.Tensor:
    return torch.cat([teacher.embed(torch.stack(tensors[s:s + batch])) for s in range(0, len(tensors), batch)])


def _probes(cfg: FitConfig, model, teacher, layout, eval_tf, probe_inputs, x0_val: torch.Tensor,
            progress: bool) -> dict | None:
    """Fresh-probe evaluation on the training data's own labels, else on ``cfg.probe_data`` (split in halves)."""
    if probe_inputs is not None:
        train_fn, y_te, name = probe_inputs
        (x_tr, y_tr), x_te = train_fn(), x0_val
    elif cfg.probe_data:
        src = open_source(cfg.probe_data)
        if (src.labels < 0).all():
            raise RaptorError(f"probe data {cfg.probe_data} has no labels")
        order = np.random.default_rng(cfg.seed).permutation(len(src))[: 2 * cfg.probe_limit]
        t, kept, _ = load_images([src.items[i] for i in order], eval_tf)
        x = _embed(teacher, t)
        y = src.labels[order[kept]]
        half = len(x) // 2
        x_tr, y_tr, x_te, y_te, name = x[:half], y[:half], x[half:], y[half:], cfg.probe_data + " (out of domain)"
    else:
        return None
    if len(np.unique(np.asarray(y_tr))) < 2:
        warnings.warn(f"probes skipped: the probe's training images of {name} hold a single class", UserWarning,
                      stacklevel=2)
        return None
    return probe_evaluation(model, teacher, layout, x_tr, np.asarray(y_tr), x_te, np.asarray(y_te), name,
                            progress=progress)
