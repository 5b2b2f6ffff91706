"""The notebook API: the toolkit as Python calls that return objects, re-exported from :mod:`raptor`.

    import raptor
    teacher = raptor.load_teacher("bundled:dinov2-s")
    traj = teacher.trace(["photo.jpg", ...])                # a Trajectory: tensor, layer numbers, layout
    sim = raptor.similarity(traj)                            # the numbers `raptor analyze` computes
    sim.phases(2), sim.null_test(2)                          # layer numbers; the phases against the lag-only null
    model = raptor.fit(teacher, data="bundled:natural", phases=sim.phases(2), steps1=40, steps2=20)

The CLI commands run through the same code: a library call computes what the command computes, but writes nothing
unless given ``out`` and changes nothing process-wide (the allocator tuning and the figure backend are the
command's). Messages go to the ``raptor`` logger (``logging.getLogger("raptor")``); errors are
:class:`~raptor.errors.RaptorError` naming options as keywords.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from raptor.distributed import resolve_device
from raptor.errors import RaptorError
from raptor.phases import PhaseSpec, choose_k, contiguous_segmentation, phase_null_test
from raptor.similarity import BASE_GROUPS, SimilarityAccumulator, SimilarityResult
from raptor.teachers import Teacher
from raptor.teachers import load_teacher as _load_spec
from raptor.teachers.base import Trajectory

log = logging.getLogger("raptor")

PRIMARY = "paper_cosine_distance"


def load_teacher(spec_or_module, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 head: str | None = None) -> Teacher:
    """A frozen teacher in eval mode: a spec (``bundled:dinov2-s``, ``hf:<id or dir>``, ``timm:<name>``,
    ``open_clip:<arch>``, ``dinov2-pth:<file>``, ``tiny:<family>``, ``planted:<k>``), an already built
    :class:`Teacher` (e.g. ``Teacher.from_modules(...)``), or a timm VisionTransformer / open_clip model object
    (wrapped by their adapters); moved to ``device`` and cast to ``dtype`` when given."""
    if isinstance(spec_or_module, (str, Path)):
        teacher = _load_spec(str(spec_or_module), head=head)
    elif head is not None:
        raise RaptorError("head is only for teacher specs (dinov2-pth:/hf: DINOv2 teachers)")
    elif isinstance(spec_or_module, Teacher):
        teacher = spec_or_module
    elif _looks_like(spec_or_module, "patch_embed", "blocks", "norm"):  # a timm VisionTransformer
        from raptor.teachers.timm_vit import TimmTeacher

        teacher = TimmTeacher(spec_or_module, spec=f"module:{type(spec_or_module).__name__}")
    elif _looks_like(getattr(spec_or_module, "visual", spec_or_module), "conv1", "transformer", "ln_post"):
        from raptor.teachers.open_clip_vit import OpenClipTeacher  # an open_clip model or its image tower

        teacher = OpenClipTeacher(getattr(spec_or_module, "visual", spec_or_module),
                                  spec=f"module:{type(spec_or_module).__name__}")
    else:
        raise RaptorError(f"load_teacher takes a teacher spec, a raptor Teacher, a timm VisionTransformer or an "
                          f"open_clip model, got {type(spec_or_module).__name__}; wrap your own model with "
                          "raptor.Teacher.from_modules(embed, blocks, final_norm, ...)")
    teacher.eval().requires_grad_(False)
    if device is not None:
        teacher.to(resolve_device(str(device)))  # a missing GPU is one clear error
    if dtype is not None:
        teacher.to(dtype)
    return teacher


def _looks_like(module, *names: str) -> bool:
    return isinstance(module, torch.nn.Module) and all(hasattr(module, n) for n in names)


class Similarity:
    """Every layer-pair similarity matrix of a set of trajectories (``raptor analyze``'s numbers), with the phase
    tools on top: :meth:`matrix`, :meth:`phases` (layer numbers), :meth:`null_test`, :meth:`plot`."""

    def __init__(self, result: SimilarityResult):
        self.result = result

    @property
    def layers(self) -> list[int]:
        return list(self.result.layers)

    @property
    def n_images(self) -> int:
        return self.result.n_images

    @property
    def metrics(self) -> list[str]:
        return list(self.result.matrices)

    def matrix(self, metric: str = PRIMARY) -> np.ndarray:
        """(layers, layers) for ``metric`` (rows and columns in :attr:`layers` order)."""
        self._check(metric)
        return self.result.matrices[metric].copy()

    def distance(self, metric: str = PRIMARY) -> np.ndarray:
        """The metric as a distance (1 - score for scores), symmetric with a zero diagonal: what segmentation uses."""
        self._check(metric)
        return self.result.distance(metric)

    def phases(self, k: int | None = None, metric: str = PRIMARY, method: str = "dp", k_rule: str = "gain",
               k_frac: float = 0.1) -> list[list[int]]:
        """Contiguous phases in layer numbers: the DP segmentation into ``k`` phases (``k=None``: the k that
        ``k_rule`` chooses, as analyze does), or ``method="maxcut"``: the paper's recursive max-cut (``k`` is then
        the number of phases wanted)."""
        D = self.distance(metric)
        n = len(self.layers)
        if k is not None and not 1 <= k <= n:
            raise RaptorError(f"k must lie in 1..{n} (the layers compared), got {k}")
        if method == "dp":
            dp = contiguous_segmentation(D, k_max=k or n)
            rows = dp.phases(k if k is not None else choose_k(dp, k_rule, k_frac))
        elif method == "maxcut":
            if k is None:
                raise RaptorError("method='maxcut' needs k")
            rows = sorted(_maxcut_k(D, k))
        else:
            raise RaptorError(f"unknown phase method {method!r} (use dp or maxcut)")
        return [[self.layers[i] for i in p] for p in rows]

    def null_test(self, k: int, n_resamples: int = 200, seed: int = 0) -> dict:
        """The k phases against the lag-only (Toeplitz) null, with a CI over images and split-half stability, as
        ``raptor analyze`` reports them (needs the per-image matrices of ``paper_cosine_distance``)."""
        per_image = self.result.per_image.get(PRIMARY)
        if per_image is None or len(per_image) < 2:
            raise RaptorError("the null test needs at least 2 images")
        if k < 2:
            raise RaptorError("the null test needs k >= 2 (k = 1 has no boundary)")
        t = phase_null_test(per_image, k, n_resamples, seed)
        t["phases"] = [[self.layers[i] for i in p] for p in t["phases"]]
        if t.get("split_half"):
            t["split_half"]["phases"] = [[self.layers[i] for i in p] for p in t["split_half"]["phases"]]
        bs = t.get("boundary_stability")
        if bs:
            bs["boundaries"] = [self.layers[b] for b in bs["boundaries"]]
        return t

    def plot(self, metric: str = PRIMARY, phases: list[list[int]] | None = None, ax=None):
        """The matrix as a heat map (optionally with phase boundaries); returns the matplotlib Axes."""
        import matplotlib.pyplot as plt

        M = self.matrix(metric)
        if ax is None:
            _, ax = plt.subplots(figsize=(4.2, 3.6))
        im = ax.imshow(M, cmap="viridis_r" if self.result.kinds[metric] == "distance" else "viridis")
        ticks = range(len(self.layers))
        ax.set_xticks(list(ticks), [str(x) for x in self.layers], fontsize=7)
        ax.set_yticks(list(ticks), [str(x) for x in self.layers], fontsize=7)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        ax.set_title(f"{metric} ({self.n_images} images)", fontsize=9)
        for p in (phases or [])[:-1]:
            b = self.layers.index(p[-1]) + 0.5
            ax.axhline(b, color="w", lw=1)
            ax.axvline(b, color="w", lw=1)
        ax.figure.colorbar(im, ax=ax, shrink=0.8)
        return ax

    def _check(self, metric: str) -> None:
        if metric not in self.result.matrices:
            raise RaptorError(f"unknown metric {metric!r} (available: {', '.join(self.result.matrices)})")

    def __repr__(self) -> str:
        return f"Similarity({self.n_images} images, layers {self.layers}, {len(self.metrics)} metrics)"


def _check_options(cls: type, options: dict, what: str) -> None:
    """Every keyword in ``options`` is a field of the command's config ``cls`` (one error naming the first that is
    not)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(options) - fields)
    if bad:
        raise RaptorError(f"unknown {what} option {bad[0]!r} ({cls.__name__} fields: {', '.join(sorted(fields))})")


