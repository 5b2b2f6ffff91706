"""Two-stage Raptor training (docs/method.md §5), from a trajectory store or an online teacher.

Stage 1 trains each phase block alone on its teacher segment (start -> end) with the teacher-forcing ->
autoregressive anneal: loss = r * L_TF + (1 - r) * L_AR, r = max(0, 1 - step / (anneal_frac * steps)). L_TF feeds
every teacher layer start..end-1 and predicts the next one; L_AR rolls out from the teacher's start layer on the
block's own predictions (mean over steps). Stage 2 trains the joint model autoregressively from layer 0 to L.
Default group weights follow the released runs: stage 1 unweighted, with cls/registers/patches weights
0.34/0.33/0.33 on the last segment; stage 2 weighted 0.45/0.10/0.45. By default (``loss_norm="layer"``) every
target layer's (group's) squared error is divided by its variance on the training set (docs/surrogate.md shows why:
the paper's unnormalised MSE is dominated 100-1000x by the last layers of the bundled teacher); ``"none"`` is the
paper's loss. AdamW, linear warm-up then cosine decay, gradient clipping.

Every batch is drawn from a generator seeded by (seed, work item, step), so a run resumed from a checkpoint sees
exactly the batches an uninterrupted run sees and ends with the same weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raptor.config import to_dict
from raptor.data.sampling import check_sample_order
from raptor.errors import RaptorError, check_positive
from raptor.phases import PhaseSpec
from raptor.surrogate.block import BlockConfig
from raptor.surrogate.checkpoint import latest_checkpoint, load_optimizer, read_checkpoint, save_checkpoint
from raptor.surrogate.losses import KINDS, NORMS, image_level_loss, token_loss
from raptor.surrogate.model import RaptorModel, SurrogateConfig
from raptor.teachers.base import autocast_context

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
        from raptor.teachers.base import check_autocast

        if self.loss not in KINDS:
            raise RaptorError(f"unknown --loss {self.loss!r} (use {', '.join(KINDS)})")
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
        self.phase_spec.check()
        if self.recipe not in RECIPES:
            raise RaptorError(f"unknown --recipe {self.recipe!r} (use {', '.join(RECIPES)})")
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
        if not 0 <= self.val_crops <= 1000:
            raise RaptorError(f"--val-crops must lie in 0..1000, got {self.val_crops}")
        if self.val_crops and not self.val_data:
            raise RaptorError("--val-crops needs --val-data (crops of whole held-out photos)")
        if self.val_data and self.store:
            raise RaptorError("--val-data holds out photos of online data: use it with --data, not --store")
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
             "workers", "device", "compile", "store_cache_gb",  # none of these changes the training trajectory
             # (the device's kind does with --sigma > 0: checked on resume by check_noise_device)
             "recipe")  # a label: the hyper-parameters it resolved to are fingerprinted themselves
NEW_DEFAULTS = {"phase_method": "dp", "sample": "random", "sample_seed": 1, "val_data": None, "val_crops": 0,
                "image_loss": 0.0, "teacher_forcing_only": False}


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """Up to k distinct positions in 0..n-1, spread evenly over the range (deterministic)."""
    if n < 1 or k < 1:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(np.int64))


def holdout_split(n: int, val_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(train positions, validation positions) of n items: ``val_images`` whole items spread evenly over the set;
    when the set has fewer than 5 x val_images items, one in five is held out instead (warned)."""
    import warnings

    if val_images < 1:
        raise RaptorError(f"--val-images must be >= 1, got {val_images}")
    n_val = min(val_images, n // 5)
    if n_val < 1:
        raise RaptorError(f"{n} images are too few to hold out whole images for validation (need >= 5)")
    if n_val < val_images:
        warnings.warn(f"only {n_val} of {n} images held out for validation (asked {val_images}): held-out scores "
                      f"on so few images are noisy", UserWarning, stacklevel=2)
    val = evenly_spaced(n, n_val)
    return np.setdiff1d(np.arange(n), val), val


def warmup_cosine(step: int, total: int, warm: int, peak: float, floor: float = 0.0) -> float:
    """Linear warm-up over ``warm`` steps to ``peak``, then cosine decay to ``floor`` at step ``total``."""
    if step < warm:
        return peak * (step + 1) / warm
    p = (step - warm) / max(1, total - warm)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, p)))


def lr_at(step: int, total: int, cfg: FitConfig, stage: int = 1) -> float:
    peak = cfg.lr2 if (stage == 2 and cfg.lr2 is not None) else cfg.lr
    return warmup_cosine(step, total, max(1, int(round(cfg.warmup_frac * total))), peak, cfg.min_lr)


