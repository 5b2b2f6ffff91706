"""A fit's settings: the named recipes (every hyper-parameter of the optimisation), :class:`FitConfig` with its
cheap checks and training fingerprint, and the learning-rate schedule the settings define."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from raptor.config import to_dict
from raptor.data.sampling import check_sample_order
from raptor.data.transforms import check_transform
from raptor.errors import RaptorError, check_positive
from raptor.phases import PhaseSpec
from raptor.surrogate.losses import KINDS, NORMS
from raptor.teachers.base import check_autocast
from raptor.tracking import check_log_to

# Named training recipes: every hyper-parameter of the optimisation, resolved before a run starts and recorded in its
# metrics.json. Explicit settings (CLI flags, FitConfig keywords) override the recipe's.
RECIPE_FIELDS = ("steps1", "steps2", "batch_size", "lr", "lr2", "min_lr", "warmup_frac", "weight_decay", "clip", "loss",
                 "loss_norm", "stage1_last_weights", "stage2_weights", "sigma", "tf_anneal_frac")


RECIPES: dict[str, dict] = {
    # validated at short budgets (hundreds of steps on a CPU): docs/surrogate.md's fidelity protocol, 3 seeds
    "short": dict(steps1=450, steps2=200, batch_size=16, lr=3e-3, lr2=3e-4, min_lr=1e-6, warmup_frac=0.05,
                  weight_decay=1e-4, clip=1.0, loss="mse", loss_norm="layer", stage1_last_weights=(0.34, 0.33, 0.33),
                  stage2_weights=None, sigma=0.0, tf_anneal_frac=0.25),
    # the official code's hyper-parameters, meant for 312,500 steps of batch 64 per stage (docs/method.md):
    # plain MSE, lr 3e-4 in both stages, 10,000 warm-up steps, stage-2 group weights 0.45 / 0.10 / 0.45
    "paper": dict(steps1=312_500, steps2=312_500, batch_size=64, lr=3e-4, lr2=None, min_lr=1e-6,
                  warmup_frac=10_000 / 312_500, weight_decay=1e-4, clip=1.0, loss="mse", loss_norm="none",
                  stage1_last_weights=(0.34, 0.33, 0.33), stage2_weights=(0.45, 0.10, 0.45), sigma=0.0,
                  tf_anneal_frac=0.25),
}


DEFAULT_RECIPE = "short"


@dataclass
class FitConfig:
    """One fit's settings. The optimisation's hyper-parameters default to the ``short`` recipe's values
    (``RECIPES``); :meth:`from_recipe` starts from another recipe. With ``k`` alone (no ``phases`` and no
    ``phases_file``) the phases are the contiguous DP segmentation, for ``k``, of the training images' layer
    similarity (as ``raptor analyze`` computes it), or equal phases with ``phase_method="equal"``."""
    teacher: str = "bundled:dinov2-s"
    data: str | None = "bundled:photos"
    store: str | None = None
    out: str = "runs/fit"
    phases_file: str | None = None
    k: int | None = None
    phases: list[list[int]] | None = None
    phase_method: str = "dp"
    recipe: str = DEFAULT_RECIPE  # the recipe the hyper-parameters below came from (a label: see recipe_report)
    stage: str = "both"
    steps1: int = 450
    steps2: int = 200
    batch_size: int = 16
    lr: float = 3e-3
    lr2: float | None = 3e-4  # stage-2 learning rate (None: lr)
    min_lr: float = 1e-6
    warmup_frac: float = 0.05
    weight_decay: float = 1e-4
    clip: float = 1.0
    loss: str = "mse"
    loss_norm: str = "layer"  # layer: each target layer/group's error / its training variance | none: the paper's
    stage1_last_weights: tuple[float, float, float] | None = (0.34, 0.33, 0.33)
    stage2_weights: tuple[float, float, float] | None = None
    sigma: float = 0.0
    tf_anneal_frac: float = 0.25
    teacher_forcing_only: bool = False  # stage 1 without the autoregressive anneal (the paper's ablation, row 1)
    image_loss: float = 0.0  # weight of an image-level term (1 - batch R^2 of the pooled summaries) in every loss;
    # under torchrun each rank normalises by its own share's between-image variance (not the 1-process update)
    mlp: str = "swiglu"
    mlp_ratio: float = 4.0
    t_scale: bool = True
    init_from_teacher: bool = False
    init_from: str | None = None  # a finished fit run (same phases and blocks) whose weights start this one
    autocast: str | None = None
    image_size: int | None = None
    transform: str = "paper"  # online data: paper | model (the teacher's own processor config; Teacher.eval_transform)
    val_images: int = 128  # whole images held out for validation (fewer, with a warning, for small data sets)
    val_data: str | None = None  # online data: hold out these whole photos (a data spec) instead of val_images
    val_crops: int = 0  # --val-data: N seeded random-resized crops per held-out photo (0: its eval view)
    stats_images: int = 256  # training images for the loss scale, the baselines and (k alone) the phases
    crops: bool = True  # online data: random-resized crops + flips of the training images
    probe_data: str | None = "bundled:digits"
    probe_limit: int = 1000  # labelled training images for the fresh probes
    seed: int = 0
    ckpt_every: int = 25
    val_every: int = 0  # validate on the held-out set every N steps of each work item (0: only at the end)
    limit: int | None = None
    sample: str = "random"  # --limit: a seeded random sample (stratified by class) | sorted: the first N
    sample_seed: int = 1
    workers: int = 2  # online data: image-decoding worker processes (0: in the main process)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False  # torch.compile the surrogate's blocks
    parallel_blocks: bool = False  # torchrun: train the stage-1 blocks at the same time, one rank group per block
    store_cache_gb: float = 6.0  # a store's training rows are cached in RAM (GPU memory on a GPU) up to this size
    store_sampling: str = "rows"  # a store's batch rows: rows (independent) | chunks (whole store chunks: no read
    # amplification when the rows are not cached; raptor.surrogate.batches.StoreBatches)
    log_to: tuple[str, ...] = ("jsonl",)  # live tracking: any of jsonl (always), tensorboard, wandb (raptor.tracking)
    log_every: int = 1  # tensorboard / wandb scalars every N steps (log.jsonl keeps every step: the loss history)

    @classmethod
    def from_recipe(cls, recipe: str = DEFAULT_RECIPE, **settings) -> "FitConfig":
        """The recipe's hyper-parameters, overridden by any of ``settings`` (the other fields as given)."""
        if recipe not in RECIPES:
            raise RaptorError(f"unknown --recipe {recipe!r} (use {', '.join(RECIPES)})")
        return cls(**{**RECIPES[recipe], **settings, "recipe": recipe})

    def recipe_report(self) -> dict:
        """The recipe's name, every resolved hyper-parameter, and those that differ from the recipe's values."""
        ref = RECIPES.get(self.recipe, {})
        used = {f: _plain(getattr(self, f)) for f in RECIPE_FIELDS}
        return {"name": self.recipe, "hyperparameters": used,
                "overridden": {f: {"recipe": _plain(ref.get(f)), "used": v} for f, v in used.items()
                               if _plain(ref.get(f)) != v}}

    def check(self) -> None:
        """Cheap checks of the settings themselves, done before any teacher, data or output is touched. Zero is
        never "unset": a count or size of 0 is refused like any other impossible value."""
        if self.loss not in KINDS:
            raise RaptorError(f"unknown --loss {self.loss!r} (use {', '.join(KINDS)})")
        check_log_to(self.log_to)
        for name in ("stage1_last_weights", "stage2_weights"):  # as --stage1-weights / --stage2-weights check them
            w = getattr(self, name)
            if w is not None and (len(w) != 3 or any(x < 0 for x in w) or not sum(w) > 0):
                raise RaptorError(f"bad {name} {list(w)}: three non-negative numbers cls, registers, patches")
        if "jsonl" not in self.log_to:  # log.jsonl is the run's loss history: always written
            self.log_to = ("jsonl", *self.log_to)
        check_positive(log_every=self.log_every)
        if self.loss_norm not in NORMS:
            raise RaptorError(f"unknown --loss-norm {self.loss_norm!r} (use {', '.join(NORMS)})")
        if self.stage not in ("1", "2", "both"):
            raise RaptorError(f"bad --stage {self.stage!r} (use 1, 2 or both)")
        if self.mlp not in ("swiglu", "gelu"):
            raise RaptorError(f"--mlp must be swiglu or gelu, got {self.mlp!r}")
        if self.init_from is not None and self.init_from_teacher:
            raise RaptorError("--init-from and --init-from-teacher both choose the starting weights: give one")
        if self.data is None and self.store is None:
            raise RaptorError("give --data (online teacher) or --store")
        self.phase_spec.check_request()
        if self.recipe not in RECIPES:
            raise RaptorError(f"unknown --recipe {self.recipe!r} (use {', '.join(RECIPES)})")
        self.phase_spec.check_method()
        check_sample_order(self.sample)
        check_positive(batch_size=self.batch_size, val_images=self.val_images, stats_images=self.stats_images,
                       probe_limit=self.probe_limit, limit=self.limit, image_size=self.image_size, k=self.k,
                       ckpt_every=self.ckpt_every)
        if self.stage in ("1", "both"):
            check_positive(steps1=self.steps1)
        if self.stage in ("2", "both"):
            check_positive(steps2=self.steps2)
        for name in ("lr", "lr2", "clip", "mlp_ratio", "tf_anneal_frac"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise RaptorError(f"--{name.replace('_', '-')} must be > 0, got {v}")
        for name in ("weight_decay", "sigma", "min_lr", "val_every", "warmup_frac", "workers", "store_cache_gb",
                     "image_loss"):
            v = getattr(self, name)
            if not v >= 0:
                raise RaptorError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if self.store_sampling not in ("rows", "chunks"):
            raise RaptorError(f"unknown --store-sampling {self.store_sampling!r} (use rows or chunks)")
        if self.store_sampling != "rows" and not self.store:
            raise RaptorError("--store-sampling chunks draws store chunks: use it with --store")
        if not 0 <= self.val_crops <= 1000:
            raise RaptorError(f"--val-crops must lie in 0..1000, got {self.val_crops}")
        if self.val_crops and not self.val_data:
            raise RaptorError("--val-crops needs --val-data (crops of whole held-out photos)")
        if self.val_data and self.store:
            raise RaptorError("--val-data holds out photos of online data: use it with --data, not --store")
        check_transform(self.transform)
        if self.store and self.transform != "paper":
            raise RaptorError("--transform is for online data (--data); a --store keeps the transform it was "
                              "extracted with")
        self.phase_spec.check_layers()
        check_autocast(self.autocast)
        if self.autocast in ("float16", "fp16"):
            raise RaptorError("fit --autocast float16 is refused: without loss scaling the fp16 gradients of the "
                              "blocks' branch weights flush to zero (LayerScale starts at 1e-5), so only LayerScale "
                              "and the depth gates would train; use --autocast bfloat16")

    @property
    def phase_spec(self) -> PhaseSpec:
        """The phases asked for (``phases``, ``phases_file``, ``k`` and ``phase_method`` together)."""
        return PhaseSpec.of(self)

    def training_fingerprint(self) -> str:
        """Everything that changes the training trajectory (not the output dir, checkpointing or evaluation-only
        settings: a finished run can be re-evaluated with ``--resume`` and other probe settings)."""
        d = {k: v for k, v in to_dict(self).items() if k not in EVAL_ONLY}
        for name, default in NEW_DEFAULTS.items():  # settings added later: runs started before them resume
            if d.get(name) == default:
                del d[name]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


EVAL_ONLY = ("out", "probe_data", "probe_limit", "val_every", "ckpt_every",
             "workers", "device", "compile", "store_cache_gb", "log_to", "log_every",  # none of these changes the
             # training trajectory
             # (the device's kind does with --sigma > 0: checked on resume by check_noise_device)
             "recipe")  # a label: the hyper-parameters it resolved to are fingerprinted themselves


NEW_DEFAULTS = {"phase_method": "dp", "sample": "random", "sample_seed": 1, "val_data": None, "val_crops": 0,
                "image_loss": 0.0, "teacher_forcing_only": False, "transform": "paper", "store_sampling": "rows"}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def warmup_cosine(step: int, total: int, warm: int, peak: float, floor: float = 0.0) -> float:
    """Linear warm-up over ``warm`` steps to ``peak``, then cosine decay to ``floor`` at step ``total``."""
    if step < warm:
        return peak * (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, p)))


def lr_at(step: int, total: int, cfg: FitConfig, stage: int = 1) -> float:
    peak = cfg.lr2 if (stage == 2 and cfg.lr2 is not None) else cfg.lr
    return warmup_cosine(step, total, max(1, int(round(cfg.warmup_frac * total))), peak, cfg.min_lr)