def _output(out, prefix: str):
    """``out`` itself, or a temporary folder that is removed afterwards (a library call leaves nothing behind)."""
    return tempfile.TemporaryDirectory(prefix=prefix) if out is None else contextlib.nullcontext(out)


def _maxcut_k(D: np.ndarray, k: int) -> list[list[int]]:
    from raptor.analyze import maxcut_by_k

    found = maxcut_by_k(D, [k], 2)
    if k not in found:
        raise RaptorError(f"the recursive max-cut finds no {k} phases here")
    return found[k]["phases_unsorted"]


def similarity(source, *, layers: Iterable[int] | str | None = None, cka_groups: Iterable[str] = ("auto",),
               batch_size: int = 16, limit: int | None = None, device: str | torch.device | None = None) -> Similarity:
    """Every similarity matrix of ``source``: a :class:`Trajectory`, an iterable of them (one image stream), or a
    trajectory store (its path). ``layers``: layer numbers (default: 1..L, as ``raptor analyze``; ``"all"`` adds
    the embedding, layer 0). ``cka_groups``: the token groups whose CKA is computed (``auto``: cls and registers
    where the teacher has them, as analyze; ``patches`` and ``all`` cost about a forward pass each). The
    accumulation is exact (float64 sums of per-batch float32 products: analyze's numbers to 1e-12 at analyze's batch
    size, 16); ``device``: where the products and the float64 sums are computed (default: the CPU; on Apple mps
    the float64 sums stay on the CPU)."""
    device = None if device is None else resolve_device(str(device))  # a missing GPU is one clear error
    if isinstance(source, (str, Path)) or type(source).__name__ == "TrajectoryStore":
        return _similarity_of_store(source, layers, cka_groups, batch_size, limit, device)
    trajs = [source] if isinstance(source, Trajectory) else source
    acc = None
    for t in trajs:
        if not isinstance(t, Trajectory):
            raise RaptorError(f"similarity takes Trajectory objects or a store, got {type(t).__name__}")
        want = _layers_of(layers, t.layers)
        missing = [x for x in want if x not in t.layers]
        if missing:
            raise RaptorError(f"layers {missing} are not in the trajectory (it has {list(t.layers)})")
        if acc is None:
            acc = SimilarityAccumulator(t.layout, want, cka_groups=_groups(cka_groups, t.layout), device=device)
        elif t.layout != acc.layout or list(want) != acc.layers:
            raise RaptorError("every trajectory of one similarity must have the same layout and layers")
        sel = t.select(want).tensor.detach().cpu()
        for i in range(0, len(t), batch_size):
            acc.update(sel[i:i + batch_size])
    if acc is None:
        raise RaptorError("no trajectories given")
    return Similarity(acc.result())


