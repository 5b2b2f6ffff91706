"""The ``raptor`` command line. Every bad input ends in one ``error: ...`` line and exit code 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from raptor.errors import RaptorError
from raptor.phases import PhaseSpec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Raptor: phases, block-recurrent surrogates and dynamics of Vision Transformers.")

TEACHER_HELP = "Teacher spec: bundled:dinov2-s | hf:<hub id or dir> | dinov2-pth:<file> | tiny:<family>"
DEVICE_HELP = "auto (a CUDA GPU when there is one) | cpu | cuda | cuda:N (under torchrun: cuda = the local rank's GPU)"
DATA_HELP = ("Data spec: bundled:photos | bundled:natural | bundled:digits | bundled:lfw | fashion-mnist[:<dir>] | "
             "<dir> | folder:<dir> | classes:<dir>")


def parse_layers(text: str | None) -> list[int] | None:
    """'0-12', '0,6,12', '3' or None (all)."""
    if text is None or text in ("", "all"):
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise RaptorError(f"bad --layers {text!r}: use e.g. 0-12 or 0,6,12") from None
    return out


def parse_weights(text: str | None, name: str) -> tuple[float, float, float] | None:
    """'0.45,0.10,0.45' (cls, registers, patches) or 'none'."""
    if text is None or text.strip().lower() == "none":
        return None
    try:
        w = tuple(float(x) for x in text.split(","))
    except ValueError:
        w = ()
    if len(w) != 3 or any(x < 0 for x in w) or not sum(w) > 0:
        raise RaptorError(f"bad {name} {text!r}: three non-negative numbers cls,registers,patches, e.g. 0.45,0.1,0.45")
    return w


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise RaptorError(f"bad {name} {text!r}: a comma-separated list of numbers") from None


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise RaptorError(f"bad {name} {text!r}: a comma-separated list of integers") from None


def _echo_json(d: dict) -> None:
    typer.echo(json.dumps(d, indent=2, default=str))


@app.command()
def extract(
    teacher: str = typer.Option("bundled:dinov2-s", "--teacher", "-t", help=TEACHER_HELP),
    data: str = typer.Option(..., "--data", "-d", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Store directory (zarr v3); re-run the same command to resume"),
    dtype: str = typer.Option("bfloat16", help="Stored dtype: bfloat16 | float16 | float32"),
    limit: Optional[int] = typer.Option(None, help="Only N images: a seeded sample, stratified by class"),
    sample: str = typer.Option("random", help="--limit: random (seeded, stratified by class) | sorted (the first N)"),
    sample_seed: int = typer.Option(1, help="Seed of the --limit sample"),
    batch_size: Optional[int] = typer.Option(None, help="Forward batch size [default: the smaller of 16 and "
                                             "--chunk-images]"),
    chunk_images: Optional[int] = typer.Option(None, help="Images per store chunk (also the resume granularity; "
                                               "one forward covers at most one chunk) [default: the larger of 32 "
                                               "and --batch-size]"),
    layers: Optional[str] = typer.Option(None, help="Layers to store, e.g. 0-12 or 0,6,12 (default all)"),
    image_size: Optional[int] = typer.Option(None, help="Crop size (default: the teacher's, 224 for DINOv2)"),
    compression: str = typer.Option("lz4", help="lz4 (bit-shuffled, default) | zstd | none"),
    autocast: Optional[str] = typer.Option(None, help="bfloat16 autocast for the forward pass (faster on CPU)"),
    head: Optional[str] = typer.Option(None, help="Official DINOv2 linear head .pth (for dinov2-pth teachers)"),
    workers: Optional[int] = typer.Option(None, help="Image-decoding worker processes (0: a thread of this process) "
                                          "[default: 1 on the CPU; on a GPU half the rank's cores, up to 8]"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    progress: bool = typer.Option(True, help="Show a progress bar"),
):
    """Store every image's trajectory (layers 0..L, all tokens) in a resumable zarr v3 store. Runs under
    torchrun --nproc-per-node N: the ranks extract disjoint chunks into the one store."""
    from raptor.data import open_source

    # cheap checks first: arguments, data, an existing --out; only then the teacher (seconds to load)
    from raptor.distributed import setup
    from raptor.store import TrajectoryStore, batch_and_chunk, check_extract_args, precheck_store, store_sample
    from raptor.store import extract as run_extract
    from raptor.teachers import load_teacher

    batch_size, chunk_images = batch_and_chunk(batch_size, chunk_images)
    check_extract_args(dtype=dtype, compression=compression, batch_size=batch_size, chunk_images=chunk_images,
                       image_size=image_size, autocast=autocast, limit=limit,
                       workers=1 if workers is None else workers)
    layer_list = parse_layers(layers)
    from raptor.data.sampling import check_sample_order

    check_sample_order(sample)
    source = open_source(data).subset(limit, sample_seed, sample)
    precheck_store(out, teacher=teacher, data=source.spec, n_images=len(source), dtype=dtype,
                   chunk_images=chunk_images, compression=compression, autocast=autocast,
                   sample=store_sample(source.sample))
    dist, dev = setup(device)
    t = load_teacher(teacher, head=head)
    s = run_extract(t, source, out, dtype=dtype, layers=layer_list, batch_size=batch_size, chunk_images=chunk_images,
                    image_size=image_size, compression=compression, autocast=autocast, progress=progress and dist.main,
                    workers=workers, device=dev)
    if not dist.main:
        return
    info = TrajectoryStore(out).summary()
    info["this_run"] = {"chunks_written": s.chunks_written, "chunks_already_done": s.chunks_done_before,
                        "seconds": round(s.seconds, 2), "images_per_s": round(s.images_per_s, 2),
                        "skipped_images": s.skipped}
    _echo_json(info)


@app.command()
def analyze(
    teacher: str = typer.Option("bundled:dinov2-s", "--teacher", "-t", help=TEACHER_HELP),
    data: str = typer.Option("bundled:photos", "--data", "-d", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory"),
    store: Optional[Path] = typer.Option(None, help="Read trajectories from this store instead of running the teacher"),
    limit: Optional[int] = typer.Option(None, help="Only N images (or store rows): a seeded sample, stratified by "
                                        "class"),
    sample: str = typer.Option("random", help="--limit: random (seeded, stratified by class) | sorted (the first N)"),
    sample_seed: int = typer.Option(1, help="Seed of the --limit sample"),
    batch_size: int = typer.Option(16, help="Batch size"),
    image_size: Optional[int] = typer.Option(None, help="Crop size (default: the teacher's)"),
    layers: Optional[str] = typer.Option(None, help="Layers, e.g. 1-12 (default: block outputs 1..L, as the paper)"),
    cka_groups: str = typer.Option("auto", help="CKA token groups: auto (cls + registers if any) or a list of "
                                   "cls,registers,patches,all (patches/all cost about one more forward pass)"),
    k_max: int = typer.Option(6, help="Largest number of phases to segment into"),
    k_rule: str = typer.Option("gain", help="Rule to choose k: gain | elbow"),
    k_frac: float = typer.Option(0.1, help="gain rule: add a phase while it adds > frac of the total distance"),
    maxcut_variant: str = typer.Option("official", help="recursive max-cut: official (the notebook exactly) | "
                                       "balanced (both sides of every cut >= 2 layers)"),
    autocast: Optional[str] = typer.Option(None, help="bfloat16 autocast for the forward pass"),
    head: Optional[str] = typer.Option(None, help="Official DINOv2 linear head .pth"),
    null_resamples: int = typer.Option(200, help="Bootstrap / null resamples of the phase test against the "
                                       "lag-only null (0: no test)"),
    progress: bool = typer.Option(True, help="Show a progress bar"),
):
    """Layer x layer similarity (paper metric, MSE, CKA, token cosine) and phases of depth (DP + max-cut)."""
    from raptor.analyze import AnalyzeConfig, run_analyze

    groups = tuple(g.strip() for g in cka_groups.split(",") if g.strip())
    cfg = AnalyzeConfig(teacher=teacher, data=data, out=str(out), store=str(store) if store else None, limit=limit,
                        sample=sample, sample_seed=sample_seed,
                        batch_size=batch_size, image_size=image_size, layers=parse_layers(layers),
                        cka_groups=groups, k_max=k_max, k_rule=k_rule, k_frac=k_frac, autocast=autocast, head=head,
                        maxcut_variant=maxcut_variant, null_resamples=null_resamples)
    res = run_analyze(cfg, progress=progress)
    a = res.analysis
    typer.echo(f"phases ({a['primary_metric']}, k={a['chosen']['k']}): {a['chosen']['phases']}")
    from raptor.analyze import null_verdict

    for t in a["null_tests"].values():
        typer.echo(null_verdict(t).replace("**", ""))
    typer.echo(f"wrote {out / 'analysis.json'}, {out / 'report.md'} and {len(a['figures'])} figures")


@app.command()
def fit(
    teacher: str = typer.Option("bundled:dinov2-s", "--teacher", "-t", help=TEACHER_HELP),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP + " (online teacher, no storage)"),
    store: Optional[Path] = typer.Option(None, help="Train from a trajectory store instead of an online teacher"),
    phases: Optional[str] = typer.Option(None, help="analysis.json from raptor analyze (its chosen phases), a phases "
                                         "file (a JSON array of layer lists), explicit phases of output layers, "
                                         "e.g. 1-7/8-11/12, or 'equal' (with --k: equal phases)"),
    k: Optional[int] = typer.Option(None, help="Number of blocks (alone: the DP phases of the training images' layer "
                                    "similarity, as raptor analyze finds them; with an analysis.json: its DP "
                                    "segmentation for k; with --phases equal: equal phases)"),
    out: Path = typer.Option(..., "--out", "-o", help="Run directory"),
    recipe: str = typer.Option("short", help="Hyper-parameter recipe: short (validated at CPU budgets of hundreds "
                               "of steps, docs/surrogate.md) | paper (the official code's, for 312,500 steps of "
                               "batch 64); the flags below override it"),
    stage: str = typer.Option("both", help="1 | 2 | both"),
    steps1: Optional[int] = typer.Option(None, help="Stage-1 steps per block [recipe: short 450, paper 312500]"),
    steps2: Optional[int] = typer.Option(None, help="Stage-2 steps [recipe: short 200, paper 312500]"),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [recipe: short 16, paper 64]"),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [recipe: short 3e-3, paper 3e-4]"),
    lr2: Optional[float] = typer.Option(None, help="Stage-2 peak learning rate [recipe: short 3e-4, paper: --lr]"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay [recipe: 1e-4]"),
    clip: Optional[float] = typer.Option(None, help="Gradient-norm clip [recipe: 1.0]"),
    loss: Optional[str] = typer.Option(None, help="mse | cosine | mse+cosine [recipe: mse]"),
    loss_norm: Optional[str] = typer.Option(None, help="layer: divide each target layer's (group's) squared error by "
                                            "its training-set variance | none: the paper's plain MSE "
                                            "[recipe: short layer, paper none]"),
    stage1_weights: Optional[str] = typer.Option(None, help="cls,registers,patches loss weights on the last stage-1 "
                                                 "segment, or 'none' [recipe: 0.34,0.33,0.33, the paper's]"),
    stage2_weights: Optional[str] = typer.Option(None, help="cls,registers,patches loss weights in stage 2, or 'none' "
                                                 "(absent groups get 0) [recipe: short none, paper 0.45,0.10,0.45]"),
    sigma: Optional[float] = typer.Option(None, help="Gaussian input noise [recipe: 0]"),
    tf_anneal_frac: Optional[float] = typer.Option(None, help="Stage 1: fraction of the steps over which teacher "
                                                   "forcing anneals to the block's own rollout [recipe: 0.25]"),
    teacher_forcing_only: bool = typer.Option(False, "--teacher-forcing-only", help="Stage 1 without the rollout "
                                              "(the paper's ablation, first row)"),
    t_scale: bool = typer.Option(True, "--t-scale/--no-t-scale", help="Depth scaling: the blocks' gates depend on "
                                 "the layer index t (off: the ablation's row before '+ depth scaling')"),
    image_loss: float = typer.Option(0.0, help="Weight of an image-level loss term (1 - batch R2 of the pooled "
                                     "[cls || mean patch] summaries) added to every layer's loss"),
    mlp: str = typer.Option("swiglu", help="swiglu | gelu"),
    init_from_teacher: bool = typer.Option(False, help="Start each block from its phase's middle teacher block (gelu)"),
    init_from: Optional[Path] = typer.Option(None, help="Start from the weights of a finished fit run with the same "
                                             "phases and blocks (e.g. --stage 2 from a --stage 1 run)"),
    autocast: Optional[str] = typer.Option(None, help="bfloat16 autocast for training"),
    image_size: Optional[int] = typer.Option(None, help="Crop size for online data (default: the teacher's)"),
    limit: Optional[int] = typer.Option(None, help="Only N images/rows: a seeded sample, stratified by class"),
    sample: str = typer.Option("random", help="--limit: random (seeded, stratified by class) | sorted (the first N)"),
    sample_seed: int = typer.Option(1, help="Seed of the --limit sample"),
    val_images: int = typer.Option(128, help="Whole images held out for validation"),
    val_data: Optional[str] = typer.Option(None, help="Online data: hold out these whole photos (a data spec, e.g. "
                                           "bundled:imagenet20) instead of --val-images; no crop of them is "
                                           "trained on"),
    val_crops: int = typer.Option(0, help="--val-data: N seeded random-resized crops per held-out photo (0: one "
                                  "centre view each)"),
    stats_images: int = typer.Option(256, help="Training images for the loss scale, the baselines and (--k alone) "
                                     "the phases"),
    probe_data: Optional[str] = typer.Option("bundled:digits", help="Labelled data for the probes when the "
                                             "training data has no labels; 'none' to skip"),
    probe_limit: int = typer.Option(1000, help="Labelled training images for the fresh probes"),
    seed: int = typer.Option(0),
    ckpt_every: int = typer.Option(25, help="Checkpoint every N steps"),
    val_every: int = typer.Option(0, help="Validate (held-out R2) every N steps; 0 = only at the end"),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last checkpoint"),
    workers: int = typer.Option(2, help="Online data: image-decoding worker processes (0: in the main process)"),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the surrogate's blocks (GPU runs)"),
    parallel_blocks: bool = typer.Option(False, "--parallel-blocks", help="Under torchrun: train the stage-1 "
                                         "blocks at the same time, one rank group per block"),
    store_cache_gb: float = typer.Option(6.0, help="Cache a store's training rows in RAM (GPU memory on a GPU) "
                                         "when they fit in this many GB; 0 reads every batch from disk"),
    progress: bool = typer.Option(True, help="Show progress bars"),
):
    """Train a Raptor surrogate (stage 1 per block, stage 2 joint) and validate it against the teacher.
    Runs under torchrun --nproc-per-node N (data-parallel, DDP; gloo on CPU, NCCL on GPU)."""
    from raptor.surrogate.config import FitConfig
    from raptor.surrogate.fit import run_fit

    given = {"steps1": steps1, "steps2": steps2, "batch_size": batch_size, "lr": lr, "lr2": lr2,
             "weight_decay": weight_decay, "clip": clip, "loss": loss, "loss_norm": loss_norm, "sigma": sigma,
             "tf_anneal_frac": tf_anneal_frac}
    given = {name: v for name, v in given.items() if v is not None}
    if stage1_weights is not None:
        given["stage1_last_weights"] = parse_weights(stage1_weights, "--stage1-weights")
    if stage2_weights is not None:
        given["stage2_weights"] = parse_weights(stage2_weights, "--stage2-weights")
    cfg = FitConfig.from_recipe(
        recipe, **given, teacher=teacher, data=data, store=str(store) if store else None, out=str(out),
        **PhaseSpec.parse(phases, k).fields(), stage=stage, val_images=val_images, val_data=val_data,
        val_crops=val_crops, stats_images=stats_images,
        probe_limit=probe_limit, mlp=mlp, init_from_teacher=init_from_teacher,
        init_from=str(init_from) if init_from else None, autocast=autocast, image_size=image_size, limit=limit,
        sample=sample, sample_seed=sample_seed, probe_data=None if probe_data in (None, "none") else probe_data,
        seed=seed, ckpt_every=ckpt_every, val_every=val_every, workers=workers, device=device, compile=compile,
        parallel_blocks=parallel_blocks, store_cache_gb=store_cache_gb, image_loss=image_loss,
        teacher_forcing_only=teacher_forcing_only, t_scale=t_scale)
    m = run_fit(cfg, resume=resume, progress=progress)
    if not m:  # a torchrun rank other than 0: rank 0 reports
        return
    v = m["validation"]
    ar = v["autoregressive"]
    typer.echo(f"phases: {m['surrogate']['phases']}  ({m['phases_chosen']['how']}; {v['n_images']} held-out images)")
    rec = m["recipe"]
    typer.echo(f"recipe: {rec['name']}" + (" (overridden: " + ", ".join(f"{n} {o['used']}" for n, o in
                                                                       rec["overridden"].items()) + ")"
                                          if rec["overridden"] else ""))
    bl = v.get("baselines", {})
    if "r2_image_specific" in ar:  # first: what a model blind to the image cannot score (the position mean: 0)
        lo, hi = ar["r2_image_specific_ci95"]
        typer.echo("held-out image-specific R2 per layer, Raptor AR:  " + " ".join(f"{x:.3f}" for x in
                                                                              ar["r2_image_specific"]) +
                   f"  mean {ar['r2_image_specific_mean']:.3f} [95% CI {lo:.3f}, {hi:.3f}]")
        for key in ("identity", "ridge_autoregressive"):
            if key in bl:
                typer.echo(f"  baseline {key:<21}" + " ".join(f"{x:.3f}" for x in bl[key]["r2_image_specific"]) +
                           f"  mean {bl[key]['r2_image_specific_mean']:.3f}")
    il = v["image_level"]["autoregressive"]
    typer.echo(f"image-level R2 of pooled features: {il['r2']:.3f} (variance kept {il['variance_kept']:.2f})")
    typer.echo("held-out R2 per layer, Raptor AR:  " + " ".join(f"{x:.3f}" for x in ar["r2"]) +
               f"  mean {ar['r2_mean']:.3f}")
    for key in ("identity", "ridge_teacher_forced", "position_mean"):
        if key in bl:
            b = bl[key]
            typer.echo(f"  baseline {key:<21}" + " ".join(f"{x:.3f}" for x in b["r2"]) + f"  mean {b['r2_mean']:.3f}")
    if "position_mean" in bl:
        typer.echo(f"paper's R2 (all layers pooled): Raptor {ar['r2_official_all_layers']:.3f}; the image-blind "
                   f"position mean scores {bl['position_mean']['r2_official_all_layers']:.3f} under it")
    if v.get("probes"):
        for name, b in v["probes"]["backbones"].items():
            typer.echo(f"fresh probe {name:<14} {b['fresh_probe_accuracy']:.3f} ({b['pct_of_teacher']:.1f} % of "
                       f"teacher); teacher-probe agreement {b['teacher_probe_agreement']:.3f}")
    typer.echo(f"wrote {out / 'metrics.json'}, {out / 'r2_image_specific_per_layer.png'}, "
               f"{out / 'r2_per_layer.png'}, {out / 'model.safetensors'} and the run's config, plots and checkpoints")


@app.command("fit-report")
def fit_report(runs: list[Path] = typer.Argument(..., help="Finished raptor fit run directories"),
               out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the Markdown here too")):
    """Markdown tables comparing finished fits: R2 per layer and token group, baselines, probes."""
    from raptor.config import atomic_write_text
    from raptor.surrogate.report import load_run, report

    text = report([load_run(r) for r in runs])
    if out:
        atomic_write_text(out, text)
    typer.echo(text)


@app.command()
def probe(
    task: str = typer.Option(..., "--task", help="cls (top-1) | seg (mIoU) | depth (RMSE)"),
    backbone: str = typer.Option(..., "--backbone", "-b", help="Teacher spec or a raptor fit run directory"),
    data: str = typer.Option(..., "--data", "-d", help="cls: bundled:digits | bundled:lfw | imagenet:<root>; seg: "
                             "bundled:digit-seg | ade20k:<root>; depth: bundled:motorcycle | bundled:scenes | "
                             "nyud:<root> | paired:<root>"),
    out: Path = typer.Option(..., "--out", "-o", help="Results directory (results.jsonl is appended to)"),
    seeds: str = typer.Option("0,1,2", help="Probe seeds, e.g. 0,1,2 (one results line each)"),
    splice: Optional[str] = typer.Option(None, help="With a run: teacher 0..i, surrogate i..j, teacher j..L (i:j)"),
    layer: Optional[int] = typer.Option(None, help="With a teacher: read its tokens at this layer"),
    image_size: Optional[int] = typer.Option(None, help="Input size (default: the data set's, else the teacher's)"),
    lrs: Optional[str] = typer.Option(None, help="Learning-rate grid trained together, e.g. 1e-4,1e-3,1e-2"),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default: the data set's recipe, else the paper's)"),
    batch_size: Optional[int] = typer.Option(None, help="Probe batch size"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay"),
    init_head: Optional[str] = typer.Option(None, help="cls: start from 'teacher' (its head) or a *_linear_head.pth"),
    cache: Optional[Path] = typer.Option(None, help="Feature cache directory (default OUT/features)"),
    limit: Optional[int] = typer.Option(None, help="At most N images per split (a seeded sample, stratified by "
                                        "class; smoke runs)"),
    sample: str = typer.Option("random", help="--limit: random (seeded, stratified by class) | sorted (the first N)"),
    sample_seed: int = typer.Option(1, help="Seed of the --limit sample"),
    standardize: bool = typer.Option(True, help="z-score features with training-split mean/std (an affine map the "
                                     "head absorbs; --no-standardize: the paper's raw features)"),
    device: str = typer.Option("auto", help=DEVICE_HELP + "; for the feature passes (heads train on the CPU)"),
    progress: bool = typer.Option(True, help="Show progress bars"),
):
    """Linear probes (the paper's Table-1 protocols) on cached features of a teacher, a surrogate or a splice.
    Runs under torchrun --nproc-per-node N: the ranks share the feature passes."""
    import numpy as np

    from raptor.probes.run import ProbeConfig, parse_lrs, parse_seeds, run_probe
    from raptor.probes.table import display_value

    cfg = ProbeConfig(task=task, backbone=backbone, data=data, out=str(out), seeds=parse_seeds(seeds), layer=layer,
                      splice=splice, image_size=image_size, lrs=parse_lrs(lrs), epochs=epochs, batch_size=batch_size,
                      weight_decay=weight_decay, init_head=init_head, cache=str(cache) if cache else None,
                      limit=limit, sample=sample, sample_seed=sample_seed, standardize=standardize, device=device)
    recs = run_probe(cfg, progress=progress)
    if not recs:  # a torchrun rank other than 0 (it shared the feature passes); rank 0 reports
        return
    m = recs[0]["metric"]
    vals = [display_value(m, r["value"]) for r in recs]
    best = ", ".join(f"seed {r['seed']}: {v:.3g} (lr {r['best']['lr']:g}, epoch {r['best']['epoch']})"
                     for r, v in zip(recs, vals))
    typer.echo(f"{recs[0]['backbone']} · {task} · {recs[0]['data']}: test {m} {float(np.mean(vals)):.4g} ± "
               f"{float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0:.2g} over {len(vals)} seed(s)  [{best}]")
    typer.echo(f"appended to {out / 'results.jsonl'}")


@app.command()
def dynamics(
    teacher: str = typer.Option("bundled:dinov2-s", "--teacher", "-t", help=TEACHER_HELP),
    surrogate: Optional[Path] = typer.Option(None, "--surrogate", "-s", help="A raptor fit run directory for the same "
                                             "teacher: its own rollout from the teacher's layer 0, side by side"),
    data: str = typer.Option("bundled:photos", "--data", "-d", help=DATA_HELP),
    store: Optional[Path] = typer.Option(None, help="Read trajectories from this store (every layer 0..L) instead of "
                                         "running the teacher"),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory"),
    phases: Optional[str] = typer.Option(None, help="analysis.json from raptor analyze, or e.g. 1-7/8-11/12 "
                                         "(default: the teacher's DP phases, computed in the same pass)"),
    limit: Optional[int] = typer.Option(None, help="Only N images (or store rows): a seeded sample, stratified by "
                                        "class"),
    sample: str = typer.Option("random", help="--limit: random (seeded, stratified by class) | sorted (the first N)"),
    sample_seed: int = typer.Option(1, help="Seed of the --limit sample"),
    batch_size: int = typer.Option(16, help="Batch size"),
    image_size: Optional[int] = typer.Option(None, help="Crop size for live data (default: the teacher's)"),
    eps: str = typer.Option("0.05,0.2", help="Relative noise sizes for perturbation recovery (each > 0)"),
    inject: Optional[str] = typer.Option(None, help="Layers to perturb, e.g. 0,4,8 (default: each phase's entry)"),
    perturb_images: int = typer.Option(64, help="Images for perturbation recovery"),
    rank_images: int = typer.Option(64, help="Images for the update ranks (two eigendecompositions per image "
                                    "and layer: the costly metric; the report gives their standard error)"),
    knn_k: int = typer.Option(5, help="k of the class-basin kNN accuracy"),
    seed: int = typer.Option(0, help="Seed of the perturbation noise"),
    space: str = typer.Option("raw", help="raw: the residual stream x_l (as the paper) | normed: the teacher's final "
                              "norm applied to every layer (removes outlier channels' pull on directions)"),
    autocast: Optional[str] = typer.Option(None, help="bfloat16 autocast for the live teacher forward"),
    null_draws: int = typer.Option(4, help="Random-weight teachers (same embedding, fresh blocks) the verdicts are "
                                   "tested against; 0: no such null"),
    progress: bool = typer.Option(True, help="Show progress bars"),
):
    """Dynamical interpretability (docs/method.md §9): convergence, speed, coherence, update ranks, class basins and
    perturbation recovery, with the paper's three findings stated as holds / does not hold."""
    from raptor.dynamics.run import DynamicsConfig, run_dynamics

    spec = PhaseSpec.parse(phases)
    if spec.method != "dp":
        raise RaptorError(f"dynamics --phases {phases}: give layers (e.g. 1-6/7-12) or an analysis.json")
    eps_list = _floats(eps, "--eps")
    cfg = DynamicsConfig(teacher=teacher, surrogate=str(surrogate) if surrogate else None, data=data,
                         store=str(store) if store else None, out=str(out), phases=spec.layers,
                         phases_file=spec.file, limit=limit,
                         sample=sample, sample_seed=sample_seed,
                         batch_size=batch_size, image_size=image_size, eps=eps_list, inject=parse_layers(inject),
                         perturb_images=perturb_images, rank_images=rank_images, knn_k=knn_k, seed=seed,
                         space=space, autocast=autocast, null_draws=null_draws)
    dyn = run_dynamics(cfg, progress=progress)
    typer.echo(f"phases: {dyn['phases']}  ({dyn['phases_source']})")
    for f, r in dyn["robustness"]["teacher"].items():
        typer.echo(f"teacher ({f}) against its nulls: {r['summary']} "
                   f"({', '.join(f'{k} {v}' for k, v in r['verdicts'].items())})")
    for key in ("i", "ii", "iii", "boundary_jumps"):
        verdicts = ", ".join(f"{m}: {f[key]['verdict']}" for m, f in dyn["findings"].items())
        typer.echo(f"({key}) {dyn['findings']['teacher'][key]['finding']}: {verdicts}")
    typer.echo(f"wrote {out / 'report.md'}, {out / 'dynamics.json'} and {len(dyn['figures'])} plots")


@app.command()
def study(
    data: str = typer.Option("bundled:digits", "--data", "-d", help="Labelled data: bundled:digits | bundled:lfw | "
                             "fashion-mnist[:<dir>] | classes:<dir> (a folder per class, e.g. CIFAR-100 exported "
                             "to PNG)"),
    out: Path = typer.Option(..., "--out", "-o", help="Study directory (re-run the same command to resume)"),
    sd: str = typer.Option("0,0.1,0.2,0.3,0.5", "--sd", help="Uniform stochastic-depth probabilities p"),
    seeds: str = typer.Option("0,1", help="Training seeds per p"),
    ks: str = typer.Option("2,3", help="Raptor block counts k"),
    random: int = typer.Option(10, help="Partitions per k of each null family (the Figure-3 baseline)"),
    partitions: str = typer.Option("balanced,shuffled", help="Null families the found phases are fitted against: "
                                   "balanced (contiguous, every phase >= max(2, L/2k) layers), shuffled "
                                   "(non-contiguous, the found phase sizes), random (any contiguous partition)"),
    swap_samples: int = typer.Option(10, help="Random draws per layer-swap setting (0: no swap test)"),
    references: bool = typer.Option(True, "--references/--no-references", help="Also the paper's Figure 13 points: "
                                    "an untrained and an over-fitted ViT (p = 0)"),
    limit: Optional[int] = typer.Option(None, help="Only N images: a seeded sample, stratified by class"),
    sample: str = typer.Option("random", help="--limit: random (seeded, stratified by class) | sorted (the first N)"),
    sample_seed: int = typer.Option(1, help="Seed of the --limit sample"),
    image_size: int = typer.Option(16, help="ViT input size"),
    patch_size: int = typer.Option(4, help="ViT patch size"),
    dim: int = typer.Option(64, help="ViT width"),
    depth: int = typer.Option(12, help="ViT depth"),
    heads: int = typer.Option(4, help="ViT heads"),
    epochs: int = typer.Option(25, help="ViT training epochs"),
    batch_size: int = typer.Option(64, help="ViT training batch size"),
    lr: float = typer.Option(2e-3, help="ViT peak learning rate (AdamW, warm-up + cosine)"),
    shift: int = typer.Option(2, help="Augmentation: random translation up to this many pixels"),
    flip: bool = typer.Option(False, help="Augmentation: random horizontal flips (not for digits)"),
    steps1: int = typer.Option(80, help="Raptor stage-1 steps per block"),
    steps2: int = typer.Option(40, help="Raptor stage-2 steps"),
    progress: bool = typer.Option(True, help="Show progress"),
):
    """The small-scale study (docs/method.md §8): does stochastic depth make ViTs block-recurrent? Trains one ViT per
    (p, seed), then phases, Raptor fits vs random partitions, layer swaps and correlations (Figures 3 and 4)."""
    from raptor.study.run import FitBudget, StudyConfig, run_study
    from raptor.study.vit import TrainConfig, ViTConfig

    cfg = StudyConfig(data=data, out=str(out), sd=_floats(sd, "--sd"), seeds=_ints(seeds, "--seeds"),
                      ks=_ints(ks, "--ks"), random_partitions=random,
                      partitions=tuple(x.strip() for x in partitions.split(",") if x.strip()),
                      swap_samples=swap_samples, references=references, limit=limit,
                      sample=sample, sample_seed=sample_seed,
                      vit=ViTConfig(image_size=image_size, patch_size=patch_size, dim=dim, depth=depth, heads=heads),
                      train=TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, shift=shift, flip=flip),
                      fit=FitBudget(steps1=steps1, steps2=steps2))
    res = run_study(cfg, progress=progress)
    for name, c in res["correlations"].items():
        rho = "n/a" if c["rho"] is None else f"{c['rho']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"
        typer.echo(f"{name}: {rho} (n = {c['n']})")
    for k, fams in res["partition_nulls"].items():
        for fam, c in fams.items():
            if c["r2_mean"]["runs"]:
                typer.echo(f"k={k} DP phases vs {fam} partitions (R²): beat their mean in "
                           f"{c['r2_mean']['fraction_dp_beats_mean']:.0%} of runs, by > 1σ in "
                           f"{c['r2_mean']['fraction_gap_above_1_sigma']:.0%}; mean rank "
                           f"{c['r2_mean']['mean_rank']:.1f} of {c['r2_mean']['of']}")
    m = res["matched_swaps"]
    if m["runs"]:
        typer.echo(f"depth-matched swaps: intra − inter {m['mean_effect']:+.3f} top-1, significant in "
                   f"{m['fraction_significant']:.0%} of {m['runs']} runs")
    typer.echo(f"wrote {out / 'report.md'}, {out / 'study.json'} and {len(res['figures'])} figures")


