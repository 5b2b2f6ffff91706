"""The training device path without a GPU: the step, the store batch views, splicing and the noise run on the ``meta``
device (any CPU tensor or host read in the path fails there), the decisions are pure functions (cache placement,
I/O threads), host reads per step are counted, and the collectives of a 2-rank gloo run are recorded and compared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from raptor.data import open_source
from raptor.distributed import RankGroup
from raptor.store import TrajectoryStore, extract, io_plan
from raptor.surrogate.batches import PinnedStaging, StoreBatches, cache_placement, step_generator, training_bytes
from raptor.surrogate.block import BlockConfig
from raptor.surrogate.config import FitConfig
from raptor.surrogate.model import RaptorModel, SurrogateConfig, share_noise
from raptor.surrogate.run_dir import StepOutputs
from raptor.surrogate.train import StepLoop, WorkItem, item_loss
from raptor.teachers.base import TokenLayout
from raptor.teachers.hf import build_tiny_teacher

META = torch.device("meta")
DIM, T = 32, 5
LAYOUT = TokenLayout(n_cls=1, n_registers=0, grid=(2, 2))


def _model(phases=([1, 2], [3])):
    return RaptorModel(SurrogateConfig([list(p) for p in phases], BlockConfig(dim=DIM, num_heads=1)))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("devpath")
    extract(build_tiny_teacher("dinov2"), open_source("bundled:lfw").subset(24), root / "s", chunk_images=8,
            progress=False)
    return TrajectoryStore(root / "s")


# ---- meta device: no CPU tensor, no host read ----------------------------------------------------------------------

@pytest.mark.parametrize("stage,sigma", [(1, 0.0), (1, 0.05), (2, 0.0), (2, 0.05)])
def test_training_step_runs_on_the_meta_device(stage, sigma):
    """item_loss + backward of stage 1 (teacher forcing and rollout) and stage 2 with input noise, the model and
    the batch on ``meta``: a CPU tensor or a host read (.item(), .cpu(), .numpy()) anywhere would raise."""
    model = _model().to(META)
    cfg = FitConfig(sigma=sigma, loss_norm="none", tf_anneal_frac=0.5)
    item = WorkItem("stage1/block0", 1, 0, 0, 2, 10, None) if stage == 1 else \
        WorkItem("stage2", 2, None, 0, 3, 10, (0.45, 0.10, 0.45))
    traj = torch.empty(4, item.end - item.start + 1, T, DIM, device=META)
    gen = step_generator(123, META)
    for step in (0, 9):  # annealing: teacher forcing, then the rollout
        loss = item_loss(model, item, traj, step, cfg, LAYOUT, gen, share=(1, 2))
        assert loss.device == META and loss.shape == ()
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.device == META for g in grads)


def test_noise_is_drawn_on_the_generators_device_and_follows_the_share():
    x = torch.zeros(3, T, DIM)
    whole = share_noise(torch.zeros(6, T, DIM), torch.Generator().manual_seed(5))
    halves = [share_noise(x, torch.Generator().manual_seed(5), (r, 2)) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)  # rank shares of the 1-process noise
    assert share_noise(x.to(META), torch.Generator().manual_seed(5)).device == META
    assert step_generator(7, torch.device("cpu")).device.type == "cpu"
    assert step_generator(7, META).device.type == "cpu"  # (meta has no generator)


def test_store_batches_on_the_meta_device_come_through_the_staging_buffers(store):
    """A non-CPU training device with the cache in RAM: every batch is gathered into one of two reused buffers and
    copied to the device, the index tensors too; the values equal the CPU batches."""
    rows = np.arange(2, 22)
    cpu, meta = StoreBatches(store, rows, 1), StoreBatches(store, rows, 1, device=META)
    assert meta.cache.device.type == "cpu" and meta._staging is not None and not meta._staging.pin
    for step in range(4):
        b = meta.get("stage2", step, 6, 0, 3)
        assert b.device == META and b.shape == cpu.get("stage2", step, 6, 0, 3).shape
    assert all(buf is not None for buf in meta._staging.buffers)  # two buffers, reused, not one per batch


def test_store_batches_with_the_cache_on_the_device(store):
    """The GPU-side reader: the cache on the training device, the batch is a gather there (indices copied over)."""
    rows = np.arange(2, 22)
    data = StoreBatches(store, rows, 1)
    data.cache, data.device = data.cache.to(META), META
    b = data.get("stage1/block0", 3, 6, 1, 2)
    assert b.device == META and b.shape == (6, 2, T, DIM)


def test_staging_gathers_equal_plain_indexing_and_reuse_two_buffers():
    src = torch.randn(10, 3, T, DIM).to(torch.bfloat16)
    st = PinnedStaging(pin=False)
    outs, ptrs = [], []
    for idx in ([1, 4, 7, 8], [0, 9, 3], [2, 3, 5], [6]):
        i = torch.tensor(idx)
        y = st.copy(src[:, 1:3], i, torch.device("cpu"))
        outs.append(y)
        ptrs.append(st.buffers[(st.turn - 1) % 2].data_ptr())
        assert torch.equal(y, src[i, 1:3])
    assert len(set(ptrs)) == 2  # two buffers alternate, reused while the batches fit them
    assert torch.equal(outs[0], src[torch.tensor([1, 4, 7, 8]), 1:3])  # a returned batch is never overwritten later


def test_splice_runs_on_the_meta_device():
    teacher = build_tiny_teacher("dinov2", depth=3, dim=DIM).to(META)
    model = _model().to(META)
    out = model.splice(teacher, torch.empty(2, T, DIM, device=META), 1, 3, from_images=False)
    assert out.device == META and out.shape == (2, T, DIM)


# ---- pure decisions -----------------------------------------------------------------------------------------------

def test_cache_placement_budgets_the_training_memory():
    gb = 1e9
    vit_b = training_bytes(64, 12, 257, 768, 2, "bfloat16")  # one GPU, batch 64, stage 2
    assert 5 * gb < vit_b < 40 * gb  # the review's 10-20 GB estimate for ViT-B stage-2 activations
    assert training_bytes(8, 12, 257, 768, 2, "bfloat16") < vit_b / 4  # a rank's share of 8 rows
    assert training_bytes(64, 12, 257, 768, 2, None) > vit_b  # fp32 activations cost more
    # a 6 GB cache next to ~11 GB of training: on the device on 80 and 24 GB cards, in RAM on a 16 GB card
    assert cache_placement(6 * gb, 78 * gb, vit_b) == "device"
    assert cache_placement(6 * gb, 22 * gb, vit_b) == "device"
    assert cache_placement(6 * gb, 14 * gb, vit_b) == "host"
    assert cache_placement(6 * gb, 12 * gb, 0) == "device"  # the old rule (half of free) ignored the training
    assert cache_placement(6 * gb, 12 * gb, vit_b) == "host"
    assert cache_placement(6 * gb, 78 * gb, training_bytes(512, 12, 257, 768, 2, None)) == "host"


@pytest.mark.parametrize("cores,local_world", [(2, 1), (16, 1), (64, 8), (128, 1), (8, 16)])
def test_io_plan_scales_codec_threads_and_decoders_with_the_gpu_ranks_cores(cores, local_world):
    assert io_plan("cpu", cores, local_world) == (1, 1)  # the CPU's cores belong to the forward pass
    threads, workers = io_plan("cuda", cores, local_world)
    assert 1 <= threads <= 8 and 1 <= workers <= 8
    assert threads * 2 <= max(2, cores // local_world)  # never more than the rank's share of the node
    if cores // local_world >= 16:
        assert threads == workers == 8


# ---- host reads per step --------------------------------------------------------------------------------------------

HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__bool__,
              torch.Tensor.__int__, torch.Tensor.cpu, torch.Tensor.numpy}


class _HostReads(TorchFunctionMode):
    """Counts host reads (item, tolist, float(), bool(), cpu(), numpy()) made directly by raptor's own code (a
    read inside torch, e.g. AdamW's CPU step counter, is not one of ours)."""

    def __init__(self):
        super().__init__()
        self.ours = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            caller = traceback.extract_stack(limit=3)[0]
            if f"{os.sep}raptor{os.sep}" in caller.filename and f"{os.sep}torch{os.sep}" not in caller.filename:
                self.ours.append((func.__name__, Path(caller.filename).name, caller.lineno))
        return func(*args, **(kwargs or {}))