def _layers_of(layers, have) -> list[int]:
    if layers is None:
        return [x for x in have if x != 0]
    if isinstance(layers, str):
        if layers != "all":
            raise RaptorError(f"layers must be 'all' or layer numbers, got {layers!r}")
        return list(have)
    return sorted({int(x) for x in layers})


def _groups(groups, layout) -> tuple[str, ...]:
    from raptor.analyze import resolve_cka_groups

    return resolve_cka_groups(tuple(groups), layout)


def _similarity_of_store(path, layers, cka_groups, batch_size: int, limit: int | None, device=None) -> Similarity:
    from raptor.trajectories import StoreTrajectories

    if isinstance(path, (str, Path)):
        st = StoreTrajectories.open(path, command="similarity", limit=limit)
    else:
        st = StoreTrajectories(path, limit=limit)
    want = _layers_of(layers, list(range(st.depth + 1)))
    st.require_layers(want)
    acc = SimilarityAccumulator(st.layout, want, cka_groups=_groups(cka_groups, st.layout), device=device)
    for b in st.batches(batch_size, want):
        acc.update(b.traj)
    return Similarity(acc.result())


def fit(teacher, *, data: str | None = None, store: str | Path | None = None, phases=None, k: int | None = None,
        out: str | Path | None = None, resume: bool = False, progress: bool = False, **options):
    """Train a Raptor surrogate of ``teacher`` (a spec or a loaded :class:`Teacher`) and return the
    :class:`~raptor.surrogate.model.RaptorModel` (its run's metrics in ``model.fit_metrics``).

    ``phases``: layer lists (``[[1, 2, 3], [4, ...]]``), a spec string (``"1-7/8-12"``), an analysis.json path or
    ``"equal"`` (with ``k``); with ``k`` alone the phases are the DP segmentation of the training images, as the
    command does. ``options``: any other :class:`~raptor.surrogate.config.FitConfig` field (``steps1``, ``lr``,
    ``val_data``, ...). ``out=None`` trains in a temporary directory that is removed: nothing is left on disk."""
    from raptor.surrogate.config import FitConfig
    from raptor.surrogate.fit import run_fit
    from raptor.surrogate.run_dir import FitRun

    _check_options(FitConfig, options, "fit")
    loaded = teacher if isinstance(teacher, Teacher) else None
    spec = loaded.spec if loaded is not None else str(teacher)
    if not spec:
        raise RaptorError("this teacher has no spec to record in the run; give it one (teacher.spec = 'custom:name')")
    if isinstance(phases, (list, tuple)):
        phase_fields = {"phases": [list(map(int, p)) for p in phases], "k": k}
    else:
        phase_fields = PhaseSpec.parse(None if phases is None else str(phases), k).fields()
    if data is None and store is None:
        raise RaptorError("give data (an image source such as bundled:natural) or store (a trajectory store)")
    base = {"probe_data": None}  # the command's default probe pass is opt-in here: probe_data="bundled:digits"
    with _output(out, "raptor-fit-") as where:
        cfg = FitConfig(**{**base, **options, **phase_fields, "teacher": spec, "data": data if store is None else None,
                           "store": None if store is None else str(store), "out": str(where)})
        metrics = run_fit(cfg, resume=resume, progress=progress, teacher=loaded)
        model = FitRun(where).model(loaded)
    model.fit_metrics = metrics
    return model


