"""Phase specs: what a user asks for as phases, parsed once, and the layer lists it resolves to.

A phase is a list of output layer numbers ``1..L`` (layer 0 is the embedding), in increasing order; a phase
partition covers every layer exactly once, contiguous (``1-7/8-12``) or not (``1,3,5/2,4,6``). A
:class:`PhaseSpec` is one of

- explicit layers: ``1-7/8-11/12``, ``1,3,5/2,4,6`` or a JSON array ``[[1,2,3],[4,5,6]]``;
- a file: ``raptor analyze``'s ``analysis.json`` (its chosen DP phases, or the DP phases for ``k``) or a JSON
  array of layer lists;
- ``k`` alone: the DP segmentation of the data's layer similarity (resolved by the caller, who has the data), or
  ``equal`` phases.

Every command parses its ``--phases``/``--k`` here (:meth:`PhaseSpec.parse`) and resolves them here
(:meth:`PhaseSpec.resolve`); the partition helpers (labels, boundaries, enumeration, formatting) live beside them.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from raptor.errors import RaptorError

PHASE_METHODS = ("dp", "equal")  # with k alone: the DP segmentation of the data's similarity | equal phases
PHASES_USAGE = "1-7/8-11/12, [[1,2,3],[4,5,6]] or an analysis.json"


def equal_phases(depth: int, k: int) -> list[list[int]]:
    """k contiguous phases of layers 1..depth, as equal as possible (earlier phases take the remainder)."""
    if not 1 <= k <= depth:
        raise RaptorError(f"k must lie in 1..{depth}, got {k}")
    sizes = [depth // k + (1 if i < depth % k else 0) for i in range(k)]
    out, start = [], 1
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out


def validate_phases(phases: list[list[int]], depth: int) -> list[list[int]]:
    """A partition of layers 1..depth into non-empty phases, each listed in increasing order (contiguous or not)."""
    flat = sorted(x for p in phases for x in p)
    if flat != list(range(1, depth + 1)) or any(not p or list(p) != sorted(set(p)) for p in phases):
        raise RaptorError(f"phases must cover layers 1..{depth} exactly once, each phase non-empty and in increasing "
                          f"order, got {phases}")
    return [list(p) for p in phases]


def phase_runs(phases: list[list[int]]) -> list[tuple[int, int, int]]:
    """The maximal stretches of consecutive layers produced by one block, in depth order: (start, end, block) with
    block ``block`` mapping layer start -> ... -> end. Contiguous phases: one run per phase, (p[0] - 1, p[-1], b)."""
    block_of = {t: b for b, p in enumerate(phases) for t in p}
    runs: list[tuple[int, int, int]] = []
    for t in range(1, max(block_of) + 1):
        if runs and runs[-1][2] == block_of[t] and runs[-1][1] == t - 1:
            runs[-1] = (runs[-1][0], t, block_of[t])
        else:
            runs.append((t - 1, t, block_of[t]))
    return runs


def _layer_lists(phases) -> bool:
    """True for a non-empty list of non-empty lists of layer numbers (ints, not bools)."""
    return (isinstance(phases, list) and bool(phases) and all(
        isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p) for p in phases))


def phases_from_analysis(path: str | Path, k: int | None = None, depth: int | None = None) -> list[list[int]]:
    """Phases from a file: ``raptor analyze``'s analysis.json (its chosen DP segmentation, or the DP one for
    ``k``) or a phases file holding a JSON array of layer lists, e.g. ``[[1,2,3],[4,5,6]]``. ``depth``: the
    teacher's depth, when known (an analysis.json carries its own). Anything else is one clear error."""
    try:
        a = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RaptorError(f"cannot read phases file {path}: {e}") from None
    if isinstance(a, list):  # a phases file
        if not _layer_lists(a):
            raise RaptorError(f"phases file {path} must hold a non-empty JSON array of non-empty lists of layer "
                              f"numbers, e.g. [[1,2,3],[4,5,6]]; got {json.dumps(a)[:80]}")
        if k is not None and k != len(a):
            raise RaptorError(f"--k {k} contradicts the {len(a)} phases in {path}")
        if depth is None:
            depth = max(x for p in a for x in p)
        return validate_phases(a, depth)
    if not isinstance(a, dict):
        raise RaptorError(f"{path} is neither an analysis.json from raptor analyze nor a JSON array of phases")
    try:
        if k is None:
            phases = a["chosen"]["phases"]
        else:
            dp = a["segmentations"][a["primary_metric"]]["dp"]
            if str(k) not in dp:
                raise RaptorError(f"{path} has no k={k} segmentation (available: {sorted(dp, key=int)})")
            phases = dp[str(k)]["phases"]
        file_depth = int(a["teacher"]["depth"])
    except (KeyError, TypeError, ValueError) as e:
        raise RaptorError(f"{path} is not an analysis.json from raptor analyze (missing or bad {e})") from None
    if not _layer_lists(phases):
        raise RaptorError(f"{path} is not an analysis.json from raptor analyze (its phases are {phases!r})")
    if depth is not None and depth != file_depth:
        raise RaptorError(f"{path} describes a teacher of depth {file_depth}, this teacher has {depth} blocks")
    if phases[0][0] != 1:  # analysis over a layer subset: extend to cover 1..depth
        phases = [list(range(1, phases[0][0])) + phases[0]] + phases[1:]
    return validate_phases(phases, file_depth)


