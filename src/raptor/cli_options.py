"""The options of the ``raptor`` commands: every flag, short alias, default and help text, defined once. Options
that several commands take alike are module constants; the rest sit in one namespace per command (``Fit.loss``),
and a command's signature in :mod:`raptor.cli` names them. Beside them: the parsers of comma-separated option
values and the helpers that build a command's config from its options. Light (no torch: ``raptor --help`` starts
fast); what needs torch is imported where it is used."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import typer

from raptor.data.sources import DATA_SPEC_HELP
from raptor.errors import RaptorError
from raptor.phases import PhaseSpec
from raptor.teachers import SPEC_HELP

TEACHER_HELP = "Teacher spec: " + SPEC_HELP  # written from the teacher kinds table
DEVICE_HELP = ("auto (a CUDA GPU when there is one) | cpu | cuda | cuda:N (under torchrun: cuda = the local rank's "
               "GPU) | mps (Apple GPU, one process)")
DATA_HELP = "Data spec: " + DATA_SPEC_HELP  # the image sources' own help

# --- options several commands take alike
TEACHER = typer.Option("bundled:dinov2-s", "--teacher", "-t", help=TEACHER_HELP)
DATA_PHOTOS = typer.Option("bundled:photos", "--data", "-d", help=DATA_HELP)  # analyze, dynamics
DATA_ONLINE = typer.Option(None, "--data", "-d", help=DATA_HELP + " (online teacher, no storage)")  # fit, ablation
STORE_TRAIN = typer.Option(None, help="Train from a trajectory store instead of an online teacher")  # fit, ablation
OUT_DIR = typer.Option(..., "--out", "-o", help="Output directory")  # analyze, dynamics
LIMIT = typer.Option(None, help="Only N images: a seeded sample, stratified by class")  # extract, study
LIMIT_ROWS = typer.Option(None, help="Only N images (or store rows): a seeded sample, stratified by class")
SAMPLE = typer.Option("random", help="--limit: random (seeded, stratified by class) | sorted (the first N)")
SAMPLE_SEED = typer.Option(1, help="Seed of the --limit sample")
BATCH_SIZE = typer.Option(16, help="Batch size")  # analyze, dynamics
IMAGE_SIZE_ONLINE = typer.Option(None, help="Crop size for online data (default: the teacher's)")  # fit, ablation
AUTOCAST_TRAIN = typer.Option(None, help="bfloat16 autocast for training")  # fit, ablation
TRANSFORM_HELP = ("Eval transform: paper (resize the shorter side to crop x 256/224 bicubic, center crop, the "
                  "teacher's mean/std) | model (the teacher's own preprocessor_config.json: size, crop, resample, "
                  "rescale, mean/std; scaled to --image-size if given; equals paper for teachers without one: "
                  "bundled, tiny, planted, dinov2-pth, timm, open_clip)")
TRANSFORM = typer.Option("paper", help=TRANSFORM_HELP)  # extract, analyze, fit, dynamics, probe
LOG_TO = typer.Option("jsonl", help="Live tracking, any of jsonl,tensorboard,wandb: OUT/log.jsonl (always: the loss "
                      "history), TensorBoard events in OUT/tensorboard (needs tensorboardX), a wandb run (needs wandb; "
                      "WANDB_MODE=offline works offline); a resumed run continues the same logs")  # fit
LOG_EVERY = typer.Option(1, help="TensorBoard / wandb scalars every N steps (log.jsonl keeps every step)")  # fit
TRACK = typer.Option(None, "--log-to", help="Live tracking, any of jsonl,tensorboard,wandb (default: none): "
                     "OUT/log.jsonl, TensorBoard events in OUT/tensorboard, a wandb run (one per OUT, continued by "
                     "later runs into it): probe: each seed's validation curves and test score; study: each ViT's "
                     "training loss per epoch and each finished run's scores")  # probe, study
TRACK_EVERY = typer.Option(1, "--log-every", help="TensorBoard / wandb scalars every N epochs (log.jsonl keeps every "
                           "one)")  # probe, study
VAL_IMAGES = typer.Option(128, help="Whole images held out for validation")  # fit, ablation
SEED = typer.Option(0)  # fit, ablation
DEVICE = typer.Option("auto", help=DEVICE_HELP)  # extract, fit, analyze, zoo, dynamics, study
PROGRESS_BAR = typer.Option(True, help="Show a progress bar")  # extract, analyze
PROGRESS_BARS = typer.Option(True, help="Show progress bars")  # fit, probe, dynamics
PROGRESS = typer.Option(True, help="Show progress")  # study, ablation


class Extract:
    data = typer.Option(..., "--data", "-d", help=DATA_HELP)
    out = typer.Option(..., "--out", "-o", help="Store directory (zarr v3); re-run the same command to resume")
    dtype = typer.Option("bfloat16", help="Stored dtype: bfloat16 | float16 | float32")
    batch_size = typer.Option(None, help="Forward batch size [default: the smaller of 16 and --chunk-images]")
    chunk_images = typer.Option(None, help="Images per store chunk (also the resume granularity; one forward covers "
                                "at most one chunk) [default: the larger of 32 and --batch-size]")
    layers = typer.Option(None, help="Layers to store, e.g. 0-12 or 0,6,12 (default all)")
    image_size = typer.Option(None, help="Crop size (default: the teacher's, 224 for DINOv2)")
    compression = typer.Option("lz4", help="lz4 (bit-shuffled, default) | zstd | none")
    autocast = typer.Option(None, help="bfloat16 autocast for the forward pass (faster on CPU)")
    head = typer.Option(None, help="Official DINOv2 linear head .pth (for dinov2-pth teachers)")
    workers = typer.Option(None, help="Image-decoding worker processes (0: a thread of this process) [default: 1 on "
                           "the CPU; on a GPU half the rank's cores, up to 8]")


class Analyze:
    store = typer.Option(None, help="Read trajectories from this store instead of running the teacher")
    image_size = typer.Option(None, help="Crop size (default: the teacher's)")
    layers = typer.Option(None, help="Layers, e.g. 1-12 (default: block outputs 1..L, as the paper)")
    cka_groups = typer.Option("auto", help="CKA token groups: auto (cls + registers if any) or a list of "
                              "cls,registers,patches,all (patches/all cost about one more forward pass)")
    k_max = typer.Option(6, help="Largest number of phases to segment into")
    k_rule = typer.Option("gain", help="Rule to choose k: gain | elbow")
    k_frac = typer.Option(0.1, help="gain rule: add a phase while it adds > frac of the total distance")
    maxcut_variant = typer.Option("official", help="recursive max-cut: official (the notebook exactly) | balanced "
                                  "(both sides of every cut >= 2 layers)")
    autocast = typer.Option(None, help="bfloat16 autocast for the forward pass")
    head = typer.Option(None, help="Official DINOv2 linear head .pth")
    null_resamples = typer.Option(200, help="Bootstrap / null resamples of the phase test against the lag-only null "
                                  "(0: no test)")


class Zoo:
    teachers = typer.Option(None, help="(Required, here or in --config.) Comma-separated teacher specs, e.g. "
                            "hf:facebook/dinov2-small,hf:openai/clip-vit-base-patch16,timm:deit_small_patch16_224 "
                            "(each analysed on the same images)")
    image_size = typer.Option(None, help="Crop size for every model (default: each teacher's own)")


class Fit:
    phases = typer.Option(None, help="analysis.json from raptor analyze (its chosen phases), a phases file (a JSON "
                          "array of layer lists), explicit phases of output layers, e.g. 1-7/8-11/12, or 'equal' "
                          "(with --k: equal phases)")
    k = typer.Option(None, help="Number of blocks (alone: the DP phases of the training images' layer similarity, as "
                     "raptor analyze finds them; with an analysis.json: its DP segmentation for k; with --phases "
                     "equal: equal phases)")
    out = typer.Option(..., "--out", "-o", help="Run directory")
    recipe = typer.Option("short", help="Hyper-parameter recipe: short (validated at CPU budgets of hundreds of "
                          "steps, docs/surrogate.md) | paper (the official code's, for 312,500 steps of batch 64); the "
                          "flags below override it")
    stage = typer.Option("both", help="1 | 2 | both")
    steps1 = typer.Option(None, help="Stage-1 steps per block [recipe: short 450, paper 312500]")
    steps2 = typer.Option(None, help="Stage-2 steps [recipe: short 200, paper 312500]")
    batch_size = typer.Option(None, help="Batch size [recipe: short 16, paper 64]")
    lr = typer.Option(None, help="Peak learning rate [recipe: short 3e-3, paper 3e-4]")
    lr2 = typer.Option(None, help="Stage-2 peak learning rate [recipe: short 3e-4, paper: --lr]")
    weight_decay = typer.Option(None, help="AdamW weight decay [recipe: 1e-4]")
    clip = typer.Option(None, help="Gradient-norm clip [recipe: 1.0]")
    loss = typer.Option(None, help="mse | cosine | mse+cosine [recipe: mse]")
    loss_norm = typer.Option(None, help="layer: divide each target layer's (group's) squared error by its "
                             "training-set variance | none: the paper's plain MSE [recipe: short layer, paper none]")
    stage1_weights = typer.Option(None, help="cls,registers,patches loss weights on the last stage-1 segment, or "
                                  "'none' [recipe: 0.34,0.33,0.33, the paper's]")
    stage2_weights = typer.Option(None, help="cls,registers,patches loss weights in stage 2, or 'none' (absent groups "
                                  "get 0) [recipe: short none, paper 0.45,0.10,0.45]")
    sigma = typer.Option(None, help="Gaussian input noise [recipe: 0]")
    tf_anneal_frac = typer.Option(None, help="Stage 1: fraction of the steps over which teacher forcing anneals to "
                                  "the block's own rollout [recipe: 0.25]")
    teacher_forcing_only = typer.Option(False, "--teacher-forcing-only", help="Stage 1 without the rollout (the "
                                        "paper's ablation, first row)")
    t_scale = typer.Option(True, "--t-scale/--no-t-scale", help="Depth scaling: the blocks' gates depend on the "
                           "layer index t (off: the ablation's row before '+ depth scaling')")
    image_loss = typer.Option(0.0, help="Weight of an image-level loss term (1 - batch R2 of the pooled [cls || mean "
                              "patch] summaries) added to every layer's loss")
    mlp = typer.Option("swiglu", help="swiglu | gelu")
    init_from_teacher = typer.Option(False, help="Start each block from its phase's middle teacher block (gelu)")
    init_from = typer.Option(None, help="Start from the weights of a finished fit run with the same phases and blocks "
                             "(e.g. --stage 2 from a --stage 1 run)")
    limit = typer.Option(None, help="Only N images/rows: a seeded sample, stratified by class")
    val_data = typer.Option(None, help="Online data: hold out these whole photos (a data spec, e.g. "
                            "bundled:imagenet20) instead of --val-images; no crop of them is trained on")
    val_crops = typer.Option(0, help="--val-data: N seeded random-resized crops per held-out photo (0: one centre "
                             "view each)")
    stats_images = typer.Option(256, help="Training images for the loss scale, the baselines and (--k alone) the "
                                "phases")
    probe_data = typer.Option("bundled:digits", help="Labelled data for the probes when the training data has no "
                              "labels; 'none' to skip")
    probe_limit = typer.Option(1000, help="Labelled training images for the fresh probes")
    ckpt_every = typer.Option(25, help="Checkpoint every N steps")
    val_every = typer.Option(0, help="Validate (held-out R2) every N steps; 0 = only at the end")
    resume = typer.Option(False, help="Continue the run in --out from its last checkpoint")
    workers = typer.Option(2, help="Online data: image-decoding worker processes (0: in the main process)")
    compile = typer.Option(False, "--compile", help="torch.compile the surrogate's blocks (GPU runs)")
    parallel_blocks = typer.Option(False, "--parallel-blocks", help="Under torchrun: train the stage-1 blocks at the "
                                   "same time, one rank group per block")
    store_cache_gb = typer.Option(6.0, help="Cache a store's training rows in RAM (GPU memory on a GPU) when they fit "
                                  "in this many GB; 0 reads every batch from disk")
    store_sampling = typer.Option("rows", help="A store's batch rows: rows (each drawn from every training row) | "
                                  "chunks (whole store chunks until a batch: one chunk read per chunk_images rows "
                                  "used, for stores too large to cache; only for a store written in shuffled order: "
                                  "extract keeps the data's order, class folders give batches of 2 classes)")


class FitReport:
    runs = typer.Argument(..., help="Finished raptor fit run directories")
    out = typer.Option(None, "--out", "-o", help="Write the Markdown here too")


class Probe:
    task = typer.Option(None, "--task", help="(Required, here or in --config.) cls (top-1) | seg (mIoU) | depth (RMSE)")
    backbone = typer.Option(None, "--backbone", "-b", help="(Required, here or in --config.) Teacher spec or a raptor "
                            "fit run directory")
    data = typer.Option(None, "--data", "-d", help="(Required, here or in --config.) cls: bundled:digits | "
                        "bundled:lfw | imagenet:<root>; seg: bundled:digit-seg | ade20k:<root>; depth: "
                        "bundled:motorcycle | bundled:scenes | nyud:<root> | paired:<root>")
    out = typer.Option(..., "--out", "-o", help="Results directory (results.jsonl is appended to)")
    seeds = typer.Option("0,1,2", help="Probe seeds, e.g. 0,1,2 (one results line each)")
    splice = typer.Option(None, help="With a run: teacher 0..i, surrogate i..j, teacher j..L (i:j)")
    layer = typer.Option(None, help="With a teacher: read its tokens at this layer")
    image_size = typer.Option(None, help="Input size (default: the data set's, else the teacher's)")
    lrs = typer.Option(None, help="Learning-rate grid trained together, e.g. 1e-4,1e-3,1e-2")
    epochs = typer.Option(None, help="Epochs (default: the data set's recipe, else the paper's)")
    batch_size = typer.Option(None, help="Probe batch size")
    weight_decay = typer.Option(None, help="AdamW weight decay")
    init_head = typer.Option(None, help="cls: start from 'teacher' (its head) or a *_linear_head.pth")
    cache = typer.Option(None, help="Feature cache directory (default OUT/features)")
    limit = typer.Option(None, help="At most N images per split (a seeded sample, stratified by class; smoke runs)")
    standardize = typer.Option(True, help="z-score features with training-split mean/std (an affine map the head "
                               "absorbs; --no-standardize: the paper's raw features)")
    device = typer.Option("auto", help=DEVICE_HELP + "; for the feature passes (heads train on the CPU)")


class Dynamics:
    surrogate = typer.Option(None, "--surrogate", "-s", help="A raptor fit run directory for the same teacher, or "
                             "hf-raptor:<folder or user/name> (a shared surrogate): its own rollout from the "
                             "teacher's layer 0, side by side")
    store = typer.Option(None, help="Read trajectories from this store (every layer 0..L) instead of running the "
                         "teacher")
    phases = typer.Option(None, help="analysis.json from raptor analyze, or e.g. 1-7/8-11/12 (default: the teacher's "
                          "DP phases, computed in the same pass)")
    image_size = typer.Option(None, help="Crop size for live data (default: the teacher's)")
    eps = typer.Option("0.05,0.2", help="Relative noise sizes for perturbation recovery (each > 0)")
    inject = typer.Option(None, help="Layers to perturb, e.g. 0,4,8 (default: each phase's entry)")
    perturb_images = typer.Option(64, help="Images for perturbation recovery")
    rank_images = typer.Option(64, help="Images for the update ranks (two eigendecompositions per image and layer: "
                               "the costly metric; the report gives their standard error)")
    knn_k = typer.Option(5, help="k of the class-basin kNN accuracy")
    seed = typer.Option(0, help="Seed of the perturbation noise")
    space = typer.Option("raw", help="raw: the residual stream x_l (as the paper) | normed: the teacher's final norm "
                         "applied to every layer (removes outlier channels' pull on directions)")
    autocast = typer.Option(None, help="bfloat16 autocast for the live teacher forward")
    null_draws = typer.Option(4, help="Random-weight teachers (same embedding, fresh blocks) the verdicts are tested "
                              "against; 0: no such null")


class Study:
    data = typer.Option("bundled:digits", "--data", "-d", help="Labelled data: bundled:digits | bundled:lfw | "
                        "fashion-mnist[:<dir>] | classes:<dir> (a folder per class, e.g. CIFAR-100 exported to PNG)")
    out = typer.Option(..., "--out", "-o", help="Study directory (re-run the same command to resume)")
    sd = typer.Option("0,0.1,0.2,0.3,0.5", "--sd", help="Uniform stochastic-depth probabilities p")
    seeds = typer.Option("0,1", help="Training seeds per p")
    ks = typer.Option("2,3", help="Raptor block counts k")
    random = typer.Option(10, help="Partitions per k of each null family (the Figure-3 baseline)")
    partitions = typer.Option("balanced,shuffled", help="Null families the found phases are fitted against: balanced "
                              "(contiguous, every phase >= max(2, L/2k) layers), shuffled (non-contiguous, the found "
                              "phase sizes), random (any contiguous partition)")
    swap_samples = typer.Option(10, help="Random draws per layer-swap setting (0: no swap test)")
    references = typer.Option(True, "--references/--no-references", help="Also the paper's Figure 13 points: an "
                              "untrained and an over-fitted ViT (p = 0)")
    image_size = typer.Option(16, help="ViT input size")
    patch_size = typer.Option(4, help="ViT patch size")
    dim = typer.Option(64, help="ViT width")
    depth = typer.Option(12, help="ViT depth")
    heads = typer.Option(4, help="ViT heads")
    epochs = typer.Option(25, help="ViT training epochs")
    batch_size = typer.Option(64, help="ViT training batch size")
    lr = typer.Option(2e-3, help="ViT peak learning rate (AdamW, warm-up + cosine)")
    shift = typer.Option(2, help="Augmentation: random translation up to this many pixels")
    flip = typer.Option(False, help="Augmentation: random horizontal flips (not for digits)")
    steps1 = typer.Option(80, help="Raptor stage-1 steps per block")
    steps2 = typer.Option(40, help="Raptor stage-2 steps")


class Ablation:
    phases = typer.Option(None, help="As raptor fit: an analysis.json, e.g. 1-7/8-11/12, or 'equal' (with --k)")
    k = typer.Option(None, help="Number of blocks (alone: the DP phases of the training images)")
    out = typer.Option(..., "--out", "-o", help="Ablation directory (one raptor fit run per row; re-run the same "
                       "command to resume)")
    recipe = typer.Option("short", help="Hyper-parameter recipe of the full model: short | paper")
    steps1 = typer.Option(None, help="Stage-1 steps per block [recipe]")
    steps2 = typer.Option(None, help="Stage-2 steps [recipe]")
    batch_size = typer.Option(None, help="Batch size [recipe]")
    lr = typer.Option(None, help="Peak learning rate [recipe]")
    lr2 = typer.Option(None, help="Stage-2 peak learning rate [recipe]")
    val_data = typer.Option(None, help="Online data: hold out these whole photos (a data spec)")
    val_crops = typer.Option(0, help="--val-data: N seeded random-resized crops per held-out photo")
    limit = typer.Option(None, help="Only N images/rows: a seeded sample")
    probe_data = typer.Option(None, help="Row 6: labelled classification data for the probes")
    init_head = typer.Option(None, help="Row 6: the teacher's linear classifier ('teacher' or an official "
                             "*_linear_head.pth), fine-tuned on the row-5 surrogate")


class Table:
    dirs = typer.Argument(..., help="raptor probe output directories (or results.jsonl files)")
    out = typer.Option(None, "--out", "-o", help="Path prefix for .md and .csv (default: FIRST_DIR/table)")


class Demo:
    out = typer.Option(Path("runs/demo"), "--out", "-o", help="Output directory")
    limit = typer.Option(None, help="Only the first N bundled photos")


INFO_STORE = typer.Argument(..., help="Store directory")


def floats(text: str, name: str) -> tuple[float, ...]:
    """A comma-separated list of numbers (option ``name``, for the error)."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise RaptorError(f"bad {name} {text!r}: a comma-separated list of numbers") from None


