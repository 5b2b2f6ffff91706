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

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from raptor.distributed import Dist, RankGroup, Share, block_groups, rows_per_rank
from raptor.errors import RaptorError
from raptor.phases import validate_phases
from raptor.progress import progress_bar
from raptor.surrogate.batches import BatchKey, step_generator
from raptor.surrogate.block import BlockConfig
from raptor.surrogate.checkpoint import latest_checkpoint, load_optimizer, read_checkpoint
from raptor.surrogate.config import FitConfig, lr_at
from raptor.surrogate.losses import image_level_loss, token_loss
from raptor.surrogate.model import RaptorModel, SurrogateConfig, init_from_teacher, share_noise
from raptor.surrogate.run_dir import (
    BlockProgress,
    RunProgress,
    StepOutputs,
    block_checkpoints,
    check_existing_run,
    check_noise_device,
    global_offsets,
    init_from_run,
    open_tracker,
    save_progress,
)
from raptor.surrogate.stats import TrajectoryStats
from raptor.teachers.base import autocast_context
from raptor.tracking import Tracker


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
    depth = int(teacher_desc["depth"])
    phases = validate_phases(phases, depth) if phases is not None else cfg.phase_spec.resolve(depth)
    if cfg.mlp not in ("swiglu", "gelu"):
        raise RaptorError(f"--mlp must be swiglu or gelu, got {cfg.mlp!r}")
    dim = int(teacher_desc["dim"])
    bc = BlockConfig(dim=dim, num_heads=max(1, dim // 64), mlp_ratio=cfg.mlp_ratio, swiglu=cfg.mlp == "swiglu",
                     t_scale=cfg.t_scale)
    torch.manual_seed(cfg.seed)
    model = RaptorModel(SurrogateConfig(phases, bc))
    if cfg.init_from_teacher:
        if teacher is None:
            raise RaptorError("--init-from-teacher needs the teacher")
        init_from_teacher(model, teacher)
    if cfg.init_from is not None:
        init_from_run(model, cfg.init_from)
    return model


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
            state = FitState(int(st["item"]), int(st["step"]), dict(st.get("history") or {}), before)
        except (KeyError, TypeError, ValueError) as e:
            raise RaptorError(f"checkpoint {ck} is damaged: state.json ({type(e).__name__}: {str(e)[:80]}); delete "
                              "the run or restore it") from None
        # a resume of a finished run (a re-evaluation) trains nothing and keeps exactly the recorded time
        opt_meta = st["optimizer"]
        check_noise_device(cfg, st, device, state.item < len(items))
    tracker = open_tracker(cfg, items, state, st if ck is not None else None) if dist.main else None
    with tracker if tracker is not None else contextlib.nullcontext():  # the logs are closed even on a failure
        model.to(device)
        n1 = sum(1 for it in items if it.stage == 1)
        if cfg.parallel_blocks and n1 > 1 and state.item < n1:
            _parallel_stage1(cfg, model, items[:n1], data, layout, stats, dist, device, state, progress, on_step,
                             clock, tracker)
            opt_tensors = None
        offsets = global_offsets(items)
        loop = StepLoop(cfg, model, layout, stats, device, progress and dist.main, on_step, tracker=tracker,
                        offsets=offsets)
        keys = [BatchKey(items[i].name, s, items[i].start, items[i].end) for i in range(state.item, len(items))
                for s in range(state.step if i == state.item else 0, items[i].steps)]
        batches = data.stream(keys, cfg.batch_size, Share(dist.rank, dist.world))
        for it_idx in range(state.item, len(items)):  # each work item: its steps, then the next item from step 0
            start = state.step if it_idx == state.item else 0
            resume_opt = (opt_tensors, opt_meta) if (opt_tensors is not None and it_idx == state.item) else None
            opt_tensors = None
            outputs = RunProgress(cfg, model, items[it_idx], it_idx, state, dist, device, clock, validate_fn, tracker,
                                  offsets[it_idx])
            loop.run(items[it_idx], it_idx, start, batches, state.history.setdefault(items[it_idx].name, []),
                     RankGroup.of_run(dist), outputs, resume_opt)
    state.item, state.step = len(items), 0
    return state


def _load_weights(module: torch.nn.Module, weights: dict, ck: Path) -> None:
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        raise RaptorError(f"checkpoint {ck} does not fit this model ({str(e).splitlines()[0][:160]})") from None


class StepLoop:
    """The step loop of one work item, top to bottom: learning rate -> batch -> loss -> backward, clip, AdamW ->
    log -> what the step leaves behind. Everything that differs between a plain run, torchrun and parallel
    stage 1 is wrapped around it: ``group`` (a :class:`RankGroup`) wraps the objective in DDP and averages the
    logged loss over its ranks, and ``outputs`` (a :class:`StepOutputs`) writes the validation and checkpoints."""

    def __init__(self, cfg, model, layout, stats, device, progress, on_step, read_every: int | None = None,
                 tracker: Tracker | None = None, offsets: list[int] | None = None):
        self.cfg, self.model, self.layout, self.stats = cfg, model, layout, stats
        self.device, self.progress, self.on_step = device, progress, on_step
        # losses are read back every step on the CPU (free there), every 32 steps on a GPU (a host sync each)
        self.read_every = read_every or (1 if device.type == "cpu" else 32)
        self.tracker, self.offsets = tracker, offsets

    def run(self, item: WorkItem, it_idx: int, start: int, batches, hist: list, group: RankGroup,
            outputs: StepOutputs, resume_opt=None) -> None:
        cfg, model, device = self.cfg, self.model, self.device
        objective = _ItemObjective(model, item)
        params = list(objective.parameters())
        objective = group.wrap(objective, device)
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if resume_opt is not None and resume_opt[0]:
            load_optimizer(opt, *resume_opt)
        model.train()
        self._offset = self.offsets[it_idx] if self.offsets else 0
        self._t_read = time.perf_counter()
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
                    loss = objective(traj, step, cfg, self.layout, gen, self.stats, Share(group.rank, group.world))
                if self.on_step is not None:
                    loss = self.on_step(item, step, loss)
                pending.append((step, group.mean(loss.detach().float()), lr))  # the whole batch's loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, cfg.clip)
                opt.step()
                done = step + 1
                if len(pending) >= self.read_every or outputs.due(done):
                    self._read_losses(pending, hist, bar, item, cfg)  # checks them before anything is saved
                outputs.after_step(done, opt)
        model.eval()

    def _read_losses(self, pending: list, hist: list, bar, item: WorkItem, cfg) -> None:
        """The losses of the steps since the last read, in one device-to-host copy (a host sync per
        ``read_every`` steps, not per step); a non-finite one stops the run before its weights are saved."""
        values = torch.stack([v for _, v, _ in pending]).tolist()
        now = time.perf_counter()
        ips = round(len(pending) * cfg.batch_size / max(now - self._t_read, 1e-9), 2)
        self._t_read = now
        for (step, _, lr), value in zip(pending, values):
            if not math.isfinite(value):
                last = latest_checkpoint(Path(cfg.out) / "checkpoints")
                raise RaptorError(f"loss became {value} at {item.name} step {step}; stopped. Last good "
                                  f"checkpoint: {last or 'none'} (lower --lr or use --autocast none)")
            hist.append([step, value, lr])
            if self.tracker is not None:
                self.tracker.log_step(item.name, step, self._offset + step, value, lr, ips)
        bar.advance(len(pending), loss=f"{values[-1]:.4g}")
        pending.clear()


def _parallel_stage1(cfg: FitConfig, model: RaptorModel, items: list[WorkItem], data, layout, stats, dist, device,
                     state: FitState, progress: bool, on_step, clock, tracker: Tracker | None = None) -> None:
    """Stage 1 with the blocks trained at the same time: ``G = min(k, world)`` rank groups (rank r in group
    r % G), group g trains blocks g, g+G, ... (DDP within the group). Each block's batches are drawn from
    (seed, its work item, step) as in a sequential run, so the result is the same up to float rounding. Each
    group's first rank checkpoints its block under ``checkpoints/block<b>/``; a resumed run (any world size) skips
    finished blocks and continues unfinished ones. At the end every rank receives every block, rank 0 writes the
    ordinary checkpoint at the start of stage 2, and the block checkpoints are removed with it."""
    members = block_groups(len(items), dist.world)
    n_groups = len(members)
    # every rank creates every group, in the same order
    handles = [torch.distributed.new_group(m) for m in members] if dist.active else [None]
    g = dist.rank % n_groups
    group = RankGroup(handles[g], members[g].index(dist.rank), len(members[g]))
    leader = group.rank == 0
    found = block_checkpoints(Path(cfg.out))
    # the blocks' steps reach log.jsonl / TensorBoard / wandb at the end of stage 1, all blocks in global-step order
    # (wandb drops a step lower than one it has seen; the block checkpoints hold their histories meanwhile)
    loop = StepLoop(cfg, model, layout, stats, device, progress and leader, on_step)
    for it_idx in range(g, len(items), n_groups):
        item = items[it_idx]
        hist: list = []
        start, resume_opt = 0, None
        if item.block in found:
            weights, opt_tensors, st = read_checkpoint(found[item.block])
            _load_weights(model.blocks[item.block], weights, found[item.block])  # copied into the device's weights
            start, hist, resume_opt = st["step"], st["history"][item.name], (opt_tensors, st["optimizer"])
        if start < item.steps:
            keys = [BatchKey(item.name, s, item.start, item.end) for s in range(start, item.steps)]
            loop.run(item, it_idx, start, data.stream(keys, cfg.batch_size, Share(group.rank, group.world)), hist,
                     group, BlockProgress(cfg, model, item, hist, leader), resume_opt)
        state.history[item.name] = hist
    dist.wait_all()  # groups of unequal work finish hours apart: a wait beyond the NCCL watchdog's 30 minutes
    for it_idx, item in enumerate(items):  # every block from its group's first rank to every rank
        src = members[it_idx % n_groups][0]
        if dist.active:
            for p in model.blocks[item.block].parameters():
                torch.distributed.broadcast(p.data, src=src)
        state.history[item.name] = dist.broadcast(state.history.get(item.name), src)
    offsets = global_offsets(items)
    for it_idx, item in enumerate(items if tracker is not None else []):
        for s, v, lr in state.history[item.name]:
            tracker.log_step(item.name, s, offsets[it_idx] + s, v, lr, None)
    state.item, state.step = len(items), 0
    seconds = clock()
    if dist.main:
        save_progress(cfg, model, None, f"item{len(items)}-step0000000", state.item, 0, seconds, device,
                      tracker.state() if tracker is not None else None)
    dist.barrier()