@app.command()
def ablation(
    teacher: str = typer.Option("bundled:dinov2-s", "--teacher", "-t", help=TEACHER_HELP),
    data: Optional[str] = typer.Option(None, "--data", "-d", help=DATA_HELP + " (online teacher, no storage)"),
    store: Optional[Path] = typer.Option(None, help="Train from a trajectory store instead of an online teacher"),
    phases: Optional[str] = typer.Option(None, help="As raptor fit: an analysis.json, e.g. 1-7/8-11/12, or 'equal' "
                                         "(with --k)"),
    k: Optional[int] = typer.Option(None, help="Number of blocks (alone: the DP phases of the training images)"),
    out: Path = typer.Option(..., "--out", "-o", help="Ablation directory (one raptor fit run per row; re-run the "
                             "same command to resume)"),
    recipe: str = typer.Option("short", help="Hyper-parameter recipe of the full model: short | paper"),
    steps1: Optional[int] = typer.Option(None, help="Stage-1 steps per block [recipe]"),
    steps2: Optional[int] = typer.Option(None, help="Stage-2 steps [recipe]"),
    batch_size: Optional[int] = typer.Option(None, help="Batch size [recipe]"),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate [recipe]"),
    lr2: Optional[float] = typer.Option(None, help="Stage-2 peak learning rate [recipe]"),
    autocast: Optional[str] = typer.Option(None, help="bfloat16 autocast for training"),
    image_size: Optional[int] = typer.Option(None, help="Crop size for online data (default: the teacher's)"),
    val_images: int = typer.Option(128, help="Whole images held out for validation"),
    val_data: Optional[str] = typer.Option(None, help="Online data: hold out these whole photos (a data spec)"),
    val_crops: int = typer.Option(0, help="--val-data: N seeded random-resized crops per held-out photo"),
    limit: Optional[int] = typer.Option(None, help="Only N images/rows: a seeded sample"),
    seed: int = typer.Option(0),
    probe_data: Optional[str] = typer.Option(None, help="Row 6: labelled classification data for the probes"),
    init_head: Optional[str] = typer.Option(None, help="Row 6: the teacher's linear classifier ('teacher' or an "
                                            "official *_linear_head.pth), fine-tuned on the row-5 surrogate"),
    progress: bool = typer.Option(True, help="Show progress"),
):
    """The paper's training ablation (its Table 1) as one command: teacher forcing only, + autoregressive anneal,
    + depth scaling, + cls weighting, + stage 2 (+ a fine-tuned probe), each scored on held-out images."""
    from raptor.surrogate.ablation import AblationConfig, run_ablation
    from raptor.surrogate.config import FitConfig

    given = {n: v for n, v in {"steps1": steps1, "steps2": steps2, "batch_size": batch_size, "lr": lr,
                               "lr2": lr2}.items() if v is not None}
    fit_cfg = FitConfig.from_recipe(
        recipe, **given, teacher=teacher, data=data, store=str(store) if store else None, out=str(out),
        **PhaseSpec.parse(phases, k).fields(), autocast=autocast, image_size=image_size, val_images=val_images,
        val_data=val_data, val_crops=val_crops, limit=limit, seed=seed, probe_data=None)
    res = run_ablation(AblationConfig(out=str(out), fit=fit_cfg, probe_data=probe_data, init_head=init_head),
                       progress=progress)
    for r in res["rows"]:
        if "r2_image_specific_mean" in r:
            typer.echo(f"{r['row']}: image-specific R2 {r['r2_image_specific_mean']:.3f}, image-level R2 "
                       f"{r['image_level_r2']:.3f} (paper, IN-1k top-1: {r['paper_in1k_top1']})")
        else:
            typer.echo(f"{r['row']}: fresh probe {r['fresh_probe_top1']:.3f}, fine-tuned teacher head "
                       f"{r['fine_tuned_head_top1']:.3f}")
    typer.echo(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / res['figure']}")