def ints(text: str, name: str) -> tuple[int, ...]:
    """A comma-separated list of integers (option ``name``, for the error)."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise RaptorError(f"bad {name} {text!r}: a comma-separated list of integers") from None


def config_from(cls: type, options: dict[str, Any], nested_sets: dict[str, tuple[str, ...]] | None = None,
                **converted: Any) -> Any:
    """The dataclass ``cls`` from a command's options (its ``locals()``): each option named like a field of ``cls``
    as given (a path as a string, as configs hold paths), ``converted`` (the options parsed or renamed) over them;
    then the settings of ``--config`` (``options["config"]``) where the command line did not give them
    (``nested_sets``: see :func:`with_config_file`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    if "log_to" in names and "log_to" in options and "log_to" not in converted:  # --log-to a,b (None: no tracking)
        from raptor.tracking import parse_log_to

        converted["log_to"] = parse_log_to(options["log_to"]) if options["log_to"] else ()
    cfg = cls(**{**{n: _plain(v) for n, v in options.items() if n in names}, **converted})
    return with_config_file(cfg, options.get("config"), nested_sets=nested_sets)


def fit_config(options: dict[str, Any], config_data: dict | None = None, **converted: Any) -> Any:
    """``FitConfig.from_recipe(--recipe, ...)`` from the options of ``raptor fit`` or ``raptor ablation``, as
    :func:`config_from` (``--phases``/``--k`` parsed here), except that a recipe hyper-parameter
    (``RECIPE_FIELDS``) left at None takes the recipe's value. ``config_data``: the FitConfig settings of
    ``options["config"]`` when they are not the whole file (the ablation's ``fit`` mapping)."""
    from raptor.surrogate.config import RECIPE_FIELDS, FitConfig

    names = {f.name for f in dataclasses.fields(FitConfig)} - {"recipe"}
    given = {n: _plain(v) for n, v in options.items() if n in names and not (n in RECIPE_FIELDS and v is None)}
    phases = PhaseSpec.parse(options["phases"], options["k"]).fields()
    cfg = FitConfig.from_recipe(options["recipe"], **{**given, **phases, **converted})
    if options.get("config") is None:
        return cfg
    data = _read_config(options["config"]) if config_data is None else config_data
    sets = {"recipe": ("recipe", *RECIPE_FIELDS)}
    merged = with_config_file(cfg, options["config"], sets, data)
    if merged.recipe != cfg.recipe:  # the file names another recipe: its hyper-parameters where nothing set them
        recipe = FitConfig.from_recipe(merged.recipe)
        keep = set(data) | _given_fields(sets)
        merged = dataclasses.replace(merged, **{f: getattr(recipe, f) for f in RECIPE_FIELDS if f not in keep})
    return merged


def ablation_config(options: dict[str, Any]) -> Any:
    """The ``AblationConfig`` of ``raptor ablation``'s options: the full model's FitConfig from the options named like
    its fields (``--probe-data`` is row 6's, not the fits'); ``--config`` takes the ablation's own config.yaml (the
    FitConfig nested under ``fit``, beside ``probe_data`` and ``init_head``) or a flat FitConfig mapping (a fit's
    config.yaml, or an ablation's written before it nested)."""
    from raptor.ablation import AblationConfig

    path = options.get("config")
    data = read_config(path) if path is not None else {}
    nested = isinstance(data.get("fit"), dict)
    fit_cfg = fit_config(options, data["fit"] if nested else None, probe_data=None)
    cfg = AblationConfig(out=_plain(options["out"]), fit=fit_cfg, probe_data=options["probe_data"],
                         init_head=options["init_head"])
    return with_config_file(cfg, path, data={k: v for k, v in data.items() if k != "fit"}) if nested else cfg


def loss_weights(stage1: str | None, stage2: str | None) -> dict[str, Any]:
    """FitConfig's loss weights from ``--stage1-weights`` / ``--stage2-weights`` (parsed in that order, before
    :func:`fit_config` parses the phases and the recipe); an option left unset is absent: the recipe's weights."""
    from raptor.surrogate.losses import parse_weights

    given = {"stage1_last_weights": (stage1, "--stage1-weights"), "stage2_weights": (stage2, "--stage2-weights")}
    return {field: parse_weights(text, flag) for field, (text, flag) in given.items() if text is not None}


def _plain(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else v


CONFIG = typer.Option(None, "--config", help="Settings from a config.yaml this project wrote (or a hand-written "
                      "subset of its keys); the flags given on the command line override them")
# options that set other (or more) config fields than their own name
_SETS = {"phases": ("phases", "phases_file", "k", "phase_method"), "k": ("phases", "phases_file", "k", "phase_method"),
         "stage1_weights": ("stage1_last_weights",), "random": ("random_partitions",)}


def given_on_command_line() -> set[str]:
    """The options of the running command that were typed on its command line (not defaults, not a config)."""
    try:  # typer >= 0.20 runs its own copy of click
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - older typer runs click
        from click import get_current_context
    ctx = get_current_context(silent=True)
    if ctx is None:
        return set()
    return {p.name for p in ctx.command.params if p.name and ctx.get_parameter_source(p.name) is not None
            and ctx.get_parameter_source(p.name).name == "COMMANDLINE"}


def with_config_file(cfg: Any, path: str | Path | None, extra_sets: dict[str, tuple[str, ...]] | None = None,
                     data: dict | None = None, nested_sets: dict[str, tuple[str, ...]] | None = None) -> Any:
    """``cfg`` with the settings of the YAML file ``path`` over it, except those the command line gave: every key
    must be a setting of ``cfg``'s class with a value of its type (one error line naming the key otherwise).

    A setting that is itself a dataclass (the study's ``vit``, ``train`` and ``fit``) takes a mapping of its own
    settings, merged into it the same way (``train.epochs``); the command-line options that set its fields are
    ``nested_sets[name]`` (default: the options named like its fields)."""
    if path is None:
        return cfg
    data = _read_config(path) if data is None else data
    return _merge(cfg, path, data, _given_fields(extra_sets), nested_sets or {}, "")


def _merge(cfg: Any, path, data: dict, keep: set[str], nested_sets: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(type(cfg))
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise RaptorError(f"--config {path}: unknown key {prefix + str(unknown[0])!r} (the settings are: "
                          f"{', '.join(hints)})")
    values = {}
    for k, v in data.items():
        sub = getattr(cfg, k)
        if dataclasses.is_dataclass(sub) and not isinstance(sub, type):
            if not isinstance(v, dict):
                raise RaptorError(f"--config {path}: {prefix}{k} must be a mapping of its settings, got {v!r}")
            names = nested_sets.get(k, tuple(f.name for f in dataclasses.fields(sub)))
            given = {n for n in given_on_command_line() if n in names}
            values[k] = _merge(sub, path, v, given, {}, f"{prefix}{k}.")
        else:
            typed = _typed(path, prefix + k, v, hints[k])  # checked even where the command line overrides it
            if k not in keep:
                values[k] = typed
    return dataclasses.replace(cfg, **values)


def _given_fields(extra_sets: dict[str, tuple[str, ...]] | None = None) -> set[str]:
    """The config fields that the options typed on the command line set."""
    sets = {**_SETS, **(extra_sets or {})}
    return {f for name in given_on_command_line() for f in sets.get(name, (name,))}


def read_config(path) -> dict:
    """The mapping of a ``--config`` YAML file (one error line for a missing, unreadable or non-mapping file)."""
    return _read_config(path)


def _read_config(path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise RaptorError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:  # a binary file: not text at all
        raise RaptorError(f"--config {path}: not readable YAML ({type(e).__name__})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RaptorError(f"--config {path}: a mapping of settings is needed, got a {type(data).__name__}")
    return data


def require(cfg: Any, *names: str) -> None:
    """Settings a command needs from its flags or its ``--config`` (typer cannot require them: a config may hold
    them)."""
    for n in names:
        if getattr(cfg, n) in (None, (), ""):
            raise RaptorError(f"--{n.replace('_', '-')} is required (on the command line or in --config)")


def _typed(path, key: str, value: Any, hint: Any) -> Any:
    """``value`` as the type ``hint`` (YAML lists become tuples where the setting is a tuple), or one error line."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:  # X | None: X's own error
            return _typed(path, key, value, rest[0])
        for a in rest:
            try:
                return _typed(path, key, value, a)
            except RaptorError:
                pass
    elif hint is bool and isinstance(value, bool):
        return value
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as text
        try:
            return float(value)
        except ValueError:
            pass
    elif hint is str and isinstance(value, str):
        return value
    elif origin in (tuple, list) and isinstance(value, (list, tuple)):
        if origin is tuple and args and Ellipsis not in args:  # a fixed length, e.g. tuple[float, float, float]
            if len(value) != len(args):
                raise RaptorError(f"--config {path}: {key} must be a list of {len(args)} values, got {value!r}")
            return tuple(_typed(path, key, v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        items = [_typed(path, key, v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    elif origin is dict and isinstance(value, dict) or hint is Any:
        return value
    raise RaptorError(f"--config {path}: {key} must be {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        if origin is tuple and args and Ellipsis not in args:
            return f"a list of {len(args)} values"
        return f"a list ({_type_name(args[0])} each)" if args else "a list"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "text",
            dict: "a mapping"}.get(hint, getattr(hint, "__name__", str(hint)))