class _Saved(StepOutputs):
    """Records the steps a checkpoint would be written at."""

    def __init__(self, cfg, item, saved: list):
        super().__init__(cfg, item)
        self.saved = saved

    def checkpoint(self, done, opt):
        self.saved.append(done)


@pytest.mark.parametrize("read_every,steps,expected", [(8, 16, 2), (32, 20, 1), (1, 5, 5)])
def test_losses_are_read_back_once_per_read_every_steps(tmp_path, read_every, steps, expected):
    """The step loop reads the loss back (a host sync on a GPU) once per ``read_every`` steps, plus once before a
    checkpoint; nothing else in raptor's step path reads the device."""
    from raptor.progress import progress_bar  # noqa: F401 - imported by the runner; warm it outside the count
    model = _model()
    cfg = FitConfig(out=str(tmp_path), ckpt_every=10 ** 6, val_every=0, sigma=0.02, loss_norm="none")
    item = WorkItem("stage2", 2, None, 0, 3, steps, None)
    batches = (torch.randn(4, 4, T, DIM) for _ in range(steps))
    loop = StepLoop(cfg, model, LAYOUT, None, torch.device("cpu"), False, None, read_every=read_every)
    hist, saved = [], []
    with _HostReads() as mode:
        loop.run(item, 0, 0, batches, hist, RankGroup(None, 0, 1), _Saved(cfg, item, saved))
    assert [h[0] for h in hist] == list(range(steps)) and saved == [steps]
    assert len(mode.ours) == expected, mode.ours
    assert {name for name, _, _ in mode.ours} == {"tolist"}


