"""Similarity: exact streaming = in-memory, CKA properties, the paper metric's formula, clear errors."""

import numpy as np
import pytest
import torch

from raptor.errors import RaptorError
from raptor.similarity import SimilarityAccumulator, linear_cka, paper_summary
from raptor.teachers.base import TokenLayout

LAYOUT = TokenLayout(n_cls=1, n_registers=2, grid=(2, 3))  # 9 tokens


def _traj(b=10, layers=4, d=8, seed=0, layout=LAYOUT):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, layout.n_tokens, d, generator=g) * 2 + 3  # large mean: cancellation-prone
    steps = torch.randn(b, layers, layout.n_tokens, d, generator=g).cumsum(1) * 0.5
    return base + steps


def _run(traj, bs, **kw):
    acc = SimilarityAccumulator(LAYOUT, list(range(traj.shape[1])), **kw)
    for s in range(0, len(traj), bs):
        acc.update(traj[s:s + bs])
    return acc.result()


def _group_samples(traj, layer, sl):
    return traj[:, layer, sl].reshape(-1, traj.shape[-1]).numpy()


def test_streaming_equals_in_memory_reference():
    traj = _traj()
    r = _run(traj, bs=3, cka_groups=("cls", "registers", "patches", "all"))
    L = traj.shape[1]
    for g in ("cls", "registers", "patches", "all"):
        sl = LAYOUT.group(g)
        for deb in (False, True):
            m = r.matrices[f"cka_{'debiased' if deb else 'biased'}/{g}"]
            for i in range(L):
                for j in range(L):
                    ref = linear_cka(_group_samples(traj, i, sl), _group_samples(traj, j, sl), debiased=deb)
                    assert abs(m[i, j] - ref) <= 1e-6, (g, deb, i, j, m[i, j], ref)
        tok = r.matrices[f"token_cosine/{g}"]
        xi = torch.nn.functional.normalize(traj[:, :, sl].double(), dim=-1)
        ref = torch.einsum("bitd,bjtd->ij", xi, xi) / (traj.shape[0] * (sl.stop - sl.start))
        assert np.abs(tok - ref.numpy()).max() <= 1e-6


def test_paper_metric_matches_its_formula():
    traj = _traj(b=6)
    r = _run(traj, bs=4)
    s = torch.stack([traj[:, :, 0], traj[:, :, LAYOUT.patches].mean(2)], dim=2)  # cls, mean patch
    L = traj.shape[1]
    ref = np.zeros((L, L))
    mse = np.zeros((L, L))
    for i in range(L):
        for j in range(L):
            c = torch.nn.functional.cosine_similarity(s[:, i], s[:, j], dim=-1, eps=1e-8).clamp(-1, 1)
            ref[i, j] = (1 - c).mean().item()
            mse[i, j] = ((s[:, i] - s[:, j]) ** 2).mean(dim=(1, 2)).sum().item() / len(s)
    np.fill_diagonal(ref, 0)
    assert np.abs(r.matrices["paper_cosine_distance"] - ref).max() <= 1e-6
    assert np.abs(r.matrices["paper_mse"] - mse).max() <= 1e-5 * max(1, mse.max())
    assert torch.equal(paper_summary(traj, LAYOUT), s)


def test_batch_size_and_order_do_not_matter():
    traj = _traj(b=12)
    a = _run(traj, bs=12, cka_groups=("cls", "patches"))
    b = _run(traj[torch.randperm(12, generator=torch.Generator().manual_seed(1))], bs=5, cka_groups=("cls", "patches"))
    for k in a.matrices:
        assert np.abs(a.matrices[k] - b.matrices[k]).max() <= 1e-6, k


def test_cka_properties_diagonal_symmetry_invariances():
    traj = _traj(b=16, d=6)
    r = _run(traj, bs=5, cka_groups=("cls", "patches"))
    for name in ("cka_biased/cls", "cka_debiased/cls", "cka_biased/patches", "cka_debiased/patches"):
        m = r.matrices[name]
        assert np.allclose(np.diag(m), 1.0, atol=1e-9)
        assert np.allclose(m, m.T, atol=1e-9)
    # invariance: apply a random orthogonal transform + isotropic scale + shift to one layer only
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(3)), mode="complete")
    t2 = traj.clone()
    t2[:, 2] = 3.7 * t2[:, 2] @ q + 5.0
    r2 = _run(t2, bs=5, cka_groups=("cls", "patches"))
    for name in ("cka_biased/cls", "cka_debiased/cls", "cka_biased/patches", "cka_debiased/patches"):
        assert np.abs(r.matrices[name] - r2.matrices[name]).max() <= 1e-7, name
    # CKA(X, X) = 1 on identical layers
    t3 = traj.clone()
    t3[:, 1] = t3[:, 0]
    assert abs(_run(t3, bs=4, cka_groups=("cls",)).matrices["cka_biased/cls"][0, 1] - 1) < 1e-9


def test_float32_accumulation_is_close():
    traj = _traj(b=8)
    a = _run(traj, bs=3, cka_groups=("patches",))
    b = _run(traj, bs=3, cka_groups=("patches",), cka_dtype=torch.float32)
    assert np.abs(a.matrices["cka_biased/patches"] - b.matrices["cka_biased/patches"]).max() < 1e-4


def test_constant_or_empty_groups_give_clear_errors_not_nan():
    traj = _traj(b=8)
    traj[:, 0, 0] = 1.0  # cls constant across images at layer 0 (as in a real ViT's embedding layer)
    with pytest.raises(RaptorError, match=r"constant .* layer\(s\) \[0\]"):
        _run(traj, bs=4, cka_groups=("cls",))
    r = _run(traj, bs=4, cka_groups=("patches",))
    assert all(np.isfinite(m).all() for m in r.matrices.values())
    no_reg = TokenLayout(1, 0, (2, 2))
    with pytest.raises(RaptorError, match="empty"):
        SimilarityAccumulator(no_reg, [0, 1], cka_groups=("registers",))
    acc = SimilarityAccumulator(no_reg, [0, 1], cka_groups=())
    assert "registers" not in acc.token_groups
    with pytest.raises(RaptorError, match="no images"):
        acc.result()
    with pytest.raises(RaptorError, match="shape"):
        acc.update(torch.zeros(2, 3, 5, 4))
