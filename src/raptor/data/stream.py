"""Streaming images through ``torch.utils.data.DataLoader`` worker processes.

Nothing here keeps a data set in memory: an element is decoded (and augmented) when it is asked for, in a worker
process when ``workers > 0``, and at most ``workers x prefetch`` elements wait in the queue -- memory is bounded
by a few batches whatever the data set's size. Elements come back in index order (never in worker-finishing
order), and everything random in an element is drawn from a generator seeded by the element's key, so the
result is a function of the key alone: worker count and timing change nothing.

- :class:`ChunkDataset`: element ``c`` = the eval-transformed images of one contiguous run of items (a store
  chunk, a feature batch). Unreadable images are skipped and named, as :func:`raptor.data.load_images` does.
- :class:`TrainBatchDataset`: element ``(tag, step)`` = the training images of one step: ``batch`` random items
  drawn from ``(seed, tag, step)``, each with a random-resized crop + flip from its own generator
  ``(seed, tag#j, step)``; rank ``r`` of ``world`` materialises only its share of the batch. An unreadable item
  is replaced by the next readable one (deterministically) and named once (:func:`warn_once`).
- :func:`prefetched`: any generator run a few items ahead in a background thread (the store reader's batches,
  the training stream's store batches).

Workers are forked (the image loaders of bundled sets are closures, which cannot be pickled); where fork does not
exist the loading runs in the calling process.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import queue
import random
import threading
import warnings
from typing import Iterator, Sequence

import torch

from raptor.data.sources import ImageItem, ImageLoadWarning, load_images
from raptor.distributed import rows_per_rank
from raptor.errors import RaptorError


def key_rng(seed: int, tag: str, step: int) -> random.Random:
    """The generator of one (tag, step): a function of the key alone."""
    return random.Random(int(hashlib.sha256(f"{seed}/{tag}/{step}".encode()).hexdigest()[:16], 16))


def _context(workers: int):
    if workers <= 0:
        return None
    if "fork" not in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context("fork")


def loader(dataset, workers: int, *, pin_memory: bool = False, prefetch: int = 2,
           indices: Sequence[int] | None = None) -> Iterator:
    """Iterate ``dataset`` (in ``indices`` order, default 0..len-1) through ``workers`` processes; the elements are
    yielded exactly in that order. ``workers = 0`` (or no fork on this platform) loads in the calling process."""
    from torch.utils.data import DataLoader

    ctx = _context(workers)
    if workers > 0 and ctx is None:
        warnings.warn("worker processes need fork, which this platform lacks: loading images in the main process",
                      UserWarning, stacklevel=2)
        workers = 0
    order = list(range(len(dataset))) if indices is None else list(indices)
    if not order:
        return iter(())
    dl = DataLoader(dataset, batch_size=None, sampler=order, num_workers=min(workers, len(order)),
                    multiprocessing_context=ctx if workers else None, prefetch_factor=prefetch if workers else None,
                    pin_memory=pin_memory, persistent_workers=False, worker_init_fn=_worker_init if workers else None)
    return _named_worker_failures(iter(dl), workers)


def _worker_init(_: int) -> None:
    """Workers yield the CPU to the forward pass: on a machine with few cores they only fill its idle gaps."""
    import os

    try:
        os.nice(5)
    except OSError:  # pragma: no cover - not permitted: run at normal priority
        pass


def _named_worker_failures(it, workers: int):
    """A worker killed from outside (out of memory, a signal) becomes one clear error, not a traceback. However the
    loop ends, the workers are shut down and unregistered at once: torch's SIGCHLD handler would otherwise go on
    checking a dead worker's pid and raise in whatever code runs when the next child process exits."""
    try:
        yield from it
    except (RuntimeError, ConnectionError, EOFError) as e:
        # a killed worker shows as torch's "DataLoader worker ... exited" RuntimeError, or -- when it dies after
        # sending a tensor whose shared memory the parent still has to fetch from it -- as a reset connection
        if (isinstance(e, RuntimeError) and "DataLoader worker" not in str(e)) or workers <= 0:
            raise
        what = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise RaptorError(f"an image-loading worker process died ({what}); with "
                          f"--workers {workers} each worker holds 2 batches: lower --workers (0 loads in the main "
                          f"process) and re-run the same command to resume") from None
    finally:
        stop = getattr(it, "_shutdown_workers", None)
        if stop is not None:
            try:
                stop()
            except RuntimeError:  # pragma: no cover - the dead worker's signal landed here; it is handled above
                pass