def test_a_nan_loss_stops_before_the_checkpoint_even_when_losses_are_read_late(tmp_path):
    from raptor.errors import RaptorError
    model = _model()
    cfg = FitConfig(out=str(tmp_path), ckpt_every=6, val_every=0, loss_norm="none")
    item = WorkItem("stage2", 2, None, 0, 3, 12, None)
    batches = (torch.randn(2, 4, T, DIM) for _ in range(12))
    poison = (lambda it, step, loss: loss * float("nan") if step == 3 else loss)
    loop = StepLoop(cfg, model, LAYOUT, None, torch.device("cpu"), False, poison, read_every=32)
    saved = []
    with pytest.raises(RaptorError, match="loss became nan at stage2 step 3"):
        loop.run(item, 0, 0, batches, [], RankGroup(None, 0, 1), _Saved(cfg, item, saved))
    assert saved == []  # the losses of steps 0..5 were read (and step 3 refused) before checkpoint 6


# ---- collectives of a 2-rank run ---------------------------------------------------------------------------------

FIT = ["fit", "--teacher", "tiny:dinov2", "--phases", "1-2/3", "--steps1", "3", "--steps2", "2", "--batch-size", "4",
       "--val-images", "8", "--stats-images", "16", "--probe-data", "none", "--no-progress", "--device", "cpu"]


def _torchrun(args, env_extra, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "raptor.cli", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _trace(d: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (d / f"rank{rank}.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--parallel-blocks"]])
def test_both_ranks_issue_the_same_collectives_on_the_training_device(tmp_path, store, extra):
    """RAPTOR_TRACE_COLLECTIVES: every collective of a 2-rank fit (data-parallel, and --parallel-blocks with its
    rank groups and broadcasts) is recorded per rank; the two sequences are equal and every tensor is on the
    training device (the CPU here; with NCCL it would be the rank's GPU)."""
    trace = tmp_path / "trace"
    r = _torchrun([*FIT, *extra, "--store", store.path, "--out", tmp_path / "fit"],
                  {"RAPTOR_TRACE_COLLECTIVES": str(trace)})
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _trace(trace, 0), _trace(trace, 1)
    assert len(a) > 5 and [x["op"] for x in a] == [x["op"] for x in b]
    assert [x.get("group") for x in a] == [x.get("group") for x in b]
    assert [x.get("dtype") for x in a] == [x.get("dtype") for x in b]
    assert {x["device"] for x in a + b if "device" in x} == {"cpu"}
    if extra:
        assert [x["op"] for x in a].count("new_group") == 2  # one group per block, created by both ranks


WAIT_SCRIPT = """
import os, sys, time
from raptor.distributed import setup
dist, _ = setup("cpu")
if dist.rank == 1:
    time.sleep(6)  # a rank that finished its work later (unequal stage-1 blocks)
getattr(dist, sys.argv[1])()
open(os.path.join(os.path.dirname(__file__), f"ok{dist.rank}"), "w").close()  # a file per rank: no interleaving
"""


@pytest.mark.slow
@pytest.mark.parametrize("how,ok", [("wait_all", True), ("barrier", False)])
def test_a_long_wait_uses_the_side_group_not_the_process_groups_timeout(tmp_path, how, ok):
    """With the process group's timeout at 2 s, a rank 6 s late makes a plain barrier fail, while wait_all (the
    CPU side group, RAPTOR_WAIT_TIMEOUT_S) waits for it: the NCCL watchdog's 30 minutes never bound stage 1."""
    script = tmp_path / "wait.py"
    script.write_text(WAIT_SCRIPT)
    env = {**os.environ, "RAPTOR_DIST_TIMEOUT_S": "2", "RAPTOR_WAIT_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), how], capture_output=True, text=True, env=env, timeout=120)
    assert (r.returncode == 0) == ok, r.stderr[-1500:]
    if ok:  # both ranks got past the wait (marker files: the two ranks' prints could interleave on one pipe)
        assert (tmp_path / "ok0").is_file() and (tmp_path / "ok1").is_file()
