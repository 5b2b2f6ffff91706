"""Multi-process runs under ``torchrun`` (one node or many): the process group, who does what, and the device.

``torchrun --nproc-per-node N raptor extract|fit|probe ...`` starts N copies of the same command; each reads its
rank from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) and
:func:`setup` joins the process group: NCCL when the run is on CUDA, gloo on CPU. A plain ``raptor ...`` (no
torchrun) is a world of one and never touches ``torch.distributed``.

Division of work (every rank runs the same cheap checks first, so a bad argument ends every rank the same way):

- ``extract``: store chunk ``c`` belongs to rank ``c % world``; rank 0 creates (and locks) the store, every rank
  writes its own disjoint chunks, each finished by writing the chunk's own ``valid`` status chunk (so no two ranks
  ever write the same file and there is nothing to merge). A resumed run (any world size) skips every chunk whose
  status is written.
- ``fit``: data-parallel. Every step's global batch is drawn from (seed, work item, step) exactly as in a
  1-process run, rank ``r`` takes its ``batch / world`` share, and ``DistributedDataParallel`` averages the
  gradients, so the update equals the 1-process update on the whole batch (to float rounding). Rank 0 alone writes
  checkpoints, evaluates and writes the results.
- ``probe``: feature passes are sharded by image and gathered on every rank.

Multi-node needs a shared filesystem for ``--out`` / ``--store`` (every rank reads and writes the same paths).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch

from raptor.errors import RaptorError
from raptor.outputs import claim_output


class Share(NamedTuple):
    """Rank ``rank``'s share of a batch ``world`` times larger than its own rows (noise and rows follow it)."""

    rank: int
    world: int


