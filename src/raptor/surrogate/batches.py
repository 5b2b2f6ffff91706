"""What a fit trains on: the hold-out of whole images, and the batches of teacher trajectories — from an online
teacher (:class:`OnlineBatches`) or a trajectory store (:class:`StoreBatches`, cached in RAM or GPU memory when it
fits) — each drawn from a generator seeded by (seed, work item, step) so that a resumed run sees the same batches."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from raptor.data import TrainTransform
from raptor.data.stream import ChunkDataset, TrainBatchDataset, even_bounds, key_rng, loader, prefetched, warn_once
from raptor.distributed import Dist, Share, rows_per_rank
from raptor.errors import RaptorError
from raptor.progress import progress_bar


class BatchKey(NamedTuple):
    """One batch of a fit: work item ``tag`` (e.g. ``stage1/block0``), its ``step``, and the teacher layers
    ``lo..hi`` it needs (the batch's generator is seeded by the fit's seed, the tag and the step)."""

    tag: str
    step: int
    lo: int
    hi: int


STORE_SAMPLING = ("rows", "chunks")


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


class OnlineBatches:
    """Trajectories computed by the teacher on the fly (no storage), from images streamed through DataLoader worker
    processes (:mod:`raptor.data.stream`): nothing is kept in memory but a few prefetched batches, whatever the
    data set's size, and each step's images are a function of (seed, work item, step) alone. Under torchrun rank
    ``r`` decodes and runs the teacher on its ``batch / world`` share only."""

    def __init__(self, teacher, items, eval_tf, seed: int, crops: bool, workers: int = 2,
                 device: torch.device | None = None, dist=None, autocast: str | None = None):
        """``eval_tf``: the eval transform (:meth:`Teacher.eval_transform`; a crop size: the paper's at that size);
        the training crops take its size, mean and std."""
        if isinstance(eval_tf, int):
            eval_tf = teacher.eval_transform(eval_tf)
        self.teacher, self.items, self.seed, self.crops, self.workers = teacher, list(items), seed, crops, workers
        self.device = device or torch.device("cpu")
        self.dist = dist or Dist()
        self.autocast = autocast  # the teacher's forward under the training's autocast, as extract --autocast
        self.train_tf = TrainTransform(size=eval_tf.size, scale=(0.25, 1.0), mean=eval_tf.mean, std=eval_tf.std)
        self.eval_tf = eval_tf
        self._skipped: set = set()
        if not self.items:
            raise RaptorError("no training images")

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def sample(self, n: int, batch: int = 32):
        """Trajectories (all layers, eval transform) of n training images spread evenly over the set."""
        pick = [self.items[i] for i in evenly_spaced(len(self.items), n)]
        for _, x, _, bad, msgs in loader(ChunkDataset(pick, self.eval_tf, even_bounds(len(pick), batch)),
                                         self.workers, pin_memory=self.device.type == "cuda"):
            warn_once(msgs, self._skipped)
            if x is not None:
                yield self.teacher.trajectory(self._to_device(x), autocast=self.autocast)

    def stream(self, keys: list[tuple[str, int, int, int]], batch: int, share: tuple[int, int] | None = None):
        """The ``share`` = (rank, world) of each (tag, step, first layer, last layer) batch (default: this process's
        rank), in order."""
        rank, world = share or Share(self.dist.rank, self.dist.world)
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
    step's rows.

    ``sampling``: how a step's rows are drawn (a function of seed, tag and step either way, whatever the cache):
    ``rows`` draws each row independently from all training rows (with replacement); ``chunks`` draws whole store
    chunks (without replacement) until they hold ``batch`` training rows, then ``batch`` of those rows, so a batch
    read from disk decompresses about one chunk per ``chunk_images`` rows it uses instead of one chunk per row
    (docs/scale.md: at ImageNet scale the rows cannot be cached and ``rows`` reads ~``chunk_images`` x the bytes a
    step uses). ``chunks`` is only for stores written in a shuffled image order, where images that share a chunk
    are as independent as any others: ``extract`` keeps the data set's order (class folders sorted by class)."""

    def __init__(self, store, rows: np.ndarray, seed: int, cache_bytes: float = 6e9, progress: bool = False,
                 device: torch.device | None = None, dist=None, working_bytes: int = 0, sampling: str = "rows"):
        if sampling not in STORE_SAMPLING:
            raise RaptorError(f"unknown --store-sampling {sampling!r} (use {' or '.join(STORE_SAMPLING)})")
        self.store, self.rows, self.seed, self.sampling = store, np.asarray(rows), seed, sampling
        self._chunk_ids: list[int] = []
        self._chunk_rows: dict[int, np.ndarray] = {}
        if sampling == "chunks":  # the chunks holding training rows, and their rows in row order (one sort)
            ids = self.rows // max(1, int(store.chunk_images))
            order = np.argsort(ids, kind="stable")
            keys, starts = np.unique(ids[order], return_index=True)
            for k, part in zip(keys.tolist(), np.split(order, starts[1:])):
                self._chunk_rows[int(k)] = np.sort(self.rows[part])
            self._chunk_ids = [int(k) for k in keys]
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
        rank, world = share or Share(self.dist.rank, self.dist.world)
        n = rows_per_rank(batch, world)
        pick = self.pick(tag, step, batch)
        pick = pick[rank * n:(rank + 1) * n]  # in draw order: the input noise follows the rows
        uniq, inv = np.unique(pick, return_inverse=True)
        return self.read(uniq, lo, hi)[to_device(torch.from_numpy(inv), self.device)]

    def pick(self, tag: str, step: int, batch: int) -> np.ndarray:
        """The store rows of the batch of (tag, step), in draw order (see the class docstring's ``sampling``)."""
        rng = key_rng(self.seed, tag, step)
        if self.sampling == "rows":
            return np.array([self.rows[rng.randrange(len(self.rows))] for _ in range(batch)])
        left, pool = list(self._chunk_ids), []
        while left and len(pool) < batch:  # whole chunks, without replacement, until they hold a batch
            pool.extend(self._chunk_rows[left.pop(rng.randrange(len(left)))].tolist())
        if len(pool) >= batch:
            return np.array(rng.sample(pool, batch))
        return np.array([pool[rng.randrange(len(pool))] for _ in range(batch)])  # fewer training rows than a batch

    def stream(self, keys: list[tuple[str, int, int, int]], batch: int, share: tuple[int, int] | None = None):
        """The batches of ``keys`` in order; from disk (no cache) they are read two steps ahead in a thread, so
        decompression overlaps training."""
        gen = (self.get(tag, step, batch, lo, hi, share) for tag, step, lo, hi in keys)
        return gen if self.cache is not None else prefetched(gen, 2, "raptor-store-prefetch")
