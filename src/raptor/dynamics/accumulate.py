"""One pass over trajectories (B, layers 0..L, tokens, dim): every per-image dynamics metric, batch by batch.

Each batch is normalised once; γ, angular speed (per token group), patch coherence, the update ranks (raw and
unit-direction updates, on the first ``rank_images`` images: an eigen-decomposition per image and layer is the one
costly step) and the read-out direction per layer (cls, or the mean patch for teachers without one) are taken from
it. For the class-basin scores at the end, the read-out directions of up to ``basin_images`` labelled images are
kept: a uniform random sample of the labelled stream (reservoir sampling, fixed seed), so memory stays bounded on a
class-sorted data set of any size. Results equal the functions in :mod:`raptor.dynamics.metrics`
applied to the whole set at once (tested).
"""

from __future__ import annotations

import numpy as np
import torch

from raptor.dynamics.metrics import (
    coherence_of_units,
    gamma_of_units,
    singular_values,
    spectrum_ranks,
    speed_of_units,
    unit,
)
from raptor.errors import RaptorError

GROUPS = ("cls", "registers", "patches", "all")
RANKS = ("stable_rank", "effective_rank", "stable_rank_directions", "effective_rank_directions",
         "stable_rank_centred", "effective_rank_centred")


class DynamicsAccumulator:
    def __init__(self, layout, n_layers: int, rank_images: int | None = 64, basin_images: int = 5000, seed: int = 0):
        self.layout = layout
        self.n_layers = n_layers
        self.rank_images = rank_images
        self.groups = [g for g in GROUPS if layout.group(g).stop > layout.group(g).start]
        self.gamma: dict[str, list] = {g: [] for g in self.groups}
        self.gamma_prev: dict[str, list] = {g: [] for g in self.groups}  # γ against layer L − 1
        self.speed: dict[str, list] = {g: [] for g in self.groups}
        self.coherence: list = []
        self.ranks: dict[str, list] = {k: [] for k in RANKS}
        self.basin_images = basin_images
        self._rng = np.random.default_rng(seed)
        self.readout: torch.Tensor | None = None  # (K, n, D) float32 unit directions of the kept labelled images
        self.embedded: torch.Tensor | None = None  # (K, D): layer-0 mean patch direction, the embedded-pixel baseline
        self.labels = np.full(basin_images, -1, dtype=np.int64)
        self.n_labelled = 0
        self.n = 0
        self.n_ranked = 0

    @property
    def readout_name(self) -> str:
        return "cls" if self.layout.n_cls else "mean patch"

    @torch.no_grad()
    def update(self, traj: torch.Tensor, labels: np.ndarray | None = None) -> None:
        if traj.ndim != 4 or traj.shape[1] != self.n_layers or traj.shape[2] != self.layout.n_tokens:
            raise RaptorError(f"trajectory shape {tuple(traj.shape)} does not match {self.n_layers} layers x "
                              f"{self.layout.n_tokens} tokens")
        traj = traj.float()
        B = traj.shape[0]
        u = unit(traj)
        for g in self.groups:
            ug = u[:, :, self.layout.group(g)]
            self.gamma[g].append(gamma_of_units(ug).double())
            self.gamma_prev[g].append(gamma_of_units(ug[:, :-1]).double())
            self.speed[g].append(speed_of_units(ug).double())
        self.coherence.append(coherence_of_units(u[:, :, self.layout.patches]).double())
        take = B if self.rank_images is None else max(0, min(B, self.rank_images - self.n_ranked))
        if take:
            for name, x in (("", traj[:take]), ("_directions", u[:take]), ("_centred", traj[:take])):
                delta = x[:, 1:] - x[:, :-1]
                if name == "_centred":  # the update minus its mean over tokens: no shared direction dominates
                    delta = delta - delta.mean(2, keepdim=True)
                stable, eff = spectrum_ranks(singular_values(delta))
                self.ranks["stable_rank" + name].append(stable)
                self.ranks["effective_rank" + name].append(eff)
            self.n_ranked += take
        ro = u[:, :, 0] if self.layout.n_cls else unit(traj[:, :, self.layout.patches].mean(2))
        if labels is not None:
            self._keep(ro, unit(traj[:, 0, self.layout.patches].mean(1)), np.asarray(labels, dtype=np.int64))
        self.n += B

    def _keep(self, ro: torch.Tensor, emb: torch.Tensor, labels: np.ndarray) -> None:
        """Reservoir sampling (Algorithm R) over the labelled images (kept on the CPU, whatever the device)."""
        ro, emb = ro.cpu(), emb.cpu()
        if self.readout is None:
            self.readout = torch.zeros((self.basin_images,) + tuple(ro.shape[1:]))
            self.embedded = torch.zeros((self.basin_images, emb.shape[-1]))
        for i in np.flatnonzero(labels >= 0):
            slot = self.n_labelled if self.n_labelled < self.basin_images else \
                int(self._rng.integers(0, self.n_labelled + 1))
            if slot < self.basin_images:
                self.readout[slot], self.embedded[slot], self.labels[slot] = ro[i], emb[i], labels[i]
            self.n_labelled += 1

    def result(self) -> dict:
        """Per-image arrays: ``gamma``/``speed`` per group, ``coherence``, ``ranks`` (the first ``n_ranked``
        images), and for the kept labelled images ``readout`` (K, n_layers, D), ``embedded`` (K, D), ``labels``."""
        if self.n == 0:
            raise RaptorError("no images were read")
        cat = lambda xs: torch.cat(xs).cpu().numpy()  # noqa: E731
        k = min(self.n_labelled, self.basin_images)
        return {"gamma": {g: cat(v) for g, v in self.gamma.items()},
                "gamma_prev": {g: cat(v) for g, v in self.gamma_prev.items()},
                "speed": {g: cat(v) for g, v in self.speed.items()},
                "coherence": cat(self.coherence),
                "ranks": {k: cat(v) for k, v in self.ranks.items()} if self.n_ranked else {},
                "readout": self.readout[:k] if k else torch.zeros(0, self.n_layers, 1),
                "embedded": self.embedded[:k] if k else torch.zeros(0, 1), "labels": self.labels[:k].copy(),
                "n_labelled": self.n_labelled,
                "n_images": self.n, "n_ranked": self.n_ranked}
