"""Our Raptor block vs a reference written from docs/method.md §4 (nn.MultiheadAttention, official key names)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from raptor.errors import RaptorError
from raptor.surrogate.block import BlockConfig, RaptorBlock, from_official_state_dict, to_official_state_dict


def _official_reference():
    """benchmarks/official_reference.py (test and benchmark only: not in the package), loaded by its path."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "official_reference.py"
    spec = importlib.util.spec_from_file_location("official_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


OfficialBlock = _official_reference().OfficialBlock


def _randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("swiglu,t_scale", [(True, True), (False, True), (True, False), (False, False)])
def test_official_block_converts_and_matches(swiglu, t_scale):
    ref = OfficialBlock(dim=64, num_heads=4, t_scale=t_scale, swiglu=swiglu).eval()
    _randomize(ref, 0)  # trained-looking weights, not the near-identity initialisation
    ours = from_official_state_dict(ref.state_dict(), num_heads=4).eval()
    assert ours.cfg.swiglu == swiglu and ours.cfg.t_scale == t_scale
    x = torch.randn(3, 17, 64)
    for t in (1, 5, 12):
        with torch.no_grad():
            a, b = ref(x, t), ours(x, t)
        assert (a - b).abs().max().item() <= 1e-5, (t, (a - b).abs().max().item())
    back = to_official_state_dict(ours)
    assert set(back) == set(ref.state_dict())
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


def test_gates_start_near_one_and_depend_on_t():
    blk = RaptorBlock(BlockConfig(dim=32, num_heads=2))
    g1 = torch.stack(blk.gates(1))
    g12 = torch.stack(blk.gates(12))
    assert (g1 - 1).abs().max() < 0.01 and not torch.equal(g1, g12)
    assert torch.allclose(blk.ls1, torch.full((32,), 1e-5))


def test_bad_block_inputs():
    with pytest.raises(RaptorError):
        BlockConfig(dim=30, num_heads=4)
    with pytest.raises(RaptorError):
        from_official_state_dict({"foo": torch.zeros(1)})