def parse_phases(text: str | None) -> list[list[int]] | None:
    """'1-7/8-11/12', '1,3,5/2,4,6' (non-contiguous phases) or a JSON array '[[1,...,7],[8,...,11],[12]]' -> lists
    of layers; None when ``text`` is unset or names a file (an analysis.json)."""
    if text is None:
        return None
    if not text.strip():
        raise RaptorError(f"empty --phases: give e.g. {PHASES_USAGE}")
    if text.lstrip().startswith("[") and not Path(text).exists():
        try:
            phases = json.loads(text)
        except ValueError:
            phases = None
        if not _layer_lists(phases):
            raise RaptorError(f"bad --phases {text!r}: a JSON array of non-empty lists of layer numbers, "
                              f"e.g. [[1,2,3],[4,5,6]]")
        return phases
    if Path(text).exists() or not re.fullmatch(r"[0-9/,\-\s]+", text):
        return None
    phases = []
    for part in text.split("/"):  # a phase: layers and ranges joined by commas, e.g. 1-3,7 (non-contiguous allowed)
        layers: list[int] = []
        for item in part.split(","):
            lo, _, hi = item.strip().partition("-")
            try:
                a, b = int(lo), int(hi or lo)
            except ValueError:
                raise RaptorError(f"bad --phases {text!r}: use e.g. 1-7/8-11/12, 1,3,5/2,4,6 or an analysis.json") \
                    from None
            if b < a:
                raise RaptorError(f"bad --phases {text!r}: {item.strip()!r} runs backwards")
            layers += range(a, b + 1)
        phases.append(sorted(layers))
    return phases