class ProbeResult:
    """The records of a probe run (one per seed): ``records``, :meth:`table` (markdown), ``out``."""

    def __init__(self, records: list[dict], out: Path | None):
        self.records, self.out = records, out

    def metric(self) -> tuple[str, float, float]:
        """(name, mean over seeds, std over seeds) of the task's headline test metric."""
        vals = np.array([r["value"] for r in self.records], float)
        return self.records[0]["metric"], float(vals.mean()), float(vals.std())

    def table(self) -> str:
        """The records as ``raptor table`` prints them (markdown)."""
        from raptor.probes.table import aggregate, markdown

        return markdown(*aggregate(self.records))

    def __repr__(self) -> str:
        return f"ProbeResult({len(self.records)} records, out={self.out})"


def probe(backbone: str | Path, *, task: str = "cls", data: str = "bundled:digits", out: str | Path | None = None,
          progress: bool = False, **options) -> ProbeResult:
    """A linear probe of ``backbone`` (a teacher spec, ``pixels``, or a finished fit run's directory) on ``data``;
    ``options``: any other :class:`~raptor.probes.run.ProbeConfig` field (``seeds``, ``limit``, ``layer``, ...)."""
    from raptor.probes.run import ProbeConfig, run_probe

    _check_options(ProbeConfig, options, "probe")
    if "seeds" in options:
        options["seeds"] = tuple(options["seeds"])
    with _output(out, "raptor-probe-") as where:
        records = run_probe(ProbeConfig(task=task, backbone=str(backbone), data=data, out=str(where), **options),
                            progress=progress)
    return ProbeResult(records, None if out is None else Path(out))


class DynamicsResult:
    """A dynamics run: ``data`` (its dynamics.json), ``findings`` (each criterion's verdict), ``out`` (figures and
    report when ``out`` was given)."""

    def __init__(self, data: dict, out: Path | None):
        self.data, self.out = data, out

    @property
    def findings(self) -> dict:
        return self.data.get("findings", {})

    def __repr__(self) -> str:
        return f"DynamicsResult({len(self.findings)} findings, out={self.out})"


def dynamics(teacher: str = "bundled:dinov2-s", *, surrogate: str | Path | None = None,
             data: str = "bundled:photos", out: str | Path | None = None, progress: bool = False,
             **options) -> DynamicsResult:
    """The dynamical analyses of ``teacher`` (and of a fit run ``surrogate``) on ``data``; ``options``: any other
    :class:`~raptor.dynamics.run.DynamicsConfig` field (``limit``, ``phases``, ``null_draws``, ...)."""
    from raptor.dynamics.run import DynamicsConfig, run_dynamics

    _check_options(DynamicsConfig, options, "dynamics")
    if isinstance(options.get("phases"), str):
        spec = PhaseSpec.parse(options.pop("phases"))
        if spec.method != "dp" or spec.k is not None:
            raise RaptorError("dynamics takes phases as layers (e.g. '1-6/7-12') or an analysis.json")
        options.update(phases=spec.layers, phases_file=spec.file)
    with _output(out, "raptor-dynamics-") as where:
        result = run_dynamics(DynamicsConfig(teacher=str(teacher), surrogate=None if surrogate is None else
                                             str(surrogate), data=data, out=str(where), **options),
                              progress=progress)
    return DynamicsResult(result, None if out is None else Path(out))


__all__ = ["BASE_GROUPS", "DynamicsResult", "ProbeResult", "Similarity", "Trajectory", "dynamics", "fit",
           "load_teacher", "log", "probe", "similarity"]
