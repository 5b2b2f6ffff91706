"""Layer x layer similarity, streamed exactly over a dataset in one pass.

All metrics are accumulated from sufficient statistics, so the result over a dataset is exact (not an average of
minibatch scores) and does not depend on batch size or order. Metrics, named precisely:

- ``paper_cosine_distance`` -- docs/method.md §2: per image, the 2-token summary [cls, mean of patch tokens] (registers
  excluded); entry (i, j) = mean over images and the 2 summary tokens of 1 - clamp(cos(s_i, s_j), -1, 1). A
  *distance* (zero diagonal). For teachers without a cls token (SigLIP) the summary is the mean patch alone.
- ``paper_mse`` -- its MSE twin: per image, mean over summary tokens and features of (s_i - s_j)^2, summed over
  images and divided by N. A distance.
- ``cka_biased[group]`` -- linear CKA with the biased HSIC estimator (Gretton et al. 2005): samples are the group's
  tokens of every image (cls: N samples; patches: N*P samples), features centred over the whole dataset. A score.
- ``cka_debiased[group]`` -- linear CKA with the unbiased HSIC estimator (Song et al. 2012). A score.
- ``token_cosine[group]`` -- mean over images and the group's tokens of cos(x_i^t, x_j^t) (same token, same
  image, layers i and j). A score.

Groups are ``cls``, ``registers``, ``patches`` and ``all`` (their union); empty groups are skipped, and asking for
one is an error. CKA keeps, per group, the Gram matrix of all layers' features stacked side by side
((n_layers*dim)^2 numbers in float64), so memory grows with (layers x width)^2: ~170 MB per group for 12 layers of
ViT-S, ~680 MB for ViT-B. Its cost per token is (n_layers*dim)^2/2 multiply-adds, cheap for cls/registers but
comparable to a forward pass for ``patches``/``all``, which is why those groups are opt-in.

Calling this module, ``raptor.similarity(source, ...)``, is :func:`raptor.api.similarity` (see :mod:`raptor._callable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

from raptor._callable import make_callable
from raptor.errors import RaptorError
from raptor.teachers.base import TokenLayout

make_callable(__name__, "similarity")

GROUPS = ("cls", "registers", "patches", "all")
BASE_GROUPS = ("cls", "registers", "patches")


def paper_summary(traj: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """(B, layers, S, D): [cls (first cls token), mean of patch tokens] per layer; registers excluded."""
    parts = []
    if layout.n_cls:
        parts.append(traj[:, :, 0])
    if layout.n_patches:
        parts.append(traj[:, :, layout.patches].mean(dim=2))
    if not parts:
        raise RaptorError("layout has neither cls nor patch tokens")
    return torch.stack(parts, dim=2)


@dataclass
class _CKAStats:
    """Sufficient statistics of one token group for exact linear CKA (biased + debiased), all layers at once."""

    n: int = 0
    gram: torch.Tensor | None = None      # (LD, LD)   sum_a z_a z_a^T
    sums: torch.Tensor | None = None      # (L, D)     sum_a x_{l,a}
    sqn_sum: torch.Tensor | None = None   # (L,)       sum_a |x_{l,a}|^2
    sqn_cross: torch.Tensor | None = None  # (L, L)    sum_a |x_{i,a}|^2 |x_{j,a}|^2
    x_by_sqn: torch.Tensor | None = None  # (L, D, L)  sum_a x_{i,a} |x_{j,a}|^2

    pending: list = field(default_factory=list)
    n_pending: int = 0
    flush_at: int = 2048

    def add(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        """Queue (n, L, D) shifted samples; they are folded in by one large product per ``flush_at`` samples
        (a Gram update costs (L*D)^2 writes however few samples it holds, so small updates are memory-bound)."""
        if x.shape[0] == 0:
            return
        self.pending.append(x.contiguous())
        self.n_pending += x.shape[0]
        if self.n_pending >= self.flush_at:
            self.flush(dtype)

    def flush(self, dtype: torch.dtype) -> None:
        if not self.pending:
            return
        x = torch.cat(self.pending)
        self.pending, self.n_pending = [], 0
        n, L, D = x.shape
        z = x.reshape(n, L * D).to(dtype)
        q = x.to(torch.float64).pow(2).sum(-1)  # (n, L)
        g = z.T @ z
        xs = torch.einsum("nld,nm->ldm", x.to(dtype), q.to(dtype)).to(torch.float64)
        if self.gram is None:
            zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=x.device)  # noqa: E731
            self.gram = zeros(L * D, L * D)
            self.sums = zeros(L, D)
            self.sqn_sum = zeros(L)
            self.sqn_cross = zeros(L, L)
            self.x_by_sqn = zeros(L, D, L)
        self.gram += g.to(torch.float64)
        self.sums += x.to(torch.float64).sum(0)
        self.sqn_sum += q.sum(0)
        self.sqn_cross += q.T @ q
        self.x_by_sqn += xs
        self.n += n

    def merged(self, other: "_CKAStats") -> "_CKAStats":
        if self.pending or other.pending:
            raise RuntimeError("flush CKA statistics before merging")
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        return _CKAStats(self.n + other.n, self.gram + other.gram, self.sums + other.sums,
                         self.sqn_sum + other.sqn_sum, self.sqn_cross + other.sqn_cross,
                         self.x_by_sqn + other.x_by_sqn)

    def cka(self, group: str, layers: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(biased, debiased) CKA matrices (L, L)."""
        n = self.n
        if n < 4:
            raise RaptorError(f"CKA on group {group!r} needs at least 4 samples, got {n}")
        L, D = self.sums.shape
        G4 = self.gram.view(L, D, L, D)  # G4[i, :, j, :] = X_i^T X_j (a view: no (L, L, D, D) temporaries)
        mean = self.sums / n
        s = self.sums
        gsq = torch.empty(L, L, dtype=torch.float64, device=s.device)   # ||X_i^T X_j||_F^2
        mCm = torch.empty(L, L, dtype=torch.float64, device=s.device)   # m_i^T X_i^T X_j m_j
        sCs = torch.empty(L, L, dtype=torch.float64, device=s.device)   # s_i^T X_i^T X_j s_j
        for i in range(L):  # one block row at a time keeps temporaries at D*L*D
            Gi = G4[i]  # (D, L, D)
            gsq[i] = Gi.pow(2).sum((0, 2))
            mCm[i] = torch.einsum("d,dje,je->j", mean[i], Gi, mean)
            sCs[i] = torch.einsum("d,dje,je->j", s[i], Gi, s)
        msq = mean.pow(2).sum(-1)
        # ||(X_i - 1 m_i^T)^T (X_j - 1 m_j^T)||_F^2 expanded (the data were shifted near their mean, so the
        # expansion does not cancel catastrophically); the (n-1)^-2 factor cancels in CKA
        hsic0 = gsq - 2 * n * mCm + n * n * torch.outer(msq, msq)
        trKL = gsq - self.sqn_cross
        one_k_one = s.pow(2).sum(-1) - self.sqn_sum  # (L,)
        su = torch.einsum("id,idj->ij", s, self.x_by_sqn)  # s_i . sum_a x_{i,a}|x_{j,a}|^2
        one_kl_one = sCs - su - su.T + self.sqn_cross
        hsic1 = (trKL + torch.outer(one_k_one, one_k_one) / ((n - 1) * (n - 2))
                 - 2.0 / (n - 2) * one_kl_one) / (n * (n - 3))
        out = []
        for name, h in (("biased", hsic0), ("debiased", hsic1)):
            d = torch.diagonal(h)
            bad = [layers[i] for i in range(L) if not d[i] > 1e-12 * max(1.0, float(d.abs().max()))]
            if bad:
                raise RaptorError(f"CKA ({name}) undefined for group {group!r}: features are constant across "
                                  f"samples at layer(s) {bad} (e.g. cls/registers at layer 0); exclude those "
                                  f"layers (--layers) or drop the group (--cka-groups)")
            m = h / torch.sqrt(torch.outer(d, d))
            out.append(m.cpu().numpy())
        return out[0], out[1]


