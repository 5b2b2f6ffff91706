"""The ``raptor`` command line: each command wires its options (:mod:`raptor.cli_options`) into its stage's config,
runs the stage and prints its console summary. Every bad input ends in one ``error: ...`` line and exit code 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from raptor import cli_options as o
from raptor.config import atomic_write_text
from raptor.errors import RaptorError, cli_messages
from raptor.outputs import os_error_message
from raptor.phases import PhaseSpec
from raptor.phases.spec import parse_layers
from raptor.progress import log_to_stdout
from raptor.runtime import tune_malloc
from raptor.surrogate.report import load_run, report
from raptor.tracking import parse_log_to

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Raptor: phases, block-recurrent surrogates and dynamics of Vision Transformers.")


@app.command()
def extract(teacher: str = o.TEACHER, data: str = o.Extract.data, out: Path = o.Extract.out,
            dtype: str = o.Extract.dtype, limit: int | None = o.LIMIT, sample: str = o.SAMPLE,
            sample_seed: int = o.SAMPLE_SEED, batch_size: int | None = o.Extract.batch_size,
            chunk_images: int | None = o.Extract.chunk_images, layers: str | None = o.Extract.layers,
            image_size: int | None = o.Extract.image_size, transform: str = o.TRANSFORM,
            compression: str = o.Extract.compression, autocast: str | None = o.Extract.autocast,
            head: str | None = o.Extract.head, workers: int | None = o.Extract.workers, device: str = o.DEVICE,
            config: Path | None = o.CONFIG, progress: bool = o.PROGRESS_BAR):
    """Store every image's trajectory (layers 0..L, all tokens) in a resumable zarr v3 store. Runs under
    torchrun --nproc-per-node N: the ranks extract disjoint chunks into the one store."""
    from raptor.store.extraction import ExtractConfig, run_extract

    options = dict(locals())
    cfg = o.config_from(ExtractConfig, options, layers=None)
    cfg.check()  # the settings first, then --layers (as before), then run_extract's checks of data and output
    cfg.layers = parse_layers(layers) if layers is not None else cfg.layers
    info = run_extract(cfg, progress=progress)
    if info is not None:  # else a torchrun rank other than 0: rank 0 reports
        typer.echo(json.dumps(info, indent=2, default=str))


@app.command()
def analyze(teacher: str = o.TEACHER, data: str = o.DATA_PHOTOS, out: Path = o.OUT_DIR,
            store: Path | None = o.Analyze.store, limit: int | None = o.LIMIT_ROWS, sample: str = o.SAMPLE,
            sample_seed: int = o.SAMPLE_SEED, batch_size: int = o.BATCH_SIZE,
            image_size: int | None = o.Analyze.image_size, transform: str = o.TRANSFORM,
            layers: str | None = o.Analyze.layers, cka_groups: str = o.Analyze.cka_groups, k_max: int = o.Analyze.k_max,
            k_rule: str = o.Analyze.k_rule, k_frac: float = o.Analyze.k_frac,
            maxcut_variant: str = o.Analyze.maxcut_variant, autocast: str | None = o.Analyze.autocast,
            head: str | None = o.Analyze.head, null_resamples: int = o.Analyze.null_resamples, device: str = o.DEVICE,
            config: Path | None = o.CONFIG, progress: bool = o.PROGRESS_BAR):
    """Layer x layer similarity (paper metric, MSE, CKA, token cosine) and phases of depth (DP + max-cut)."""
    options = dict(locals())
    from raptor.analyze import AnalyzeConfig, console_summary, run_analyze

    groups = tuple(g.strip() for g in cka_groups.split(",") if g.strip())
    cfg = o.config_from(AnalyzeConfig, options, layers=parse_layers(layers), cka_groups=groups)
    typer.echo("\n".join(console_summary(run_analyze(cfg, progress=progress).analysis, out)))


@app.command()
def fit(teacher: str = o.TEACHER, data: str | None = o.DATA_ONLINE, store: Path | None = o.STORE_TRAIN,
        phases: str | None = o.Fit.phases, k: int | None = o.Fit.k, out: Path = o.Fit.out, recipe: str = o.Fit.recipe,
        stage: str = o.Fit.stage, steps1: int | None = o.Fit.steps1, steps2: int | None = o.Fit.steps2,
        batch_size: int | None = o.Fit.batch_size, lr: float | None = o.Fit.lr, lr2: float | None = o.Fit.lr2,
        weight_decay: float | None = o.Fit.weight_decay, clip: float | None = o.Fit.clip, loss: str | None = o.Fit.loss,
        loss_norm: str | None = o.Fit.loss_norm, stage1_weights: str | None = o.Fit.stage1_weights,
        stage2_weights: str | None = o.Fit.stage2_weights, sigma: float | None = o.Fit.sigma,
        tf_anneal_frac: float | None = o.Fit.tf_anneal_frac, teacher_forcing_only: bool = o.Fit.teacher_forcing_only,
        t_scale: bool = o.Fit.t_scale, image_loss: float = o.Fit.image_loss, mlp: str = o.Fit.mlp,
        init_from_teacher: bool = o.Fit.init_from_teacher, init_from: Path | None = o.Fit.init_from,
        autocast: str | None = o.AUTOCAST_TRAIN, image_size: int | None = o.IMAGE_SIZE_ONLINE,
        transform: str = o.TRANSFORM, limit: int | None = o.Fit.limit, sample: str = o.SAMPLE,
        sample_seed: int = o.SAMPLE_SEED, val_images: int = o.VAL_IMAGES, val_data: str | None = o.Fit.val_data,
        val_crops: int = o.Fit.val_crops, stats_images: int = o.Fit.stats_images,
        probe_data: str | None = o.Fit.probe_data, probe_limit: int = o.Fit.probe_limit, seed: int = o.SEED,
        ckpt_every: int = o.Fit.ckpt_every, val_every: int = o.Fit.val_every, resume: bool = o.Fit.resume,
        workers: int = o.Fit.workers, device: str = o.DEVICE, compile: bool = o.Fit.compile,
        parallel_blocks: bool = o.Fit.parallel_blocks, store_cache_gb: float = o.Fit.store_cache_gb,
        store_sampling: str = o.Fit.store_sampling, log_to: str = o.LOG_TO, log_every: int = o.LOG_EVERY,
        config: Path | None = o.CONFIG, progress: bool = o.PROGRESS_BARS):
    """Train a Raptor surrogate (stage 1 per block, stage 2 joint) and validate it against the teacher.
    Runs under torchrun --nproc-per-node N (data-parallel, DDP; gloo on CPU, NCCL on GPU)."""
    options = dict(locals())  # each option named like a FitConfig field goes into the config (o.fit_config)
    from raptor.surrogate.fit import run_fit
    from raptor.surrogate.report import console_summary

    cfg = o.fit_config(options, **o.loss_weights(stage1_weights, stage2_weights), log_to=parse_log_to(log_to),
                       probe_data=None if probe_data in (None, "none") else probe_data)
    m = run_fit(cfg, resume=resume, progress=progress)
    if m:  # else a torchrun rank other than 0: rank 0 reports
        typer.echo("\n".join(console_summary(m, out)))


@app.command("fit-report")
def fit_report(runs: list[Path] = o.FitReport.runs, out: Path | None = o.FitReport.out):
    """Markdown tables comparing finished fits: R2 per layer and token group, baselines, probes."""
    text = report([load_run(r) for r in runs])
    if out:
        atomic_write_text(out, text)
    typer.echo(text)


@app.command()
def probe(task: str | None = o.Probe.task, backbone: str | None = o.Probe.backbone, data: str | None = o.Probe.data,
          out: Path = o.Probe.out, seeds: str = o.Probe.seeds, splice: str | None = o.Probe.splice,
          layer: int | None = o.Probe.layer, image_size: int | None = o.Probe.image_size, transform: str = o.TRANSFORM,
          lrs: str | None = o.Probe.lrs, epochs: int | None = o.Probe.epochs,
          batch_size: int | None = o.Probe.batch_size, weight_decay: float | None = o.Probe.weight_decay,
          init_head: str | None = o.Probe.init_head, cache: Path | None = o.Probe.cache,
          limit: int | None = o.Probe.limit, sample: str = o.SAMPLE, sample_seed: int = o.SAMPLE_SEED,
          standardize: bool = o.Probe.standardize, device: str = o.Probe.device, log_to: str | None = o.TRACK,
          log_every: int = o.TRACK_EVERY, config: Path | None = o.CONFIG, progress: bool = o.PROGRESS_BARS):
    """Linear probes (the paper's Table-1 protocols) on cached features of a teacher, a surrogate or a splice.
    Runs under torchrun --nproc-per-node N: the ranks share the feature passes."""
    options = dict(locals())
    from raptor.probes.run import ProbeConfig, parse_lrs, parse_seeds, run_probe
    from raptor.probes.table import console_summary

    cfg = o.config_from(ProbeConfig, options, seeds=parse_seeds(seeds), lrs=parse_lrs(lrs))
    o.require(cfg, "task", "backbone", "data")
    recs = run_probe(cfg, progress=progress)
    if recs:  # else a torchrun rank other than 0 (it shared the feature passes): rank 0 reports
        typer.echo("\n".join(console_summary(recs, task, out)))


@app.command()
def dynamics(teacher: str = o.TEACHER, surrogate: Path | None = o.Dynamics.surrogate, data: str = o.DATA_PHOTOS,
             store: Path | None = o.Dynamics.store, out: Path = o.OUT_DIR, phases: str | None = o.Dynamics.phases,
             limit: int | None = o.LIMIT_ROWS, sample: str = o.SAMPLE, sample_seed: int = o.SAMPLE_SEED,
             batch_size: int = o.BATCH_SIZE, image_size: int | None = o.Dynamics.image_size,
             transform: str = o.TRANSFORM, eps: str = o.Dynamics.eps, inject: str | None = o.Dynamics.inject,
             perturb_images: int = o.Dynamics.perturb_images, rank_images: int = o.Dynamics.rank_images,
             knn_k: int = o.Dynamics.knn_k, seed: int = o.Dynamics.seed, space: str = o.Dynamics.space,
             autocast: str | None = o.Dynamics.autocast, null_draws: int = o.Dynamics.null_draws,
             device: str = o.DEVICE, config: Path | None = o.CONFIG, progress: bool = o.PROGRESS_BARS):
    """Dynamical interpretability (docs/method.md §9): convergence, speed, coherence, update ranks, class basins and
    perturbation recovery, with the paper's three findings stated as holds / does not hold."""
    options = dict(locals())
    from raptor.dynamics.report import console_summary
    from raptor.dynamics.run import DynamicsConfig, run_dynamics

    spec = PhaseSpec.parse(phases)
    if spec.method != "dp":
        raise RaptorError(f"dynamics --phases {phases}: give layers (e.g. 1-6/7-12) or an analysis.json")
    cfg = o.config_from(DynamicsConfig, options, phases=spec.layers, phases_file=spec.file, eps=o.floats(eps, "--eps"),
                        inject=parse_layers(inject))
    typer.echo("\n".join(console_summary(run_dynamics(cfg, progress=progress), out)))


@app.command()
def study(data: str = o.Study.data, out: Path = o.Study.out, sd: str = o.Study.sd, seeds: str = o.Study.seeds,
          ks: str = o.Study.ks, random: int = o.Study.random, partitions: str = o.Study.partitions,
          swap_samples: int = o.Study.swap_samples, references: bool = o.Study.references, limit: int | None = o.LIMIT,
          sample: str = o.SAMPLE, sample_seed: int = o.SAMPLE_SEED, image_size: int = o.Study.image_size,
          patch_size: int = o.Study.patch_size, dim: int = o.Study.dim, depth: int = o.Study.depth,
          heads: int = o.Study.heads, epochs: int = o.Study.epochs, batch_size: int = o.Study.batch_size,
          lr: float = o.Study.lr, shift: int = o.Study.shift, flip: bool = o.Study.flip, steps1: int = o.Study.steps1,
          steps2: int = o.Study.steps2, device: str = o.DEVICE, log_to: str | None = o.TRACK,
          log_every: int = o.TRACK_EVERY, config: Path | None = o.CONFIG, progress: bool = o.PROGRESS):
    """The small-scale study (docs/method.md §8): does stochastic depth make ViTs block-recurrent? Trains one ViT per
    (p, seed), then phases, Raptor fits vs random partitions, layer swaps and correlations (Figures 3 and 4)."""
    options = dict(locals())
    from raptor.study.report import console_summary
    from raptor.study.run import FitBudget, StudyConfig, run_study
    from raptor.study.vit import TrainConfig, ViTConfig

    inner = {**options, "config": None}  # --config is merged once, into the whole StudyConfig (vit/train/fit nested)
    cfg = o.config_from(StudyConfig, options, {"fit": ("steps1", "steps2")}, sd=o.floats(sd, "--sd"),
                        seeds=o.ints(seeds, "--seeds"), ks=o.ints(ks, "--ks"), random_partitions=random,
                        partitions=tuple(x.strip() for x in partitions.split(",") if x.strip()),
                        vit=o.config_from(ViTConfig, inner), train=o.config_from(TrainConfig, inner),
                        fit=FitBudget(steps1=steps1, steps2=steps2))  # not from options: batch_size, lr are the ViT's
    typer.echo("\n".join(console_summary(run_study(cfg, progress=progress), out)))


@app.command()
def ablation(teacher: str = o.TEACHER, data: str | None = o.DATA_ONLINE, store: Path | None = o.STORE_TRAIN,
             phases: str | None = o.Ablation.phases, k: int | None = o.Ablation.k, out: Path = o.Ablation.out,
             recipe: str = o.Ablation.recipe, steps1: int | None = o.Ablation.steps1,
             steps2: int | None = o.Ablation.steps2, batch_size: int | None = o.Ablation.batch_size,
             lr: float | None = o.Ablation.lr, lr2: float | None = o.Ablation.lr2,
             autocast: str | None = o.AUTOCAST_TRAIN, image_size: int | None = o.IMAGE_SIZE_ONLINE,
             val_images: int = o.VAL_IMAGES, val_data: str | None = o.Ablation.val_data,
             val_crops: int = o.Ablation.val_crops, limit: int | None = o.Ablation.limit, seed: int = o.SEED,
             probe_data: str | None = o.Ablation.probe_data, init_head: str | None = o.Ablation.init_head,
             transform: str = o.TRANSFORM, config: Path | None = o.CONFIG, progress: bool = o.PROGRESS):
    """The paper's training ablation (its Table 1) as one command: teacher forcing only, + autoregressive anneal,
    + depth scaling, + cls weighting, + stage 2 (+ a fine-tuned probe), each scored on held-out images."""
    options = dict(locals())  # the options named like FitConfig fields make the full model's (o.fit_config)
    from raptor.ablation import console_summary, run_ablation

    res = run_ablation(o.ablation_config(options), progress=progress)
    typer.echo("\n".join(console_summary(res, out)))


@app.command()
def zoo(teachers: str | None = o.Zoo.teachers, data: str = o.DATA_PHOTOS, out: Path = o.OUT_DIR,
        limit: int | None = o.LIMIT_ROWS, sample: str = o.SAMPLE, sample_seed: int = o.SAMPLE_SEED,
        batch_size: int = o.BATCH_SIZE, image_size: int | None = o.Zoo.image_size, k_max: int = o.Analyze.k_max,
        k_rule: str = o.Analyze.k_rule, k_frac: float = o.Analyze.k_frac, autocast: str | None = o.Analyze.autocast,
        null_resamples: int = o.Analyze.null_resamples, device: str = o.DEVICE, config: Path | None = o.CONFIG,
        progress: bool = o.PROGRESS_BAR):
    """The paper's Figure 1 across models: similarity matrices side by side, phases with the null test, a table."""
    options = dict(locals())
    from raptor.zoo import ZooConfig, console_summary, run_zoo, split_teachers

    cfg = o.config_from(ZooConfig, options, teachers=split_teachers(teachers or ""))
    typer.echo("\n".join(console_summary(run_zoo(cfg, progress), out)))


@app.command()
def table(dirs: list[Path] = o.Table.dirs, out: Path | None = o.Table.out):
    """The paper's Table 1 from probe results: backbones x (top-1, mIoU, RMSE), mean ± std, % of teacher."""
    from raptor.probes.table import write_table

    md, md_path, csv_path = write_table(list(dirs), out)
    typer.echo(md)
    typer.echo(f"wrote {md_path} and {csv_path}")


@app.command()
def info(store: Path = o.INFO_STORE):
    """Summarise a trajectory store."""
    from raptor.store import TrajectoryStore

    typer.echo(json.dumps(TrajectoryStore(store).summary(), indent=2, default=str))


@app.command()
def demo(out: Path = o.Demo.out, limit: int | None = o.Demo.limit):
    """The main job end to end on the embedded default (bundled DINOv2-S, bundled photos)."""
    from raptor.demo import run_demo

    run_demo(out, limit=limit)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: sys.argv) and return the exit code; every expected failure is one
    ``error: ...`` line on stderr and code 2 (usage errors, bad inputs, full or read-only filesystems)."""
    import warnings

    try:  # typer >= 0.20 vendors click
        import typer._click.exceptions as cx
    except ImportError:  # pragma: no cover
        import click.exceptions as cx

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["MPLBACKEND"] = "Agg"  # the command writes figures to files (an inherited notebook backend may not
    # even be installed in this venv); a library caller keeps its own
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"  # without the source line
    tune_malloc()  # process-wide allocator settings for long jobs: the command's choice, never a library call's
    log_to_stdout()

    def fail(msg: str) -> int:
        typer.echo("error: " + " ".join(str(msg).split()), err=True)  # one line, whatever the message holds
        return 2

    try:
        with cli_messages():  # errors name options as flags here; a Python caller reads keywords
            rv = app(args=argv, prog_name="raptor", standalone_mode=False)
    except cx.NoArgsIsHelpError:  # typer has already printed the help
        return 0
    except cx.UsageError as e:
        cmd = e.ctx.command_path if e.ctx else "raptor"
        return fail(f"{e.format_message()} (see '{cmd} --help')")
    except cx.ClickException as e:
        return fail(e.format_message())
    except RaptorError as e:
        with cli_messages():
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