class RankGroup(NamedTuple):
    """The ranks that train one work item together: a process-group handle (None: every rank of the run), this
    rank's index in the group and its size. What makes a step distributed is wrapped around the step loop from
    here: :meth:`wrap` puts ``DistributedDataParallel`` around the objective, :meth:`mean` turns this rank's loss
    into the whole batch's loss. For a group of one both are the identity."""

    group: object
    rank: int
    world: int

    @classmethod
    def of_run(cls, dist: "Dist") -> "RankGroup":
        return cls(None, dist.rank, dist.world)

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``module`` whose gradients are averaged over the group's ranks (DDP), or ``module`` itself."""
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       process_group=self.group)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the group's ranks (their equal shares of one batch), on the device."""
        if self.world == 1:
            return value
        value = value.clone()
        torch.distributed.all_reduce(value, group=self.group)
        return value / self.world


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def wait_all(self) -> None:
        """A barrier that may wait for hours (ranks that finished unequal work, e.g. ``--parallel-blocks`` stage 1
        or rank 0's validation): it runs on the CPU side group, whose timeout is :func:`wait_timeout`, so the
        device backend's watchdog (30 minutes) never sees it."""
        if self.active:
            torch.distributed.barrier(group=cpu_group())

    def all_ok(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` is True on every rank (a failure on one rank stops them all cleanly)."""
        if not self.active:
            return ok
        t = torch.tensor([0 if ok else 1], dtype=torch.int64, device=_collective_device())
        torch.distributed.all_reduce(t)
        return int(t.item()) == 0

    def broadcast(self, obj, src: int = 0):
        """``obj`` of rank ``src`` on every rank (picklable Python values produced by our own code, never read
        from a file)."""
        if not self.active:
            return obj
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src, group=cpu_group())  # pickles travel by the CPU
        return box[0]

    def gather_to_main(self, obj) -> list | None:
        """Every rank's ``obj`` (picklable values of our own code) on rank 0, in rank order (None elsewhere); it
        travels through the CPU side group, never through a GPU."""
        if not self.active:
            return [obj]
        parts = [None] * self.world if self.main else None
        torch.distributed.gather_object(obj, parts, dst=0, group=cpu_group())
        return parts


_cpu_group = None


def wait_timeout() -> timedelta:
    """How long :meth:`Dist.wait_all` waits for the slowest rank: ``RAPTOR_WAIT_TIMEOUT_S`` seconds, default
    6 hours (stage-1 blocks of the paper's recipe finish about an hour apart on one GPU each). A rank that fails
    exits at once (no teardown on failure), which ends the others' wait with an error, not a timeout."""
    return timedelta(seconds=_env_int("RAPTOR_WAIT_TIMEOUT_S", 6 * 3600))


def process_timeout() -> timedelta:
    """The process group's timeout for ordinary collectives: ``RAPTOR_DIST_TIMEOUT_S`` seconds, default 30 minutes
    (PyTorch's)."""
    return timedelta(seconds=_env_int("RAPTOR_DIST_TIMEOUT_S", 30 * 60))


def cpu_group():
    """The gloo side group over every rank (created by :func:`setup`): long waits and pickled objects go through
    it, so neither holds a GPU buffer nor trips the NCCL watchdog."""
    if _cpu_group is None:
        raise RuntimeError("raptor.distributed.setup() has not joined a process group")
    return _cpu_group


def teardown() -> None:
    """Leave the process group after a command that succeeded on this rank (the CLI calls it): ranks that finish
    early exit cleanly. Not called on a failure: with NCCL, destroying the group is collective and would wait for
    ranks that are waiting for this one."""
    global _cpu_group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _cpu_group = None


def rows_per_rank(batch: int, world: int) -> int:
    """Each rank's share of a global batch; refused unless the ranks' shares are equal (the mean of their losses
    is then the whole batch's loss)."""
    if batch % world:
        raise RaptorError(f"--batch-size {batch} must be a multiple of the number of processes ({world})")
    return batch // world


def block_groups(n_blocks: int, world: int) -> list[list[int]]:
    """``--parallel-blocks``: the ranks of each stage-1 group (``min(n_blocks, world)`` groups, rank r in group
    r % groups; group g trains blocks g, g + groups, ...)."""
    n = max(1, min(n_blocks, world))
    return [[r for r in range(world) if r % n == g] for g in range(n)]


def check_block_groups(batch: int, n_blocks: int, world: int) -> None:
    """Refuse, before anything is loaded or written, a batch that some ``--parallel-blocks`` group cannot share
    equally (every rank runs this, so every rank stops with the same one line)."""
    import math

    sizes = sorted({len(m) for m in block_groups(n_blocks, world)}, reverse=True)
    need = math.lcm(*sizes)
    if batch % need:
        raise RaptorError(f"--parallel-blocks: {world} processes for {n_blocks} blocks make rank groups of "
                          f"{' and '.join(map(str, sizes))} ranks; --batch-size {batch} must be a multiple of every "
                          f"group's size: use a multiple of {need}")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise RaptorError(f"environment variable {name}={os.environ.get(name)!r} is not an integer") from None


def from_env() -> Dist:
    """The rank layout torchrun set (a world of one without torchrun)."""
    world = _env_int("WORLD_SIZE", 1)
    return Dist(_env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", world))


_current = Dist()


def current() -> Dist:
    return _current


def _collective_device() -> torch.device:
    if torch.distributed.is_initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(device: str | None, dist: Dist | None = None) -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. Under torchrun ``cuda`` means
    this rank's local GPU. A request for a missing GPU is refused with the reason."""
    dist = dist or current()
    text = (device or "auto").strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if text == "cuda" or text.startswith("cuda:"):
        if text != "cuda" and dist.world > 1:
            raise RaptorError(f"--device {device} under torchrun would put all {dist.world} ranks on one GPU (NCCL "
                              f"refuses duplicate GPUs): use --device cuda, which gives each rank its local GPU "
                              f"(choose GPUs with CUDA_VISIBLE_DEVICES)")
        if not torch.cuda.is_available():
            raise RaptorError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU (install the "
                              f"CUDA build of torch, see README 'GPU')")
        idx = dist.local_rank if text == "cuda" else text.partition(":")[2]
        try:
            idx = int(idx)
        except ValueError:
            raise RaptorError(f"bad --device {device!r} (use auto, cpu, cuda or cuda:N)") from None
        if not 0 <= idx < torch.cuda.device_count():
            raise RaptorError(f"--device {device}: GPU {idx} does not exist ({torch.cuda.device_count()} visible)")
        return torch.device("cuda", idx)
    if text == "mps":  # Apple silicon: one process (torchrun's gloo/NCCL groups do not cover it)
        if dist.world > 1:
            raise RaptorError("--device mps runs in one process, not under torchrun")
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise RaptorError(f"--device mps: this torch ({torch.__version__}) sees no Apple GPU")
        return torch.device("mps")
    raise RaptorError(f"bad --device {device!r} (use auto, cpu, cuda, cuda:N or mps)")


TRACED = ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object", "gather_object",
          "broadcast_object_list", "reduce_scatter", "new_group")


def trace_collectives(path: Path) -> None:
    """Append one JSON line per collective this process calls (op, the ranks of its group, the tensor's dtype,
    device and shape) to ``path``: ``RAPTOR_TRACE_COLLECTIVES=DIR`` writes ``DIR/rank<r>.jsonl`` per rank, to find
    which rank took another road when a job hangs (every rank must issue the same sequence). DDP's gradient
    all-reduces run inside its C++ reducer and are not listed."""
    import functools
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.open("a", buffering=1)
    td = torch.distributed

    def ranks(group):
        if group is None or group is td.GroupMember.WORLD:
            return "world"
        return td.get_process_group_ranks(group)

    for name in TRACED:
        fn = getattr(td, name)
        if getattr(fn, "_raptor_traced", False):
            continue

        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            t = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("tensor")
            rec = {"op": _name, "group": ranks(kwargs.get("group")) if _name != "new_group" else
                   list(args[0] if args else kwargs.get("ranks") or [])}
            if t is not None:
                rec.update(dtype=str(t.dtype), device=t.device.type, shape=list(t.shape))
            log.write(json.dumps(rec) + "\n")
            return _fn(*args, **kwargs)

        wrapper._raptor_traced = True
        setattr(td, name, functools.wraps(fn)(wrapper))


def setup(device: str | None = "auto") -> tuple[Dist, torch.device]:
    """Join the torchrun process group (if any) and pick this rank's device. Idempotent."""
    global _current, _cpu_group
    dist = from_env()
    if dist.world < 1 or not 0 <= dist.rank < dist.world:
        raise RaptorError(f"bad torchrun environment: RANK={dist.rank}, WORLD_SIZE={dist.world}")
    dev = resolve_device(device, dist)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # also for one process on cuda:N: kernels and allocations default to it
    if dist.active and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.distributed.init_process_group("nccl", timeout=process_timeout(), device_id=dev)
        else:
            torch.distributed.init_process_group("gloo", timeout=process_timeout())
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, dist.local_world)))  # shared cores
    if dist.active and _cpu_group is None:  # also when the caller started the process group itself
        _cpu_group = torch.distributed.new_group(backend="gloo", timeout=wait_timeout())  # same order on every rank
        if os.environ.get("RAPTOR_TRACE_COLLECTIVES"):
            trace_collectives(Path(os.environ["RAPTOR_TRACE_COLLECTIVES"]) / f"rank{dist.rank}.jsonl")
    _current = dist
    return dist, dev


def claim_on_main(stack, dist: Dist, out, has_progress=None, then=None):
    """Rank 0 claims (creates and locks) ``out`` inside ``stack`` (a ``contextlib.ExitStack``) and runs ``then()``;
    every rank learns whether that worked, so a refusal on rank 0 ends every rank at once instead of leaving them
    waiting."""
    err = None
    if dist.main:
        try:
            stack.enter_context(claim_output(out, has_progress=has_progress))
            if then is not None:
                then()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
            err = e
    if not dist.all_ok(err is None):
        if err is not None:
            raise err
        raise RaptorError(f"rank 0 could not prepare {out} (its error line says why)")
