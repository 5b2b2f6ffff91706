"""Trajectory store (zarr v3): every image's trajectory, shape (N, layers, tokens, dim).

Layout of a store directory::

    STORE/zarr.json            group; attrs["raptor"] = metadata (teacher, layout, transform, dtype, versions, ...)
    STORE/trajectories/        (N, n_layers, T, D), chunks (chunk_images, 1, T, D): a layer range of a batch of
                               images is a handful of whole-chunk reads
    STORE/valid/               (N,) uint8 status, chunks (chunk_images,): 0 = not extracted yet, 1 = stored,
                               2 = image unreadable (skipped)
    STORE/labels/              (N,) int64 (-1 = no label)
    STORE/ids/                 (N,) variable-length UTF-8 strings: image ids in row order

Nothing else lives in the directory (plain zarr lists the hierarchy without warnings; the run's lock file is removed
when the run ends). ``bfloat16`` is stored as its raw 16-bit pattern (uint16; zarr has no bfloat16) with the logical
dtype in the metadata (and in the ``trajectories`` attribute ``logical_dtype``); readers return float32.

Extraction is resumable: a store chunk counts as done once its ``valid`` chunk is written (every status non-zero),
which happens only after all its trajectory chunks are; zarr writes each chunk file atomically (temp file + rename),
so a SIGKILL at any moment followed by the same command gives arrays equal to an uninterrupted run. Creation is
finished once the metadata carries ``created``; ``complete`` turns true only at the very end. Under torchrun each rank
writes only its own chunks of ``trajectories`` and ``valid`` (rank 0 creates the store), so no file is shared.
Format 1 stores (``ids.json`` and ``manifest.json`` beside the arrays) are still read, but not resumed or extended.

The package: :mod:`raptor.store.format` (the on-disk format), :mod:`raptor.store.reader` (:class:`TrajectoryStore`),
:mod:`raptor.store.extraction` (the extraction pipeline). Every name below is importable from ``raptor.store``.
"""

from raptor.data.stream import prefetched
from raptor.store.extraction import (
    ExtractConfig,
    ExtractSummary,
    batch_and_chunk,
    check_extract_args,
    extract,
    io_plan,
    precheck_store,
    run_extract,
)
from raptor.store.format import (
    COMPRESSIONS,
    DTYPES,
    PENDING,
    SKIPPED,
    STORE_VERSION,
    STORED,
    StoreSettings,
    chunks_done,
    decode,
    encode,
    package_versions,
    store_sample,
)
from raptor.store.reader import TrajectoryStore

__all__ = [
    "COMPRESSIONS", "DTYPES", "PENDING", "SKIPPED", "STORED", "STORE_VERSION", "ExtractConfig", "ExtractSummary",
    "StoreSettings", "TrajectoryStore", "batch_and_chunk", "check_extract_args", "chunks_done", "decode", "encode",
    "extract", "io_plan", "package_versions", "precheck_store", "prefetched", "run_extract", "store_sample",
]