class OnlineBatches:
    """Trajectories computed by the teacher on the fly (no storage), from images streamed through DataLoader worker
    processes (:mod:`raptor.data.stream`): nothing is kept in memory but a few prefetched batches, whatever the
    data set's size, and each step's images are a function of (seed, work item, step) alone. Under torchrun rank
    ``r`` decodes and runs the teacher on its ``batch / world`` share only."""

    def __init__(self, teacher, items, size: int, seed: int, crops: bool, workers: int = 2,
                 device: torch.device | None = None, dist=None, autocast: str | None = None):
        from raptor.data import TrainTransform
        from raptor.distributed import Dist

        self.teacher, self.items, self.seed, self.crops, self.workers = teacher, list(items), seed, crops, workers
        self.device = device or torch.device("cpu")
        self.dist = dist or Dist()
        self.autocast = autocast  # the teacher's forward under the training's autocast, as extract --autocast
        self.train_tf = TrainTransform(size=size, scale=(0.25, 1.0), mean=teacher.image_mean, std=teacher.image_std)
        self.eval_tf = teacher.eval_transform(size)
        self._skipped: set = set()
        if not self.items:
            raise RaptorError("no training images")

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def sample(self, n: int, batch: int = 32):
        """Trajectories (all layers, eval transform) of n training images spread evenly over the set."""
        from raptor.data.stream import ChunkDataset, even_bounds, loader, warn_once

        pick = [self.items[i] for i in evenly_spaced(len(self.items), n)]
        for _, x, _, bad, msgs in loader(ChunkDataset(pick, self.eval_tf, even_bounds(len(pick), batch)),
                                         self.workers, pin_memory=self.device.type == "cuda"):
            warn_once(msgs, self._skipped)
            if x is not None:
                yield self.teacher.trajectory(self._to_device(x), autocast=self.autocast)

    def stream(self, keys: list[tuple[str, int, int, int]], batch: int, share: tuple[int, int] | None = None):
        """The ``share`` = (rank, world) of each (tag, step, first layer, last layer) batch (default: this process's
        rank), in order."""
        from raptor.data.stream import TrainBatchDataset, loader, warn_once

        rank, world = share or (self.dist.rank, self.dist.world)
        ds = TrainBatchDataset(self.items, [(k[0], k[1]) for k in keys], batch, self.seed, self.train_tf,
                               self.eval_tf, self.crops, rank, world)
        for (tag, step, lo, hi), (x, bad) in zip(keys, loader(ds, self.workers,
                                                              pin_memory=self.device.type == "cuda")):
            warn_once(bad, self._skipped)
            yield self.teacher.trajectory(self._to_device(x), range(lo, hi + 1), autocast=self.autocast)