@app.command()
def table(dirs: list[Path] = typer.Argument(..., help="raptor probe output directories (or results.jsonl files)"),
          out: Optional[Path] = typer.Option(None, "--out", "-o", help="Path prefix for .md and .csv "
                                             "(default: FIRST_DIR/table)")):
    """The paper's Table 1 from probe results: backbones x (top-1, mIoU, RMSE), mean ± std, % of teacher."""
    from raptor.probes.table import write_table

    md, md_path, csv_path = write_table(list(dirs), out)
    typer.echo(md)
    typer.echo(f"wrote {md_path} and {csv_path}")


@app.command()
def info(store: Path = typer.Argument(..., help="Store directory")):
    """Summarise a trajectory store."""
    from raptor.store import TrajectoryStore

    _echo_json(TrajectoryStore(store).summary())


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output directory"),
         limit: Optional[int] = typer.Option(None, help="Only the first N bundled photos")):
    """The main job end to end on the embedded default (bundled DINOv2-S, bundled photos)."""
    from raptor.demo import run_demo

    run_demo(out, limit=limit)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    return f"warning: {message}\n"


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: sys.argv) and return the exit code; every expected failure is one
    ``error: ...`` line on stderr and code 2 (usage errors, bad inputs, full or read-only filesystems)."""
    import warnings

    from raptor.outputs import os_error_message

    try:  # typer >= 0.20 vendors click
        import typer._click.exceptions as cx
    except ImportError:  # pragma: no cover
        import click.exceptions as cx

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.formatwarning = _one_line_warning  # "warning: ..." without the source line

    def fail(msg: str) -> int:
        typer.echo("error: " + " ".join(str(msg).split()), err=True)  # one line, whatever the message holds
        return 2

    try:
        rv = app(args=argv, prog_name="raptor", standalone_mode=False)
    except cx.NoArgsIsHelpError:  # typer has already printed the help
        return 0
    except cx.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "raptor"
        return fail(f"{e.format_message()} (see '{cmd} --help')")
    except cx.ClickException as e:
        return fail(e.format_message())
    except RaptorError as e:
        return fail(str(e))
    except OSError as e:  # disk full, read-only filesystem, permissions: the environment, not a bug
        return fail(os_error_message(e))
    except (KeyboardInterrupt, typer.Abort):
        rv = 130
    if rv == 130:
        typer.echo("interrupted (re-run the same command to resume where supported)", err=True)
        return rv
    from raptor.distributed import teardown

    teardown()  # a clean exit leaves the process group together; a failed rank just exits (the others see it)
    return rv if isinstance(rv, int) else 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