class ChunkDataset(torch.utils.data.Dataset):
    """Element ``c``: ``(c, images (n, 3, H, W) or None, kept positions within the run, skipped ids, warnings)``
    of ``items[bounds[c][0]:bounds[c][1]]``."""

    def __init__(self, items: Sequence[ImageItem], transform, bounds: Sequence[tuple[int, int]]):
        self.items, self.transform, self.bounds = items, transform, list(bounds)

    def __len__(self) -> int:
        return len(self.bounds)

    def __getitem__(self, c: int):
        lo, hi = self.bounds[c]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tensors, kept, bad = load_images(self.items[lo:hi], self.transform)
        x = torch.stack(tensors) if tensors else None
        return c, x, kept, bad, [str(w.message) for w in caught]


def even_bounds(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class TrainBatchDataset(torch.utils.data.Dataset):
    """Element ``i`` of ``keys`` (a list of (tag, step)): ``(images of this rank's share, load warnings)``."""

    def __init__(self, items: Sequence[ImageItem], keys: Sequence[tuple[str, int]], batch: int, seed: int,
                 train_tf, eval_tf, crops: bool, rank: int = 0, world: int = 1):
        n = rows_per_rank(batch, world)
        self.items, self.keys, self.batch, self.seed = items, list(keys), batch, seed
        self.train_tf, self.eval_tf, self.crops = train_tf, eval_tf, crops
        self.share = slice(rank * n, (rank + 1) * n)

    def __len__(self) -> int:
        return len(self.keys)

    def indices(self, tag: str, step: int) -> list[int]:
        """The item positions of the whole (global) batch of (tag, step)."""
        rng = key_rng(self.seed, tag, step)
        return [rng.randrange(len(self.items)) for _ in range(self.batch)]

    def _load(self, i: int, bad: list[str]):
        """Item ``i``, or the next readable one after it (the unreadable ones named in ``bad``)."""
        for k in range(len(self.items)):
            it = self.items[(i + k) % len(self.items)]
            try:
                return it.load()
            except Exception as e:  # noqa: BLE001 - skip, name it, never crash
                bad.append(f"skipping unreadable image {it.id}: {type(e).__name__}: {str(e)[:120]}")
        raise RaptorError("none of the training images can be read")

    def __getitem__(self, i: int):
        tag, step = self.keys[i]
        idx = self.indices(tag, step)
        out, bad = [], []
        for j in range(self.share.start, self.share.stop):
            img = self._load(idx[j], bad)
            if self.crops:
                out.append(self.train_tf(img, key_rng(self.seed, f"{tag}#{j}", step)))
            else:
                out.append(self.eval_tf(img))
        return torch.stack(out), bad


def warn_once(messages: Sequence[str], seen: set) -> None:
    """Each load warning once (an unreadable image is named once, however often it is drawn)."""
    for m in messages:
        if m not in seen:
            seen.add(m)
            warnings.warn(m, ImageLoadWarning, stacklevel=3)


def _put_until(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` unless ``stop`` is set first (a thread never stays blocked on a queue nobody reads)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            pass
    return False


def prefetched(gen: Iterator, depth: int, name: str = "raptor-prefetch") -> Iterator:
    """Run the generator ``gen`` up to ``depth`` items ahead in a daemon thread. Its exceptions surface in the
    consumer; a consumer that stops early stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    end = object()

    def produce():
        try:
            for x in gen:
                if not _put_until(q, (x, None), stop):
                    return
        except BaseException as e:  # noqa: BLE001 - raised in the consumer
            _put_until(q, (end, e), stop)
            return
        _put_until(q, (end, None), stop)

    threading.Thread(target=produce, daemon=True, name=name).start()
    try:
        while True:
            x, err = q.get()
            if err is not None:
                raise err
            if x is end:
                return
            yield x
    finally:
        stop.set()
