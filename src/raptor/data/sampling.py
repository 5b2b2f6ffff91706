"""``--limit N``: which N images of a data set (or rows of a store) a command uses.

By default a seeded random sample, stratified by class where the items carry labels, so that ``--limit 10000`` of
ImageNet's train folder (sorted by class) still covers its 1,000 classes instead of the first eight. The chosen
positions are returned in ascending order (a store keeps the data set's order) and recorded by every command
with the seed. ``sorted`` keeps the first N in the data set's own order.
"""

from __future__ import annotations

import numpy as np

from raptor.errors import RaptorError

SAMPLE_ORDERS = ("random", "sorted")
DEFAULT_SAMPLE_SEED = 1  # the official notebook shuffles its ImageNet sample with seed 1


def sample_positions(n: int, limit: int | None, labels: np.ndarray | None = None, seed: int = DEFAULT_SAMPLE_SEED,
                     order: str = "random") -> np.ndarray:
    """Positions (ascending) of ``min(limit, n)`` of ``n`` items. ``random``: a uniform sample without replacement
    drawn with ``seed``; where ``labels`` are given (>= 0; -1 = unlabelled) it is stratified: each class gets
    ``limit * class share`` items (largest remainders; every class at least one while ``limit`` allows), the
    unlabelled items form one more stratum. ``sorted``: positions 0..limit-1."""
    check_sample_order(order)
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise RaptorError(f"--limit must be positive, got {limit}")
    if order == "sorted":
        return np.arange(limit)
    rng = np.random.default_rng(seed)
    if labels is None or len(labels) != n:
        return np.sort(rng.choice(n, size=limit, replace=False))
    labels = np.asarray(labels)
    strata = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    sizes = np.array([len(s) for s in strata])
    quota = _allocate(sizes, limit)
    picked = [rng.choice(s, size=q, replace=False) for s, q in zip(strata, quota) if q > 0]
    return np.sort(np.concatenate(picked))


def _allocate(sizes: np.ndarray, limit: int) -> np.ndarray:
    """Integer quotas summing to ``limit``, proportional to ``sizes`` (largest remainders), each <= its size and
    >= 1 for every stratum while ``limit`` >= the number of strata."""
    exact = sizes / sizes.sum() * limit
    quota = np.floor(exact).astype(np.int64)
    if limit >= len(sizes):
        quota = np.maximum(quota, 1)
    quota = np.minimum(quota, sizes)
    while quota.sum() > limit:  # raising small strata to 1 overshot: take back where a quota exceeds its share most
        quota[np.argmax(np.where(quota > 1, quota - exact, -np.inf))] -= 1
    rem = exact - quota
    while quota.sum() < limit:
        room = np.where(quota < sizes, rem, -np.inf)
        i = int(np.argmax(room))
        quota[i] += 1
        rem[i] -= 1
    return quota


def check_sample_order(order: str) -> None:
    """Refuse an unknown ``--sample`` value (every command checks it before touching anything)."""
    if order not in SAMPLE_ORDERS:
        raise RaptorError(f"unknown --sample {order!r} (use {', '.join(SAMPLE_ORDERS)})")


def sample_rows(rows: np.ndarray, limit: int | None, labels: np.ndarray | None = None,
                seed: int = DEFAULT_SAMPLE_SEED, order: str = "random") -> np.ndarray:
    """``limit`` of a store's ``rows`` (ascending), as :func:`sample_positions`; ``labels``: the store's labels of
    every row (indexed by row)."""
    rows = np.asarray(rows)
    lab = None if labels is None else np.asarray(labels)[rows]
    return rows[sample_positions(len(rows), limit, lab, seed, order)]


def store_sample_record(store, rows: np.ndarray, limit: int | None, seed: int, order: str) -> dict:
    """The --limit record of ``rows`` drawn from a store's extracted rows (their ids when a sample was drawn)."""
    n = len(store.valid_indices)
    if limit is None or limit >= n:
        return sample_record(None, limit, seed, order, n)
    ids = store.ids
    return sample_record([ids[r] for r in rows], limit, seed, order, n)


def sample_record(ids: list[str] | None, limit: int | None, seed: int, order: str, n_total: int) -> dict:
    """What a command writes next to its outputs about its ``--limit`` sample (``ids``: the chosen ones; None when
    every item was used)."""
    used = limit is not None and limit < n_total
    return {"limit": limit, "order": order if used else "all", "seed": seed, "n_total": n_total,
            "n_chosen": len(ids) if ids is not None else n_total, "ids": list(ids) if used and ids is not None
            else None}