def step_generator(seed: int, device: torch.device) -> torch.Generator:
    """The generator of one training step's input noise: on the GPU when training runs there (the noise is then
    drawn by a kernel), else on the CPU (also for the ``meta`` device of the tests)."""
    return torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the CPU) on ``device`` without a host sync: a pageable tensor is pinned first, since a copy from
    pageable memory to a GPU waits for the GPU (``cudaStreamSynchronize``)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def training_bytes(rows: int, depth: int, n_tokens: int, dim: int, blocks: int, autocast: str | None) -> int:
    """An upper estimate of one rank's GPU memory for training: the teacher layers of a batch share (fp32), the
    activations stage 2 keeps for the backward pass (``depth`` block applications of ``rows`` images: LayerNorm,
    qkv, attention output, the 4x MLP and the attention weights of ``dim // 64`` heads, in the autocast dtype, the
    residual stream in fp32) and ``blocks`` blocks' weights, gradients and AdamW moments, plus a quarter for
    allocator slack."""
    act = 2 if autocast in ("bfloat16", "float16") else 4
    heads = max(1, dim // 64)
    per_block = n_tokens * (10 * dim + 8 * dim) * act + heads * n_tokens ** 2 * act + 2 * n_tokens * dim * 4
    targets = (depth + 1) * n_tokens * dim * 4
    params = blocks * 13 * dim * dim * 4 * 4
    return int(1.25 * (rows * (depth * per_block + targets) + params))


def cache_placement(need: int, free: int, working: int, headroom: float = 0.9) -> str:
    """Where a store cache of ``need`` bytes goes on a GPU with ``free`` bytes free (after ``empty_cache``) and
    training that needs ``working`` bytes (:func:`training_bytes`): ``"device"`` (batches are gathered on the GPU)
    when both fit in ``headroom`` of the free memory, else ``"host"`` (RAM, copied per batch through a pinned
    buffer)."""
    return "device" if need + working <= headroom * free else "host"


class PinnedStaging:
    """Two reusable page-locked buffers for host-to-GPU batch copies: a batch is gathered straight into one
    (``index_select(out=...)``), copied with ``non_blocking=True`` (asynchronous because the source is pinned),
    and that buffer is reused two batches later, after the CUDA event recorded behind its copy. Pinning only these
    buffers (not the whole cache) also avoids the pinned allocator's rounding of a large cache up to a power of
    two. ``pin=False`` (CPU tests): the same gathers into ordinary buffers, no events."""

    def __init__(self, pin: bool = True, n: int = 2):
        self.pin, self.n, self.turn = pin, n, 0
        self.buffers: list[torch.Tensor | None] = [None] * n
        self.events: list = [None] * n

    def copy(self, src: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``src[idx]`` (rows of a CPU tensor, ``idx`` a CPU index tensor) on ``device``."""
        k = self.turn
        self.turn = (k + 1) % self.n
        numel = len(idx) * math.prod(src.shape[1:])
        if self.events[k] is not None:
            self.events[k].synchronize()  # the copy that last read this buffer has finished
        buf = self.buffers[k]
        if buf is None or buf.numel() < numel or buf.dtype != src.dtype:
            buf = torch.empty(numel, dtype=src.dtype, pin_memory=self.pin)
            self.buffers[k] = buf
        out = buf[:numel].view((len(idx),) + tuple(src.shape[1:]))
        torch.index_select(src, 0, idx, out=out)
        moved = out.to(device, non_blocking=True)
        if moved.data_ptr() == out.data_ptr():  # same device: never hand out the reused buffer itself
            moved = moved.clone()
        if self.pin and device.type == "cuda":
            self.events[k] = torch.cuda.Event()
            self.events[k].record()  # behind the copy on the current stream
        return moved


class StoreBatches:
    """Training batches from a trajectory store. Random rows are scattered over many chunks (a batch of 32 touches
    ~32 chunks per layer), so when the training rows fit in ``cache_bytes`` they are read once, in order, and kept
    in memory in the store's own precision (bf16 stays bf16: lossless); reads then cost nothing. On a GPU the
    cache moves to GPU memory when it fits in half of what is free (the GPU-side reader: a batch is a gather on
    the device), else it is pinned for asynchronous copies. Under torchrun rank ``r`` reads its share of each
    step's rows."""

    def __init__(self, store, rows: np.ndarray, seed: int, cache_bytes: float = 6e9, progress: bool = False,
                 device: torch.device | None = None, dist=None, working_bytes: int = 0):
        from raptor.distributed import Dist

        self.store, self.rows, self.seed = store, np.asarray(rows), seed
        self.device = device or torch.device("cpu")
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" and "cuda:0" must compare equal
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dist = dist or Dist()
        self.cache = None
        self._staging: PinnedStaging | None = None
        T, D = store.layout.n_tokens, store.array.shape[-1]
        keep = torch.bfloat16 if store.dtype == "bfloat16" else torch.float16 if store.dtype == "float16" \
            else torch.float32
        need = len(self.rows) * len(store.layers) * T * D * torch.finfo(keep).bits // 8
        if need <= cache_bytes:
            from raptor.progress import progress_bar

            order = np.argsort(self.rows)
            self.cache = torch.empty((len(self.rows), len(store.layers), T, D), dtype=keep)
            step = max(1, store.chunk_images)
            with progress_bar(len(self.rows), "cache training rows", "img", enabled=progress) as bar:
                for s in range(0, len(order), step):
                    pos = order[s:s + step]
                    self.cache[torch.from_numpy(pos)] = store.read(self.rows[pos]).to(keep)
                    bar.advance(len(pos))
            self._pos = {int(r): i for i, r in enumerate(self.rows)}
            if self.device.type != "cpu":
                place = "host"
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()  # PyTorch's cached free blocks count as free here
                    place = cache_placement(need, torch.cuda.mem_get_info(self.device)[0], working_bytes)
                if place == "device":
                    self.cache = self.cache.to(self.device)
                else:  # pageable in RAM; each batch is gathered into a small pinned buffer, copied asynchronously
                    self._staging = PinnedStaging(pin=self.device.type == "cuda")

    def read(self, rows: np.ndarray, lo: int, hi: int) -> torch.Tensor:
        """float32 (rows, hi-lo+1, T, D) of training rows (from the in-memory cache when there is one), on the
        training device."""
        if self.cache is None:
            return to_device(self.store.read(rows, layers=(lo, hi)), self.device)
        p0, p1 = self.store.layer_positions((lo, hi))
        idx = torch.tensor([self._pos[int(r)] for r in rows])
        if self.cache.device == self.device:  # the cache on the training device (CPU, or the GPU-side reader)
            return self.cache[to_device(idx, self.device), p0:p1].float()
        return self._staging.copy(self.cache[:, p0:p1], idx, self.device).float()

    def sample(self, n: int, batch: int = 32):
        pick = self.rows[evenly_spaced(len(self.rows), n)]
        for s in range(0, len(pick), batch):
            yield self.read(np.sort(pick[s:s + batch]), self.store.layers[0], self.store.layers[-1])

    def get(self, tag: str, step: int, batch: int, lo: int, hi: int,
            share: tuple[int, int] | None = None) -> torch.Tensor:
        """The ``share`` = (rank, world) of the batch of (tag, step) (default: this process's rank): the rows are
        drawn from (seed, tag, step) alone."""
        from raptor.data.stream import key_rng
        from raptor.distributed import rows_per_rank

        rank, world = share or (self.dist.rank, self.dist.world)
        n = rows_per_rank(batch, world)
        rng = key_rng(self.seed, tag, step)
        pick = np.array([self.rows[rng.randrange(len(self.rows))] for _ in range(batch)])
        pick = pick[rank * n:(rank + 1) * n]  # in draw order: the input noise follows the rows
        uniq, inv = np.unique(pick, return_inverse=True)
        return self.read(uniq, lo, hi)[to_device(torch.from_numpy(inv), self.device)]

    def stream(self, keys: list[tuple[str, int, int, int]], batch: int, share: tuple[int, int] | None = None):
        """The batches of ``keys`` in order; from disk (no cache) they are read two steps ahead in a thread, so
        decompression overlaps training."""
        from raptor.store import prefetched

        gen = (self.get(tag, step, batch, lo, hi, share) for tag, step, lo, hi in keys)
        return gen if self.cache is not None else prefetched(gen, 2, "raptor-store-prefetch")


@dataclass
class WorkItem:
    name: str  # "stage1/block0" | "stage2"
    stage: int
    block: int | None
    start: int
    end: int
    steps: int
    weights: tuple | None
    layers: tuple | None = None  # stage 1, non-contiguous phase: the block's own layers in start+1..end


@dataclass
class FitState:
    item: int = 0
    step: int = 0
    history: dict = field(default_factory=dict)  # item name -> list of [step, loss, lr]
    # training seconds of the run so far: the earlier processes' (up to the checkpoint resumed from) plus this one's,
    # so an interrupted and resumed run records about what an uninterrupted one would
    train_seconds: float = 0.0


def plan(cfg: FitConfig, model: RaptorModel) -> list[WorkItem]:
    items: list[WorkItem] = []
    segs = model.cfg.segments
    if cfg.stage in ("1", "both"):
        for b, ((s, e), p) in enumerate(zip(segs, model.cfg.phases)):
            w = cfg.stage1_last_weights if model.depth in p else None  # the block that produces the last layer
            own = None if p == list(range(s + 1, e + 1)) else tuple(p)
            items.append(WorkItem(f"stage1/block{b}", 1, b, s, e, cfg.steps1, w, own))
    if cfg.stage in ("2", "both"):
        items.append(WorkItem("stage2", 2, None, 0, model.depth, cfg.steps2, cfg.stage2_weights))
    if not items:
        raise RaptorError(f"bad --stage {cfg.stage!r} (use 1, 2 or both)")
    return items


def compute_stats(data, layout, n_images: int, progress: bool = True, on_batch=None):
    """Training-set statistics (loss scale, baselines) from ``data.sample``: deterministic, so a resumed run
    recomputes exactly the same values. ``on_batch(traj)``: also called with every batch (one pass, two uses)."""
    from raptor.progress import progress_bar
    from raptor.surrogate.stats import TrajectoryStats

    acc = None
    with progress_bar(n_images, "training-set statistics", "img", enabled=progress) as bar:
        for traj in data.sample(n_images):
            if acc is None:
                acc = TrajectoryStats(traj.shape[1], traj.shape[2], traj.shape[3], layout)
            acc.update(traj.cpu())
            if on_batch is not None:
                on_batch(traj.cpu())
            bar.advance(len(traj))
    return acc.result()


def item_loss(model: RaptorModel, item: WorkItem, traj: torch.Tensor, step: int, cfg: FitConfig, layout,
              gen: torch.Generator, stats=None, share: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """traj: (B, end-start+1, T, D) teacher layers start..end. ``stats``: per-layer scales (normalised loss).
    ``share`` = (rank, world) when ``traj`` is one rank's share of the step's batch (the noise follows it)."""
    from raptor.surrogate.model import share_noise

    n = item.end - item.start

    def tl(pred, i):  # loss against teacher layer item.start + i
        scale = stats.scale(item.start + i) if (stats is not None and cfg.loss_norm == "layer") else None
        loss = token_loss(pred, traj[:, i], cfg.loss, layout, item.weights, scale)
        if cfg.image_loss > 0 and len(pred) > 1:
            loss = loss + cfg.image_loss * image_level_loss(pred, traj[:, i], layout)
        return loss

    if item.stage == 2:
        outs = model(traj[:, 0], item.start, item.end, noise=cfg.sigma, generator=gen, share=share)
        return sum(tl(o, i + 1) for i, o in enumerate(outs)) / n
    blk = model.blocks[item.block]
    # a non-contiguous phase: the block is trained only on its own layers; in the rollout, every stretch of them
    # (a run) starts from the teacher's layer before it, as stage 1 of a contiguous phase starts from its entry
    own = [i for i in range(n) if item.layers is None or item.start + i + 1 in item.layers]
    r = 1.0 if cfg.teacher_forcing_only else max(0.0, 1.0 - step / max(1e-9, cfg.tf_anneal_frac * item.steps))
    loss = traj.new_zeros(())
    if r > 0:  # teacher forcing: every teacher layer predicts the next
        tf = 0
        for i in own:
            x = traj[:, i]
            if cfg.sigma > 0:
                x = x + cfg.sigma * share_noise(x, gen, share, torch.float32)
            tf = tf + tl(blk(x, model.t(item.start + i + 1)), i + 1)
        loss = loss + r * tf / len(own)
    if r < 1:  # autoregressive rollout on the block's own predictions
        x, ar = traj[:, 0], 0
        for i in range(n):
            if item.layers is not None and item.start + i + 1 not in item.layers:
                x = traj[:, i + 1]  # another block's layer: the next run starts from the teacher
                continue
            if cfg.sigma > 0:
                x = x + cfg.sigma * share_noise(x, gen, share, torch.float32)
            x = blk(x, model.t(item.start + i + 1))
            ar = ar + tl(x, i + 1)
        loss = loss + (1 - r) * ar / len(own)
    return loss


def build_model(cfg: FitConfig, teacher_desc: dict, teacher=None, phases: list[list[int]] | None = None
                ) -> RaptorModel:
    """The surrogate of ``cfg``; ``phases``: found from the data (``k`` alone), else taken from ``cfg``."""
    phases = cfg.phase_spec.resolve(int(teacher_desc["depth"]), None if phases is None else lambda k: phases)
    if cfg.mlp not in ("swiglu", "gelu"):
        raise RaptorError(f"--mlp must be swiglu or gelu, got {cfg.mlp!r}")
    dim = int(teacher_desc["dim"])
    bc = BlockConfig(dim=dim, num_heads=max(1, dim // 64), mlp_ratio=cfg.mlp_ratio, swiglu=cfg.mlp == "swiglu",
                     t_scale=cfg.t_scale)
    torch.manual_seed(cfg.seed)
    model = RaptorModel(SurrogateConfig(phases, bc))
    if cfg.init_from_teacher:
        from raptor.surrogate.model import init_from_teacher

        if teacher is None:
            raise RaptorError("--init-from-teacher needs the teacher")
        init_from_teacher(model, teacher)
    if cfg.init_from is not None:
        from raptor.surrogate.model import init_from_run

        init_from_run(model, cfg.init_from)
    return model


def check_existing_run(cfg: FitConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run). Refuses a run directory that already holds a run
    unless ``resume``, and a resume with other training settings -- naming them -- before anything is written."""
    out = Path(cfg.out)
    ck = latest_checkpoint(out / "checkpoints")
    blocks = block_checkpoints(out)
    if ck is None and not blocks:
        if (out / "metrics.json").exists():
            raise RaptorError(f"{out} holds a finished run whose checkpoints are gone; choose another --out")
        return None
    if ck is None:  # stage 1 in parallel (--parallel-blocks) was under way: per-block checkpoints only
        ck = next(iter(blocks.values()))
        top = None
    else:
        top = ck
    if not resume:
        raise RaptorError(f"{out} already holds a run (checkpoint {ck.name}); pass --resume to continue it "
                          f"or choose another --out")
    try:
        st = json.loads((ck / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise RaptorError(f"cannot read checkpoint {ck}: {e}") from None
    if st.get("fingerprint") != cfg.training_fingerprint():
        diff = ""
        try:
            import yaml

            old = yaml.safe_load((out / "config.yaml").read_text()) or {}
            new = json.loads(json.dumps(to_dict(cfg)))  # tuples as lists, as the YAML holds them
            keys = [k for k in new if k not in EVAL_ONLY and old.get(k) != new[k]]
            diff = ": " + ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in keys) if keys else ""
        except (OSError, ValueError, ImportError, AttributeError):
            pass
        raise RaptorError(f"cannot resume {out}: it was started with other settings{diff}")
    return top


def block_checkpoints(out: Path) -> dict[int, Path]:
    """Block -> latest checkpoint of a stage-1 block trained in parallel (``checkpoints/block<b>/``)."""
    found = {}
    for d in sorted((Path(out) / "checkpoints").glob("block*")):
        ck = latest_checkpoint(d) if d.is_dir() and d.name[5:].isdigit() else None
        if ck is not None:
            found[int(d.name[5:])] = ck
    return found


class _ItemObjective(torch.nn.Module):
    """The loss of one work item as a module whose parameters are exactly the trained ones (one block in stage 1,
    the whole surrogate in stage 2): what ``DistributedDataParallel`` wraps to average their gradients."""

    def __init__(self, model: RaptorModel, item: WorkItem):
        super().__init__()
        self.trained = model.blocks[item.block] if item.stage == 1 else model
        self._ctx = (model, item)  # a tuple: not registered, so DDP sees only the trained parameters

    def forward(self, traj, step, cfg, layout, gen, stats, share):
        model, item = self._ctx
        return item_loss(model, item, traj, step, cfg, layout, gen, stats, share)


def train(cfg: FitConfig, model: RaptorModel, data, layout, *, resume: bool, progress: bool = True,
          on_step=None, validate_fn=None, stats=None, dist=None, device: torch.device | None = None) -> FitState:
    """Run (or resume) every work item; checkpoints under OUT/checkpoints. Under torchrun (``dist.active``) every
    rank trains on its share of each step's batch with ``DistributedDataParallel``; the logged loss is the mean
    over ranks (= the whole batch's loss), and rank 0 alone writes checkpoints and validates. With
    ``cfg.parallel_blocks`` the stage-1 blocks train at the same time, one rank group per block
    (:func:`_parallel_stage1`), then every rank joins stage 2."""
    from raptor.distributed import Dist, rows_per_rank

    cfg.check()
    dist = dist or Dist()
    device = device or torch.device("cpu")
    rows_per_rank(cfg.batch_size, dist.world)
    if cfg.loss_norm == "layer" and stats is None:
        raise RaptorError("the normalised loss needs training-set statistics")
    items = plan(cfg, model)
    state, before = FitState(), 0.0
    t_start = time.perf_counter()

    def clock() -> float:  # the run's training seconds now, kept in the state and written into each checkpoint
        state.train_seconds = round(before + time.perf_counter() - t_start, 3)
        return state.train_seconds
    opt_tensors = opt_meta = None
    err = ck = None
    try:
        ck = check_existing_run(cfg, resume)
    except RaptorError as e:
        err = e
    # every rank has read the run directory before any rank writes to it (a group leader checkpoints its block)
    if not dist.all_ok(err is None):
        raise err or RaptorError("another rank refused the run directory (its error line says why)")
    if ck is not None:
        weights, opt_tensors, st = read_checkpoint(ck)
        _load_weights(model, weights, ck)
        try:  # train_seconds: 0 in checkpoints written before it was recorded
            before = float(st.get("train_seconds", 0.0))
            state = FitState(int(st["item"]), int(st["step"]), dict(st["history"]), before)
        except (KeyError, TypeError, ValueError) as e:
            raise RaptorError(f"checkpoint {ck} is damaged: state.json ({type(e).__name__}: {str(e)[:80]}); delete "
                              "the run or restore it") from None
        # a resume of a finished run (a re-evaluation) trains nothing and keeps exactly the recorded time
        opt_meta = st["optimizer"]
        check_noise_device(cfg, st, device, state.item < len(items))
    model.to(device)
    n1 = sum(1 for it in items if it.stage == 1)
    if cfg.parallel_blocks and n1 > 1 and state.item < n1:
        _parallel_stage1(cfg, model, items[:n1], data, layout, stats, dist, device, state, progress, on_step,
                         clock)
        opt_tensors = None
    run = _ItemRunner(cfg, model, layout, stats, device, progress and dist.main, on_step)
    keys = [(items[i].name, s, items[i].start, items[i].end) for i in range(state.item, len(items))
            for s in range(state.step if i == state.item else 0, items[i].steps)]
    batches = data.stream(keys, cfg.batch_size, (dist.rank, dist.world))
    for it_idx in range(state.item, len(items)):
        start = state.step if it_idx == state.item else 0
        resume_opt = (opt_tensors, opt_meta) if (opt_tensors is not None and it_idx == state.item) else None
        opt_tensors = None

        def checkpoint(done, opt, item=items[it_idx], it_idx=it_idx):
            seconds = clock()  # the last step's checkpoint sets the run's final time
            if dist.main:
                nxt = (it_idx, done) if done < item.steps else (it_idx + 1, 0)
                _save_progress(cfg, model, opt if done < item.steps else None, f"item{it_idx}-step{done:07d}", *nxt,
                               state.history, seconds, device)

        def val(done, item=items[it_idx]):
            if validate_fn is not None and cfg.val_every and done % cfg.val_every == 0:
                if dist.main:
                    model.eval()
                    state.history.setdefault(f"val/{item.name}", []).append([done, validate_fn(model)])
                    model.train()
                dist.wait_all()  # the other ranks wait on the CPU side group, not in the next step's all_reduce

        run(items[it_idx], it_idx, start, batches, state.history.setdefault(items[it_idx].name, []),
            (None, dist.rank, dist.world), resume_opt, checkpoint, val)
    state.item, state.step = len(items), 0
    return state


def _load_weights(module: torch.nn.Module, weights: dict, ck: Path) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        raise RaptorError(f"checkpoint {ck} does not fit this model ({str(e).splitlines()[0][:160]})") from None


class _ItemRunner:
    """The step loop of one work item: learning rate, loss (DDP over the ranks of ``group`` = (process group or
    None for all ranks, this rank's index in it, its size)), the whole batch's loss logged, NaN stop, gradient
    clipping, AdamW; ``checkpoint(done, opt)`` and ``val(done)`` after each step."""

    def __init__(self, cfg, model, layout, stats, device, progress, on_step, read_every: int | None = None):
        self.cfg, self.model, self.layout, self.stats = cfg, model, layout, stats
        self.device, self.progress, self.on_step = device, progress, on_step
        # losses are read back every step on the CPU (free there), every 32 steps on a GPU (a host sync each)
        self.read_every = read_every or (1 if device.type == "cpu" else 32)

    def __call__(self, item: WorkItem, it_idx: int, start: int, batches, hist: list, group, resume_opt,
                 checkpoint, val) -> None:
        from raptor.progress import progress_bar

        cfg, model, device = self.cfg, self.model, self.device
        pg, rank, world = group
        objective = _ItemObjective(model, item)
        params = list(objective.parameters())
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            objective = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda"
                                                else None, process_group=pg)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if resume_opt is not None and resume_opt[0]:
            load_optimizer(opt, *resume_opt)
        model.train()
        with progress_bar(item.steps, item.name, "step", enabled=self.progress,
                          extra="loss {task.fields[loss]}") as bar:
            bar.advance(start, loss="-")
            pending: list = []  # (step, loss on the device, lr) not yet read back
            for step in range(start, item.steps):
                lr = lr_at(step, item.steps, cfg, item.stage)
                for g in opt.param_groups:
                    g["lr"] = lr
                traj = next(batches)
                gen = step_generator(cfg.seed * 1_000_003 + it_idx * 10_007 + step, device)
                with autocast_context(cfg.autocast, device):
                    loss = objective(traj, step, cfg, self.layout, gen, self.stats, (rank, world))
                if self.on_step is not None:
                    loss = self.on_step(item, step, loss)
                value = loss.detach().float()
                if world > 1:  # the whole batch's loss: the mean of the ranks' equal shares
                    value = value.clone()
                    torch.distributed.all_reduce(value, group=pg)
                    value /= world
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                opt.step()
                pending.append((step, value, lr))
                done = step + 1
                due_val = cfg.val_every and done % cfg.val_every == 0
                due_ckpt = done % cfg.ckpt_every == 0 or done == item.steps
                if len(pending) >= self.read_every or due_val or due_ckpt:
                    self._read_losses(pending, hist, bar, item, cfg)  # checks them before anything is saved
                val(done)
                if due_ckpt:
                    checkpoint(done, opt)
        model.eval()

    def _read_losses(self, pending: list, hist: list, bar, item: WorkItem, cfg) -> None:
        """The losses of the steps since the last read, in one device-to-host copy (a host sync per
        ``read_every`` steps, not per step); a non-finite one stops the run before its weights are saved."""
        values = torch.stack([v for _, v, _ in pending]).tolist()
        for (step, _, lr), value in zip(pending, values):
            if not math.isfinite(value):
                last = latest_checkpoint(Path(cfg.out) / "checkpoints")
                raise RaptorError(f"loss became {value} at {item.name} step {step}; stopped. Last good "
                                  f"checkpoint: {last or 'none'} (lower --lr or use --autocast none)")
            hist.append([step, value, lr])
        bar.advance(len(pending), loss=f"{values[-1]:.4g}")
        pending.clear()


def _parallel_stage1(cfg: FitConfig, model: RaptorModel, items: list[WorkItem], data, layout, stats, dist, device,
                     state: FitState, progress: bool, on_step, clock) -> None:
    """Stage 1 with the blocks trained at the same time: ``G = min(k, world)`` rank groups (rank r in group
    r % G), group g trains blocks g, g+G, ... (DDP within the group). Each block's batches are drawn from
    (seed, its work item, step) as in a sequential run, so the result is the same up to float rounding. Each
    group's first rank checkpoints its block under ``checkpoints/block<b>/``; a resumed run (any world size) skips
    finished blocks and continues unfinished ones. At the end every rank receives every block, rank 0 writes the
    ordinary checkpoint at the start of stage 2, and the block checkpoints are removed with it."""
    from raptor.distributed import block_groups

    members = block_groups(len(items), dist.world)
    n_groups = len(members)
    # every rank creates every group, in the same order
    handles = [torch.distributed.new_group(m) for m in members] if dist.active else [None]
    g = dist.rank % n_groups
    group = (handles[g], members[g].index(dist.rank), len(members[g]))
    leader = group[1] == 0
    found = block_checkpoints(Path(cfg.out))
    run = _ItemRunner(cfg, model, layout, stats, device, progress and leader, on_step)
    for it_idx in range(g, len(items), n_groups):
        item = items[it_idx]
        hist: list = []
        start, resume_opt = 0, None
        if item.block in found:
            weights, opt_tensors, st = read_checkpoint(found[item.block])
            _load_weights(model.blocks[item.block], weights, found[item.block])  # copied into the device's weights
            start, hist, resume_opt = st["step"], st["history"][item.name], (opt_tensors, st["optimizer"])
        root = Path(cfg.out) / "checkpoints" / f"block{item.block}"

        def checkpoint(done, opt, item=item, hist=hist, root=root):
            if leader:
                save_checkpoint(root, f"step{done:07d}", model.blocks[item.block],
                                opt if done < item.steps else None,
                                {"item": None, "step": done, "history": {item.name: hist},
                                 "fingerprint": cfg.training_fingerprint(), "block": item.block})

        if start < item.steps:
            keys = [(item.name, s, item.start, item.end) for s in range(start, item.steps)]
            run(item, it_idx, start, data.stream(keys, cfg.batch_size, group[1:]), hist, group, resume_opt,
                checkpoint, lambda done: None)
        state.history[item.name] = hist
    dist.wait_all()  # groups of unequal work finish hours apart: a wait beyond the NCCL watchdog's 30 minutes
    for it_idx, item in enumerate(items):  # every block from its group's first rank to every rank
        src = members[it_idx % n_groups][0]
        if dist.active:
            for p in model.blocks[item.block].parameters():
                torch.distributed.broadcast(p.data, src=src)
        state.history[item.name] = dist.broadcast(state.history.get(item.name), src)
    state.item, state.step = len(items), 0
    seconds = clock()
    if dist.main:
        _save_progress(cfg, model, None, f"item{len(items)}-step0000000", state.item, 0, state.history, seconds,
                       device)
    dist.barrier()


def noise_device_type(device: torch.device) -> str:
    """The kind of device whose generator draws a step's input noise (:func:`step_generator`)."""
    return step_generator(0, device).device.type


def check_noise_device(cfg: FitConfig, state: dict, device: torch.device, training_left: bool) -> None:
    """With ``--sigma > 0`` the input noise is drawn on the training device's generator, and a CUDA generator's
    numbers differ from the CPU's: a run resumed on the other kind of device would continue on a different noise
    stream, so it is refused (checkpoints from before the noise moved to the device drew it on the CPU)."""
    if cfg.sigma > 0 and training_left:
        was, now = state.get("noise_device", "cpu"), noise_device_type(device)
        if was != now:
            raise RaptorError(f"this run's input noise (--sigma {cfg.sigma}) was drawn on the {was} and this "
                              f"process would draw it on the {now}: resume it with --device {was} (or start a new "
                              f"run)")


def _save_progress(cfg: FitConfig, model: RaptorModel, opt, name: str, item: int, step: int, history: dict,
                   train_seconds: float, device: torch.device | None = None) -> None:
    """The run's checkpoint ``name``: training resumes at work item ``item``, step ``step``."""
    save_checkpoint(Path(cfg.out) / "checkpoints", name, model, opt,
                    {"item": item, "step": step, "history": history, "fingerprint": cfg.training_fingerprint(),
                     "train_seconds": train_seconds,
                     "noise_device": noise_device_type(device or torch.device("cpu")),
                     "surrogate": model.cfg.to_dict()})