@dataclass(frozen=True)
class PhaseSpec:
    """A ``--phases`` / ``--k`` request, parsed once: explicit ``layers``, a ``file`` (an analysis.json or a JSON
    array of layer lists, optionally its DP phases for ``k``), or ``k`` alone with ``method`` ``dp`` (the caller
    segments its data) or ``equal``. Configs store its fields flat (``phases``, ``phases_file``, ``k``,
    ``phase_method``: :meth:`fields`), so that a run's config.yaml reads the same as before."""

    layers: list[list[int]] | None = None
    file: str | None = None
    k: int | None = None
    method: str = "dp"

    @classmethod
    def parse(cls, text: str | None, k: int | None = None) -> "PhaseSpec":
        """From the command line: ``--phases`` (explicit layers, a file, or ``equal``) and ``--k``."""
        if text is not None and text.strip().lower() == "equal":
            return cls(k=k, method="equal")
        layers = parse_phases(text)
        return cls(layers=layers, file=str(text) if text and layers is None else None, k=k)

    @classmethod
    def of(cls, cfg) -> "PhaseSpec":
        """The spec a config stores flat (``phases``, ``phases_file``, and ``k`` / ``phase_method`` if it has them)."""
        return cls(cfg.phases, cfg.phases_file, getattr(cfg, "k", None), getattr(cfg, "phase_method", "dp"))

    def fields(self) -> dict:
        """The flat config fields of this spec (see the class doc)."""
        return {"phases": self.layers, "phases_file": self.file, "k": self.k, "phase_method": self.method}

    @property
    def given(self) -> bool:
        """True when the spec names phases (layers or a file), not only a number of them."""
        return self.layers is not None or self.file is not None

    @property
    def from_data(self) -> bool:
        """True when the phases are the DP segmentation of the caller's data (``k`` alone)."""
        return not self.given and self.method == "dp" and self.k is not None

    def check(self) -> None:
        """Consistency of the request itself (no file is read): :meth:`check_request`, then :meth:`check_layers`."""
        self.check_request()
        self.check_method()
        self.check_layers()

    def check_request(self) -> None:
        """Something is asked for (``check_method``: in a known way)."""
        if self.method == "equal" and (self.k is None or self.given):
            raise RaptorError("--phases equal needs --k K (and no other phases)")
        if not self.given and self.k is None:
            raise RaptorError("give --phases (an analysis.json, a phases file or e.g. 1-7/8-12) or --k K")

    def check_method(self) -> None:
        if self.method not in PHASE_METHODS:
            raise RaptorError(f"unknown phase method {self.method!r} (use {', '.join(PHASE_METHODS)})")

    def check_layers(self) -> None:
        """Explicit layers are non-empty lists, as many as ``k`` when both are given."""
        if self.layers is not None and (not self.layers or any(not p for p in self.layers)):
            raise RaptorError(f"--phases must be non-empty lists of layers, got {self.layers}")
        if self.layers is not None and self.k is not None and self.k != len(self.layers):
            raise RaptorError(f"--k {self.k} contradicts the {len(self.layers)} explicit --phases")

    def count(self, depth: int | None = None) -> int | None:
        """The number of phases, known before any data is read (a file is read; ``depth`` checks it)."""
        if self.layers is not None:
            return len(self.layers)
        if self.file is not None:
            return len(phases_from_analysis(self.file, self.k, depth))
        return self.k

    def resolve(self, depth: int, segment: Callable[[int], list[list[int]]] | None = None) -> list[list[int]]:
        """The layer lists for a teacher of ``depth`` blocks. ``segment(k)``: the DP phases of the caller's data,
        needed only when :attr:`from_data`."""
        if self.layers is not None:
            return validate_phases(self.layers, depth)
        if self.file is not None:
            return phases_from_analysis(self.file, self.k, depth)
        if self.k is not None and self.method == "equal":
            return equal_phases(depth, self.k)
        if self.k is not None and segment is not None:
            if not 1 <= self.k <= depth:
                raise RaptorError(f"--k must lie in 1..{depth} (the teacher's depth), got {self.k}")
            return validate_phases(segment(self.k), depth)
        raise RaptorError("give --phases (an analysis.json, a phases file or e.g. 1-7/8-12) or --k K")


# ---- partitions: labels, boundaries, enumeration, text ---------------------------------------------------------------

def labels_from_phases(phases: list[list[int]], n: int) -> np.ndarray:
    lab = np.full(n, -1)
    for p, members in enumerate(phases):
        lab[members] = p
    if (lab < 0).any():
        raise RaptorError("phases do not cover every layer")
    return lab


def is_contiguous(phases: list[list[int]]) -> bool:
    return all(p == list(range(p[0], p[-1] + 1)) for p in phases)


def contiguous_partitions(depth: int, k: int, min_size: int = 1):
    """Every partition of layers 1..depth into k contiguous phases of at least ``min_size`` layers, in the order of
    their cut points (the null of the partition tests: boundaries placed anywhere)."""
    for cuts in itertools.combinations(range(1, depth), k - 1):
        edges = (0,) + cuts + (depth,)
        if min(np.diff(edges)) >= min_size:
            yield [list(range(edges[i] + 1, edges[i + 1] + 1)) for i in range(k)]


def format_phase(p: list[int]) -> str:
    """'1–7' (one layer: '12'); a non-contiguous phase as '{1,3,5}'."""
    if list(p) != list(range(p[0], p[-1] + 1)):
        return "{" + ",".join(map(str, p)) + "}"
    return str(p[0]) if len(p) == 1 else f"{p[0]}–{p[-1]}"


def format_phases(phases) -> str:
    """'1–7 / 8–12'; non-contiguous phases as '{1,3,5} / {2,4,6}'."""
    return " / ".join(format_phase(p) for p in phases)


def boundaries_of(phases: list[list[int]]) -> list[int]:
    """The first index of every phase after the first (a boundary lies just before it)."""
    return [p[0] for p in sorted(phases)[1:]]


def parse_layers(text: str | None) -> list[int] | None:
    """A layer list (not a partition: ``--layers``, ``--inject``): '0-12', '0,6,12', '3', or None / '' / 'all' (all
    layers)."""
    if text is None or text in ("", "all"):
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise RaptorError(f"bad --layers {text!r}: use e.g. 0-12 or 0,6,12") from None
    return out