@dataclass
class SimilarityResult:
    layers: list[int]
    n_images: int
    matrices: dict[str, np.ndarray] = field(default_factory=dict)  # flat names, e.g. "cka_biased/cls"
    kinds: dict[str, str] = field(default_factory=dict)  # name -> "distance" | "score"
    descriptions: dict[str, str] = field(default_factory=dict)
    # per-image matrices of the metrics that are means over images (their mean is the matrix): bootstrap and nulls
    per_image: dict[str, np.ndarray] = field(default_factory=dict)

    def distance(self, name: str) -> np.ndarray:
        """A distance version of a metric (1 - score for scores), zero diagonal, symmetric."""
        m = self.matrices[name]
        d = m if self.kinds[name] == "distance" else 1.0 - m
        d = (d + d.T) / 2
        np.fill_diagonal(d, 0.0)
        return np.clip(d, 0.0, None)


class SimilarityAccumulator:
    """Exact, one-pass accumulation of every layer-pair similarity metric over a stream of trajectories."""

    def __init__(self, layout: TokenLayout, layers: Sequence[int], *, cka_groups: Iterable[str] = ("cls", "registers"),
                 token_groups: Iterable[str] = GROUPS, cka_dtype: torch.dtype = torch.float64,
                 device: str | torch.device | None = None):
        self.layout = layout
        # the products run on ``device``; the float64 sums live there too, except on a device without float64
        # (Apple mps), where they stay on the CPU
        self.device = torch.device(device or "cpu")
        self.sum_device = self.device if self.device.type != "mps" else torch.device("cpu")
        self.layers = list(layers)
        self.cka_groups = [g for g in cka_groups]
        self.token_groups = [g for g in token_groups]
        for g in self.cka_groups + self.token_groups:
            if g not in GROUPS:
                raise RaptorError(f"unknown token group {g!r} (use {', '.join(GROUPS)})")
        for g in self.cka_groups:
            if self._size(g) == 0:
                raise RaptorError(f"token group {g!r} is empty for this teacher (layout {layout.to_dict()})")
        self.token_groups = [g for g in self.token_groups if self._size(g) > 0]
        self.cka_dtype = cka_dtype
        L = len(self.layers)
        self.n = 0
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=self.sum_device)  # noqa: E731
        self.cos_sum = zeros(L, L)
        self.cos_images: list[torch.Tensor] = []
        self.mse_sum = zeros(L, L)
        self.n_summary = 0
        self.tok_sum = {g: zeros(L, L) for g in BASE_GROUPS}
        self.tok_count = {g: 0 for g in BASE_GROUPS}
        need = set()
        for g in self.cka_groups:
            need |= set(BASE_GROUPS) if g == "all" else {g}
        self._cka_base = [g for g in BASE_GROUPS if g in need and self._size(g) > 0]
        self.cka_stats = {g: _CKAStats() for g in self._cka_base}
        self.shift: torch.Tensor | None = None

    def _size(self, g: str) -> int:
        return {"cls": self.layout.n_cls, "registers": self.layout.n_registers, "patches": self.layout.n_patches,
                "all": self.layout.n_tokens}[g]

    @torch.no_grad()
    def update(self, traj: torch.Tensor) -> None:
        """traj: (B, layers, T, D) for this accumulator's layers."""
        if traj.ndim != 4 or traj.shape[1] != len(self.layers) or traj.shape[2] != self.layout.n_tokens:
            raise RaptorError(f"trajectory shape {tuple(traj.shape)} does not match {len(self.layers)} layers x "
                              f"{self.layout.n_tokens} tokens")
        traj = traj.to(self.device).float()
        B = traj.shape[0]
        # paper metric + MSE twin on the 2-token summary (float64 where the device has it)
        s = paper_summary(traj, self.layout).to(self.sum_device, torch.float64)  # (B, L, S, D)
        S, D = s.shape[2], s.shape[3]
        sn = s / s.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        cos = torch.einsum("bisd,bjsd->bsij", sn, sn).clamp(-1, 1)
        self.cos_sum += (1 - cos).sum((0, 1))
        self.cos_images.append((1 - cos).mean(1).to("cpu", torch.float32))  # (B, L, L): 4 L^2 bytes per image
        sq = s.pow(2).sum(-1)  # (B, L, S)
        dots = torch.einsum("bisd,bjsd->bsij", s, s)
        mse = (sq.permute(0, 2, 1).unsqueeze(-1) + sq.permute(0, 2, 1).unsqueeze(-2) - 2 * dots) / D
        self.mse_sum += mse.clamp_min(0).mean(1).sum(0)
        self.n_summary += B * S
        # per-token cosine per group
        xn = traj / traj.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        for g in BASE_GROUPS:
            sl = self.layout.group(g)
            t = sl.stop - sl.start
            if t == 0:
                continue
            # sum over tokens and features of xn_i * xn_j: per image one (L x T_g*D) Gram (a view, no copy),
            # float32 GEMM per image, summed over images in float64
            xg = xn[:, :, sl].reshape(B, len(self.layers), -1)
            self.tok_sum[g] += torch.bmm(xg, xg.transpose(1, 2)).to(self.sum_device, torch.float64).sum(0)
            self.tok_count[g] += B * t
        # CKA statistics (shift by the first batch's per-layer mean token: CKA is shift-invariant, and this
        # keeps the float accumulation far from catastrophic cancellation)
        if self._cka_base:
            if self.shift is None:
                self.shift = traj.mean(dim=(0, 2), keepdim=True)[0]  # (L, 1, D)
            for g in self._cka_base:
                sl = self.layout.group(g)
                x = (traj[:, :, sl] - self.shift.unsqueeze(0)).permute(0, 2, 1, 3).reshape(-1, len(self.layers),
                                                                                       traj.shape[-1])
                self.cka_stats[g].add(x.to(self.sum_device), self.cka_dtype)
        self.n += B

    def result(self) -> SimilarityResult:
        if self.n == 0:
            raise RaptorError("no images were accumulated")
        r = SimilarityResult(self.layers, self.n)
        cos = (self.cos_sum / self.n_summary).cpu().numpy()
        np.fill_diagonal(cos, 0.0)
        r.matrices["paper_cosine_distance"] = cos
        r.kinds["paper_cosine_distance"] = "distance"
        r.descriptions["paper_cosine_distance"] = ("mean over images and the [cls, mean patch] summary tokens of "
                                                   "1 - clamp(cos(s_i, s_j), -1, 1) (docs/method.md §2)")
        per = torch.cat(self.cos_images).numpy()
        for m in per:
            np.fill_diagonal(m, 0.0)
        r.per_image["paper_cosine_distance"] = per
        r.matrices["paper_mse"] = (self.mse_sum / self.n).cpu().numpy()
        r.kinds["paper_mse"] = "distance"
        r.descriptions["paper_mse"] = ("per image mean over summary tokens and features of (s_i - s_j)^2, averaged "
                                       "over images")
        for g in self.token_groups:
            if g == "all":
                num = sum(self.tok_sum[b] for b in BASE_GROUPS)
                cnt = sum(self.tok_count[b] for b in BASE_GROUPS)
            else:
                num, cnt = self.tok_sum[g], self.tok_count[g]
            m = (num / cnt).cpu().numpy()
            r.matrices[f"token_cosine/{g}"] = m
            r.kinds[f"token_cosine/{g}"] = "score"
            r.descriptions[f"token_cosine/{g}"] = f"mean cos(x_i^t, x_j^t) over images and {g} tokens t"
        for st in self.cka_stats.values():
            st.flush(self.cka_dtype)
        for g in self.cka_groups:
            if g == "all":
                st = _CKAStats()
                for b in self._cka_base:
                    st = st.merged(self.cka_stats[b])
            else:
                st = self.cka_stats[g]
            biased, debiased = st.cka(g, self.layers)
            for name, m, est in (("cka_biased", biased, "biased HSIC (Gretton 2005)"),
                                 ("cka_debiased", debiased, "unbiased HSIC (Song 2012)")):
                r.matrices[f"{name}/{g}"] = m
                r.kinds[f"{name}/{g}"] = "score"
                r.descriptions[f"{name}/{g}"] = f"linear CKA, {est}, samples = {g} tokens of all images"
        return r


# ---- in-memory references (tests and small data) -----------------------------------------------------------------

def linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA between two (n, d) sample matrices, in sample space (the textbook formula)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.shape[0]

    def hsic(k, l):
        if not debiased:
            h = np.eye(n) - 1.0 / n
            return np.trace(k @ h @ l @ h)
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0)
        np.fill_diagonal(l, 0)
        one = np.ones(n)
        return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))

    k, l = x @ x.T, y @ y.T
    kk, ll = hsic(k, k), hsic(l, l)
    if kk <= 0 or ll <= 0:
        raise RaptorError("CKA undefined: constant features")
    return float(hsic(k, l) / np.sqrt(kk * ll))
