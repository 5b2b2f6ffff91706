"""Where teacher trajectories come from: one interface, two implementations, used by ``analyze`` and ``dynamics``
(and by ``fit`` for its store checks; fit's training batches are :mod:`raptor.surrogate.batches`).

- :class:`StoreTrajectories`: a trajectory store written by ``raptor extract`` and the ``--limit`` sample of its
  rows. :meth:`StoreTrajectories.open` does the checks a command needs before anything heavy happens (extraction
  finished, every layer 0..L stored, made by this teacher spec).
- :class:`LiveTrajectories`: an image source run through a loaded teacher batch by batch: image loading and the
  evaluation transform, unreadable images skipped (their ids kept), load warnings through the progress bar.

Both yield, in a fixed order, :class:`TrajectoryBatch` es of the asked layers, advance a progress bar by the
images each batch consumed, and describe what they read (:meth:`describe`: the ``data`` record of a command's JSON).
"""

from __future__ import annotations

import warnings
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch

from raptor.data import load_images
from raptor.data.sampling import store_sample_record
from raptor.errors import RaptorError
from raptor.progress import no_bar
from raptor.store import TrajectoryStore


class TrajectoryBatch(NamedTuple):
    """``traj`` (B, len(layers), T, D) float32 (a live batch may be a reused buffer: consume it before the next);
    ``labels`` (B,) of the images (None where the data have none); ``positions`` in the sample's order."""

    traj: torch.Tensor
    labels: np.ndarray | None
    positions: np.ndarray


class StoreTrajectories:
    """The rows of a finished trajectory store: all of them, or the ``--limit`` sample (``limit``, ``seed``,
    ``order`` as :meth:`raptor.data.ImageSource.subset` chooses images)."""

    source = "store"

    def __init__(self, store: TrajectoryStore, limit: int | None = None, seed: int = 1, order: str = "random"):
        self.store = store
        self.limit, self.seed, self.order = limit, seed, order
        self.rows = store.sample(limit, seed, order)

    @classmethod
    def open(cls, path, *, command: str, limit: int | None = None, seed: int = 1, order: str = "random",
             complete_why: str = "", teacher_spec: str | None = None, every_layer: bool = False
             ) -> "StoreTrajectories":
        """Open ``path`` for ``command`` with the checks it needs, in this order: extraction finished
        (``complete_why`` says why that matters to it), every layer 0..L stored (``every_layer``), made with
        ``teacher_spec``."""
        st = TrajectoryStore(path)
        st.require_complete(complete_why)
        if every_layer:
            st.require_every_layer(command)
        if teacher_spec is not None:
            st.require_teacher_spec(teacher_spec)
        return cls(st, limit, seed, order)

    @property
    def depth(self) -> int:
        return int(self.store.meta["teacher"]["depth"])

    @property
    def layout(self):
        return self.store.layout

    def __len__(self) -> int:
        return len(self.rows)

    def require_layers(self, layers: Sequence[int]) -> None:
        missing = [layer for layer in layers if layer not in self.store.layers]
        if missing:
            raise RaptorError(f"store {self.store.path} lacks layers {missing} (it holds {self.store.layers})")

    def batches(self, batch_size: int, layers: Sequence[int] | None = None, bar=None) -> Iterator[TrajectoryBatch]:
        """The sample's rows in order, ``layers`` (default: every stored layer) of each."""
        bar = bar or no_bar()
        layers = list(self.store.layers if layers is None else layers)
        self.require_layers(layers)
        lo, hi = min(layers), max(layers)
        sub = [layer - lo for layer in layers]
        whole = sub == list(range(hi - lo + 1))
        for x, idx in self.store.batches(batch_size, layers=(lo, hi), shuffle=False, rows=self.rows):
            idx = np.asarray(idx)
            yield TrajectoryBatch(x if whole else x[:, sub], self.store.labels[idx], idx)
            bar.advance(len(x))

    @property
    def skipped(self) -> list[str]:
        return list(self.store.manifest.get("skipped", []))

    def sample_record(self) -> dict:
        return store_sample_record(self.store, self.rows, self.limit, self.seed, self.order)

    def describe(self, n_images: int) -> dict:
        st = self.store
        return {"source": "store", "store": str(st.path), "n_images": n_images, "skipped": self.skipped,
                "sample": self.sample_record(), "layout": st.layout.to_dict(),
                "transform": st.meta["settings"]["transform"], "teacher": st.meta["teacher"]}


class LiveTrajectories:
    """An image source (already ``--limit``-ed) run through ``teacher`` at ``image_size`` (default: the teacher's),
    with its evaluation transform (``transform``: paper | model, :meth:`Teacher.eval_transform`), optionally under
    ``autocast``."""

    source = "live"

    def __init__(self, teacher, images, image_size: int | None = None, autocast: str | None = None,
                 transform: str = "paper"):
        self.teacher, self.images, self.autocast = teacher, images, autocast
        self.transform = teacher.eval_transform(image_size, transform)
        self.size = self.transform.size
        self.skipped: list[str] = []

    @property
    def depth(self) -> int:
        return self.teacher.depth

    @property
    def layout(self):
        return self.teacher.layout(self.size)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, layers: Sequence[int] | None = None, bar=None) -> Iterator[TrajectoryBatch]:
        """Load, transform and run the images batch by batch (``layers``: default 0..L). A batch none of whose
        images could be read is skipped; the ids of unreadable images collect in :attr:`skipped`."""
        bar = bar or no_bar()
        items, labels = self.images.items, self.images.labels
        buf = None
        for s in range(0, len(items), batch_size):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                tensors, kept, bad = load_images(items[s:s + batch_size], self.transform)
            for w in caught:
                bar.warn(str(w.message))
            self.skipped += bad
            if tensors:  # on the teacher's device
                param = next(self.teacher.parameters(), torch.empty(0))
                x = torch.stack(tensors).to(param.device, param.dtype)
                buf = self.teacher.trajectory(x, layers, autocast=self.autocast, out=buf)
                pos = s + np.asarray(kept, dtype=np.int64)
                yield TrajectoryBatch(buf[: len(tensors)], None if labels is None else labels[pos], pos)
            bar.advance(len(tensors) + len(bad))

    def sample_record(self) -> dict:
        return self.images.sample_info()

    def describe(self, n_images: int) -> dict:
        return {"source": "live", "n_images": n_images, "skipped": list(self.skipped), "sample": self.sample_record(),
                "layout": self.layout.to_dict(), "transform": self.transform.describe(),
                "teacher": self.teacher.describe()}
