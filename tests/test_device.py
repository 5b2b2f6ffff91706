"""Device paths that no CPU run exercised: the defects a first GPU user would hit, each tested on the CPU (a fake
device tensor, a monkeypatched CUDA, the eager compile backend)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from raptor.cli import run
from raptor.distributed import Dist, resolve_device
from raptor.errors import RaptorError
from raptor.surrogate.block import BlockConfig
from raptor.surrogate.config import FitConfig
from raptor.surrogate.fit import check_device_autocast
from raptor.surrogate.model import RaptorModel, SurrogateConfig


class _OnDevice:
    """A tensor that lives on another device: only ``detach`` and a copy to the CPU are allowed (what a CUDA
    tensor allows before it meets CPU tensors)."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def detach(self):
        return self

    def cpu(self):
        return self.t.clone()

    def clone(self):
        return self

    def __getattr__(self, name):
        raise RuntimeError(f"expected all tensors on the same device (touched {name} of a device tensor)")


def test_init_head_teacher_comes_to_the_cpu():
    """probe --init-head teacher: the teacher's head lives on the feature device; the probe heads train on the
    CPU against CPU feature statistics, so the initial weights must come to the CPU."""
    from raptor.probes.run import _init_head

    w, b = torch.randn(3, 8), torch.randn(3)
    teacher = SimpleNamespace(head=SimpleNamespace(linear=SimpleNamespace(weight=_OnDevice(w), bias=_OnDevice(b))),
                              spec="x", dim=4)
    cfg = SimpleNamespace(init_head="teacher")
    w0, b0 = _init_head(cfg, teacher)
    assert isinstance(w0, torch.Tensor) and w0.device.type == "cpu" and torch.equal(w0, w) and torch.equal(b0, b)


def test_fp16_training_is_refused_and_bf16_needs_device_support():
    with pytest.raises(RaptorError, match="float16 is refused.*bfloat16"):
        FitConfig(k=2, autocast="float16").check()
    FitConfig(k=2, autocast="bfloat16").check()
    check_device_autocast("bfloat16", torch.device("cpu"))
    check_device_autocast("bfloat16", torch.device("cuda", 0), bf16_supported=True)
    check_device_autocast(None, torch.device("cuda", 0), bf16_supported=False)
    with pytest.raises(RaptorError, match="no bf16 support"):
        check_device_autocast("bfloat16", torch.device("cuda", 0), bf16_supported=False)


def test_fp16_gradients_of_the_branch_weights_flush_to_zero():
    """Why fp16 is refused: under fp16 autocast the branch weights of a fresh block get all-zero gradients (no
    loss scaling), under bf16 they do not."""
    torch.manual_seed(0)
    model = RaptorModel(SurrogateConfig([[1, 2], [3]], BlockConfig(dim=64, num_heads=1)))
    x, y = torch.randn(4, 9, 64), torch.randn(4, 9, 64)
    zero = {}
    for dtype in (torch.float16, torch.bfloat16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            out = model(x, 0, 3)[-1]
        ((out.float() - y) ** 2).mean().backward()
        g = model.blocks[0].qkv.weight.grad
        zero[dtype] = float((g == 0).float().mean())
    assert zero[torch.float16] == 1.0 and zero[torch.bfloat16] < 0.5, zero


def test_compiled_block_does_not_recompile_for_every_layer_index():
    """The model passes the depth index t as a tensor: a compiled block compiles one graph for all t (it used to
    specialise on every t, hit dynamo's recompile limit after 8 graphs and fall back to eager)."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = RaptorModel(SurrogateConfig([list(range(1, 11)), [11, 12]], BlockConfig(dim=32, num_heads=1)))
    for blk in model.blocks:
        blk.compile(backend=counting)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        model(x, 0, 12)
        model(x, 0, 12)
    assert len(graphs) <= 2 * len(model.blocks), len(graphs)
    torch._dynamo.reset()


def test_depth_index_is_a_view_on_the_models_device():
    model = RaptorModel(SurrogateConfig([[1, 2], [3]], BlockConfig(dim=32, num_heads=1)))
    assert model.t(2).tolist() == [2.0] and model.t(2).data_ptr() == model.depth_index[2:].data_ptr()
    assert "depth_index" not in model.state_dict()  # checkpoints are unchanged
    meta = model.to("meta")
    assert meta.t(3).device.type == "meta"
    out = meta(torch.empty(2, 5, 32, device="meta"), 0, 3)  # the whole rollout stays on the device
    assert all(o.device.type == "meta" for o in out)


def test_cuda_index_under_torchrun_is_refused(monkeypatch):
    """--device cuda:N with several ranks would put every rank on GPU N (NCCL: duplicate GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(RaptorError, match="all 4 ranks on one GPU"):
        resolve_device("cuda:1", Dist(rank=2, world=4, local_rank=2, local_world=4))
    assert resolve_device("cuda", Dist(rank=2, world=4, local_rank=2, local_world=4)) == torch.device("cuda", 2)
    assert resolve_device("cuda:1", Dist()) == torch.device("cuda", 1)


def test_extract_batch_above_the_chunk_is_refused_or_followed(tmp_path, capsys):
    """One forward covers at most one store chunk: --batch-size above --chunk-images used to shrink silently."""
    capsys.readouterr()
    assert run(["extract", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--limit", "40", "--batch-size",
                "64", "--chunk-images", "32", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --batch-size 64 exceeds --chunk-images 32") and not (tmp_path / "x").exists()
    assert run(["extract", "--teacher", "tiny:dinov2", "--data", "bundled:lfw", "--limit", "40", "--batch-size",
                "40", "--image-size", "28", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    from raptor.store import TrajectoryStore

    assert TrajectoryStore(tmp_path / "s").chunk_images == 40  # unset, the chunk follows the batch


@pytest.mark.parametrize("world,k", [(1, 3), (2, 2), (3, 2), (8, 3), (8, 2), (5, 7)])
def test_block_groups_cover_every_rank_once(world, k):
    from raptor.distributed import block_groups

    groups = block_groups(k, world)
    assert len(groups) == min(k, world)
    assert sorted(r for g in groups for r in g) == list(range(world))
    assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_parallel_blocks_batch_is_checked_against_every_group():
    """3 processes, k = 2: groups of 2 and 1 ranks. Batch 3 used to fail on group 0 only, after the statistics
    pass, while group 1 trained and wrote checkpoints; now every rank refuses it up front."""
    from raptor.distributed import check_block_groups

    with pytest.raises(RaptorError, match="groups of 2 and 1 ranks; batch_size 3 .* multiple of 2"):
        check_block_groups(3, 2, 3)
    check_block_groups(4, 2, 3)
    with pytest.raises(RaptorError, match="groups of 3 and 2 ranks.*multiple of 6"):
        check_block_groups(64, 3, 8)
    check_block_groups(48, 3, 8)


def test_local_rank_beyond_the_visible_gpus_is_one_line(monkeypatch):
    """torchrun with more processes per node than visible GPUs: the rank's --device cuda names the missing GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(RaptorError, match="GPU 3 does not exist \\(2 visible\\)"):
        resolve_device("cuda", Dist(rank=3, world=4, local_rank=3, local_world=4))
