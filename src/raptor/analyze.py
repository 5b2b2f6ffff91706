"""``raptor analyze``: layer similarity matrices and phases of depth for a teacher over a dataset.

Writes ``OUT/analysis.json`` (schema: ``raptor/schemas/analysis.schema.json``), ``OUT/config.yaml``, heatmaps
``OUT/*.png`` with phase boundaries and ``OUT/report.md``. ``analysis.json`` is written last (atomically), so a
directory without it is an unfinished run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from raptor import plots
from raptor.config import atomic_write_text, save_config, to_dict
from raptor.data import open_source
from raptor.data.sampling import check_sample_order
from raptor.data.transforms import check_transform
from raptor.distributed import resolve_device
from raptor.errors import RaptorError, check_positive
from raptor.lifecycle import command_run
from raptor.phases import (
    MAXCUT_VARIANTS,
    choose_k,
    contiguous_segmentation,
    format_phases,
    is_contiguous,
    null_matrices,
    phase_metrics,
    phase_null_test,
    recursive_max_cut,
)
from raptor.progress import progress_bar
from raptor.similarity import GROUPS as CKA_GROUPS
from raptor.similarity import SimilarityAccumulator, SimilarityResult
from raptor.teachers import load_teacher
from raptor.teachers.base import check_autocast
from raptor.trajectories import LiveTrajectories, StoreTrajectories

SCHEMA_VERSION = 1
PRIMARY = "paper_cosine_distance"


@dataclass
class AnalyzeConfig:
    teacher: str = "bundled:dinov2-s"
    data: str = "bundled:photos"
    out: str = "runs/analyze"
    store: str | None = None
    limit: int | None = None
    sample: str = "random"  # --limit: a seeded random sample (stratified by class) | sorted: the first N
    sample_seed: int = 1
    batch_size: int = 16
    image_size: int | None = None
    transform: str = "paper"  # paper | model (the teacher's own processor config; Teacher.eval_transform)
    layers: list[int] | None = None  # default: 1..L (block outputs; the paper's convention)
    cka_groups: tuple[str, ...] = ("auto",)  # auto = cls and registers where the teacher has them
    cka_dtype: str = "float64"
    k_min: int = 2
    k_max: int = 6
    k_rule: str = "gain"
    k_frac: float = 0.1
    maxcut_fracs: tuple[float, ...] = (0.2, 0.1, 0.09)  # the paper's Raptor2 / Raptor3 / Raptor4 settings
    maxcut_min_size: int = 2
    maxcut_variant: str = "official"  # official notebook semantics | balanced (both sides >= min_size)
    autocast: str | None = None
    head: str | None = None
    null_resamples: int = 200  # bootstrap / null resamples of the phase test (0: no test)
    device: str = "auto"  # the teacher's forward and the similarity products (float64 sums; on mps: on the CPU)
    null_seed: int = 0

    def check(self) -> None:
        """Cheap checks of the settings themselves, before any store, teacher, data or output is touched."""
        check_positive(limit=self.limit, batch_size=self.batch_size, image_size=self.image_size,
                       k_max=self.k_max, k_min=self.k_min, maxcut_min_size=self.maxcut_min_size)
        if self.k_max < self.k_min:
            raise RaptorError(f"bad k range {self.k_min}..{self.k_max}")
        check_transform(self.transform)
        if self.store and self.transform != "paper":
            raise RaptorError("--transform is for live data (--data); a --store keeps the transform it was "
                             "extracted with")
        if not 0 <= self.null_resamples <= 100_000:
            raise RaptorError(f"--null-resamples must lie in 0..100000, got {self.null_resamples}")
        if self.k_rule not in ("gain", "elbow"):
            raise RaptorError(f"unknown --k-rule {self.k_rule!r} (use gain or elbow)")
        if not 0 <= self.k_frac < 1:
            raise RaptorError(f"--k-frac must lie in [0, 1), got {self.k_frac}")
        if self.maxcut_variant not in MAXCUT_VARIANTS:
            raise RaptorError(f"unknown --maxcut-variant {self.maxcut_variant!r} (use {', '.join(MAXCUT_VARIANTS)})")
        check_sample_order(self.sample)
        if self.cka_dtype not in ("float64", "float32"):
            raise RaptorError("cka dtype must be float64 or float32")
        bad = [g for g in self.cka_groups if g != "auto" and g not in CKA_GROUPS]
        if bad or not self.cka_groups:
            raise RaptorError(f"bad --cka-groups {','.join(self.cka_groups)!r} (use auto or a list of "
                              f"{', '.join(CKA_GROUPS)})")
        if self.layers is not None and len(self.layers) < 2:
            raise RaptorError("need at least 2 layers to analyze")
        check_autocast(self.autocast)


@dataclass
class AnalysisOutputs:
    out: Path
    result: SimilarityResult
    analysis: dict = field(default_factory=dict)


def resolve_cka_groups(groups, layout) -> tuple[str, ...]:
    """``auto`` -> the cheap groups this teacher has (cls, registers); explicit groups are kept as asked."""
    if tuple(groups) == ("auto",):
        return tuple(g for g, n in (("cls", layout.n_cls), ("registers", layout.n_registers)) if n)
    return tuple(groups)


def _accumulate(cfg: AnalyzeConfig, trajs, layers, progress: bool):
    """One pass over the trajectories (a store's or a live teacher's) into the similarity accumulator."""
    layout = trajs.layout
    acc = SimilarityAccumulator(layout, layers, cka_groups=resolve_cka_groups(cfg.cka_groups, layout),
                                cka_dtype=getattr(torch, cfg.cka_dtype), device=resolve_device(cfg.device))
    name = "analyze" if trajs.source == "live" else "analyze (store)"
    with progress_bar(len(trajs), name, "img", enabled=progress) as bar:
        for b in trajs.batches(cfg.batch_size, layers, bar):
            acc.update(b.traj)
    return acc, trajs.describe(acc.n)


class PhaseFinder:
    """The phases ``raptor analyze`` reports for a given k (the contiguous DP segmentation of its primary metric
    over layers 1..L), accumulated batch by batch from full trajectories (layers 0..L): what ``raptor fit --k K``
    uses when it is given no phases."""

    def __init__(self, layout, depth: int):
        self.depth = depth
        self.acc = SimilarityAccumulator(layout, list(range(1, depth + 1)), cka_groups=())

    def update(self, traj: torch.Tensor) -> None:
        self.acc.update(traj[:, 1:self.depth + 1])

    def choose(self, k: int, record: Path | None = None) -> dict:
        """{"phases", "how", ...} for ``k``; written to ``record`` (a phases.json) when given."""
        if not 1 <= k <= self.depth:
            raise RaptorError(f"--k must lie in 1..{self.depth} (the teacher's depth), got {k}")
        res = self.acc.result()
        D = res.distance(PRIMARY)
        dp = contiguous_segmentation(D, k_max=k)
        phases = [[res.layers[i] for i in p] for p in dp.phases(k)]
        info = {"phases": phases, "method": "dp", "metric": PRIMARY, "k": k, "n_images": int(res.n_images),
                "images": "training images (the held-out validation images excluded), evenly spaced",
                "how": f"DP segmentation of {PRIMARY} over {res.n_images} training images, as raptor analyze",
                "metrics": phase_metrics(D, dp.phases(k)), "within_cost": float(dp.costs[k - 1]),
                "matrix": res.matrices[PRIMARY].tolist()}
        if record is not None:
            atomic_write_text(record, json.dumps(info, indent=1))
        return info


def maxcut_by_k(D: np.ndarray, ks, min_size: int, variant: str = "official") -> dict[int, dict]:
    """Recursive max-cut segmentations for each k, found by sweeping frac from 0.5 down to 0 (largest frac
    that yields k clusters). Exact max-cuts of repeated clusters are computed once (memoised)."""
    cache: dict = {}
    out: dict[int, dict] = {}
    for frac in np.round(np.linspace(0.5, 0.0, 201), 4):
        parts = recursive_max_cut(D, frac=float(frac), min_size=min_size, variant=variant, cache=cache)
        k = len(parts)
        if k in ks and k not in out:
            out[k] = {"frac": float(frac), "phases_unsorted": parts}
        if len(out) == len(ks):
            break
    return out


def run_analyze(cfg: AnalyzeConfig, progress: bool = True) -> AnalysisOutputs:
    """Validate, lock ``cfg.out``, compute, and move the results in (``analysis.json`` last): a failed run leaves
    an earlier run's results in ``cfg.out`` untouched and never a directory it created."""
    cfg.check()
    resolve_device(cfg.device)  # a missing GPU is refused before anything is read or written
    out = Path(cfg.out)
    st = src = None
    if cfg.store:  # cheap checks first: the store or the data, then the output directory, then the teacher
        st = StoreTrajectories.open(cfg.store, command="analyze", limit=cfg.limit, seed=cfg.sample_seed,
                                    order=cfg.sample)
    else:
        src = open_source(cfg.data).subset(cfg.limit, cfg.sample_seed, cfg.sample)
    with command_run(out, final="analysis.json") as run:
        return _run_analyze(cfg, st, src, run.stage, progress)


def _run_analyze(cfg: AnalyzeConfig, st, src, stage: Path, progress: bool) -> AnalysisOutputs:
    t0 = time.perf_counter()
    if st is not None:
        layers = cfg.layers or list(range(1, st.depth + 1))
        st.require_layers(layers)
        acc, info = _accumulate(cfg, st, layers, progress)
    else:
        teacher = load_teacher(cfg.teacher, head=cfg.head).to(resolve_device(cfg.device))
        layers = teacher.resolve_layers(cfg.layers or range(1, teacher.depth + 1))
        acc, info = _accumulate(cfg, LiveTrajectories(teacher, src, cfg.image_size, cfg.autocast, cfg.transform),
                                 layers, progress)
    if len(layers) < 2:
        raise RaptorError("need at least 2 layers to analyze")
    res = acc.result()
    seconds_pass = time.perf_counter() - t0

    ks = list(range(cfg.k_min, min(cfg.k_max, len(layers)) + 1))
    metrics: dict[str, dict] = {}
    for name, M in res.matrices.items():
        metrics[name] = {"kind": res.kinds[name], "description": res.descriptions[name], "matrix": M.tolist()}

    def to_layers(phases):
        return [[layers[i] for i in p] for p in phases]

    seg: dict[str, dict] = {}
    for name in res.matrices:
        D = res.distance(name)
        dp = contiguous_segmentation(D, k_max=max(ks))
        chosen = choose_k(dp, cfg.k_rule, cfg.k_frac)
        seg[name] = {
            "distance": "matrix" if res.kinds[name] == "distance" else "1 - matrix",
            "dp": {str(k): {"phases": to_layers(dp.phases(k)), "within_cost": float(dp.costs[k - 1]),
                            "metrics": phase_metrics(D, dp.phases(k))} for k in ks if k in dp.boundaries},
            "dp_cost_curve": [float(c) for c in dp.costs],
            "total_weight": dp.total,
            "chosen_k": {"rule": cfg.k_rule, "frac": cfg.k_frac, "k": int(chosen),
                         "elbow_k": int(choose_k(dp, "elbow"))},
        }
    # recursive max-cut on the primary metric (exact brute force; feasible to ~24 layers)
    Dp = res.distance(PRIMARY)
    if len(layers) <= 24:
        mc = maxcut_by_k(Dp, ks, cfg.maxcut_min_size, cfg.maxcut_variant)
        seg[PRIMARY]["maxcut"] = {
            str(k): {"frac": v["frac"], "phases": to_layers(sorted(v["phases_unsorted"])),
                     "phases_unsorted": to_layers(v["phases_unsorted"]),
                     "contiguous": is_contiguous(sorted(v["phases_unsorted"])),
                     "metrics": phase_metrics(Dp, sorted(v["phases_unsorted"]))} for k, v in sorted(mc.items())}
        paper = {f: recursive_max_cut(Dp, frac=f, min_size=cfg.maxcut_min_size, variant=cfg.maxcut_variant)
                 for f in cfg.maxcut_fracs}
        seg[PRIMARY]["maxcut_paper_fracs"] = {str(f): to_layers(sorted(p)) for f, p in paper.items()}
        seg[PRIMARY]["maxcut_paper_fracs_unsorted"] = {str(f): to_layers(p) for f, p in paper.items()}
        seg[PRIMARY]["maxcut_variant"] = cfg.maxcut_variant
    else:
        seg[PRIMARY]["maxcut"] = {}
        seg[PRIMARY]["maxcut_paper_fracs"] = {}
    # the phases against the lag-only (Toeplitz) null: significance, CI over images, boundary stability, split half
    null_tests, stability = {}, {}
    per_image = res.per_image.get(PRIMARY)
    if cfg.null_resamples and per_image is not None and len(per_image) >= 2:
        nulls = null_matrices(np.asarray(per_image, dtype=np.float64).mean(0))  # the same for every k
        with progress_bar(len(ks), "phase null tests", "k", enabled=progress) as bar:
            for k in [k for k in ks if k >= 2]:  # (k = 1 has no boundary to test)
                t = phase_null_test(per_image, k, cfg.null_resamples, cfg.null_seed, nulls)
                if t["split_half"]:
                    t["split_half"]["phases"] = to_layers(t["split_half"]["phases"])
                bs = t.pop("boundary_stability")
                null_tests[str(k)] = {**t, "phases": to_layers(t["phases"])}
                stability[str(k)] = {"boundaries": [layers[b] for b in bs["boundaries"]],
                                     "frequency": bs["frequency"],
                                     "all": {str(layers[i]): f for i, f in enumerate(bs["all"]) if i > 0}}
                bar.advance(1)
    chosen_k = seg[PRIMARY]["chosen_k"]["k"]
    chosen_phases = seg[PRIMARY]["dp"].get(str(chosen_k), {}).get("phases") or to_layers(
        contiguous_segmentation(Dp, chosen_k).phases(chosen_k))

    # figures
    figures = {}
    idx = {layer: i for i, layer in enumerate(layers)}
    for name, M in res.matrices.items():
        k = seg[name]["chosen_k"]["k"]
        dp_ph = [[idx[x] for x in p] for p in seg[name]["dp"][str(k)]["phases"]] if str(k) in seg[name]["dp"] else None
        mc_ph = None
        if name == PRIMARY and seg[name]["maxcut"].get(str(k)):
            mc_ph = [[idx[x] for x in p] for p in seg[name]["maxcut"][str(k)]["phases"]]
        fname = name.replace("/", "_") + ".png"
        plots.heatmap(stage / fname, M, layers, f"{name}  (DP k={k}: white boxes)", kind=res.kinds[name],
                      dp_phases=dp_ph, maxcut_phases=mc_ph, cbar_label=res.kinds[name])
        figures[name] = fname
    plots.cost_curve(stage / "dp_cost_curve.png", np.array(seg[PRIMARY]["dp_cost_curve"]), chosen_k,
                     seg[PRIMARY]["total_weight"], f"DP cost curve ({PRIMARY})")
    figures["dp_cost_curve"] = "dp_cost_curve.png"
    if null_tests:
        tests = {k: {**t, "boundary_stability": {"boundaries": [idx[b] for b in stability[k]["boundaries"]],
                                                 "all": [0.0] + list(stability[k]["all"].values())}}
                 for k, t in null_tests.items()}
        plots.phase_evidence(stage / "phase_evidence.png", res.matrices[PRIMARY], layers, tests,
                             f"{PRIMARY}, DP k={min(tests, key=int)} boundaries")
        figures["phase_evidence"] = "phase_evidence.png"

    analysis = {
        "schema_version": SCHEMA_VERSION,
        "config": to_dict(cfg),
        "teacher": info["teacher"],
        "data": {"spec": cfg.data if not cfg.store else None, "source": info["source"], "store": info.get("store"),
                 "n_images": info["n_images"], "skipped": info["skipped"], "transform": info["transform"],
                 "sample": info["sample"]},
        "layout": info["layout"],
        "layers": layers,
        "layer_convention": "layer 0 = embedding output; layer l = output of block l (before the final norm)",
        "primary_metric": PRIMARY,
        "metrics": metrics,
        "segmentations": seg,
        "chosen": {"metric": PRIMARY, "method": "dp", "k": chosen_k, "phases": chosen_phases},
        "null_tests": null_tests,
        "boundary_stability": stability,
        "figures": figures,
        "timing": {"similarity_pass_s": round(seconds_pass, 3), "total_s": round(time.perf_counter() - t0, 3)},
    }
    save_config(cfg, stage / "config.yaml")
    atomic_write_text(stage / "report.md", render_report(analysis))
    atomic_write_text(stage / "analysis.json", json.dumps(analysis, indent=1))
    return AnalysisOutputs(Path(cfg.out), res, analysis)


def null_verdict(t: dict, alpha: float = 0.05) -> str:
    """One sentence a reader can act on, for one k's null test (both statistics; says when the verdict flips)."""
    k = len(t["phases"])
    parts, sigs = [], []
    for r in [t, *t.get("alternatives", {}).values()]:
        v, lo, hi = r["value"], *r["ci95"]
        if v is None:  # e.g. the lag contrast when every phase is one layer: no lag has pairs inside a phase
            sigs.append(False)
            parts.append(f"{r['statistic']} undefined for these phases (no pair of layers to compare)")
            continue
        sigs.append(r["p_value"] < alpha)
        half = (t.get("split_half") or {}).get(r["statistic"])
        held = (f"; held out (phases chosen on other images) {half['value']:.4f}" if half and half["value"] is not None
                and np.isfinite(half["value"]) else "")
        parts.append(f"{r['statistic']} {_num(v)} [95 % CI {_num(lo)}, {_num(hi)}] vs null {_num(r['null_mean'])}, "
                     f"p = {r['p_value']:.3f}{held}")
    out = f"phase structure at k={k}: **{_word(sigs)}** against the lag-only null ({t['n_resamples']} resamples): " \
        + "; ".join(parts)
    vs = t.get("variable_speed_null")
    if vs:
        vsig = [r["value"] is not None and r["p_value"] < alpha for r in vs.values()]
        fit = (t.get("null_fit_r2") or {}).get("variable_speed")
        out += ("; against a drift that may slow down smoothly (variable-speed null"
                + (f", which explains {fit:.0%} of the matrix" if fit is not None else "") + f"): **{_word(vsig)}** ("
                + ", ".join(f"{m} null {_num(r['null_mean'])}, p = {r['p_value']:.3f}" for m, r in vs.items()) + ")")
    return out


def _word(sigs: list[bool]) -> str:
    return "significant" if all(sigs) else "not significant" if not any(sigs) else \
        "significant under one statistic only (the verdict flips)"


def _num(x) -> str:
    return "–" if x is None else f"{x:.4f}"


def null_test_lines(a: dict) -> list[str]:
    tests = a.get("null_tests") or {}
    if not tests:
        return []
    out = ["", "## Is there more than a drift? (phases against the lag-only and the variable-speed null)", "",
           "The lag-only null keeps each lag's mean distance and removes any block structure (a Toeplitz matrix: "
           "every partition scores 0 on both statistics). A drift whose speed changes smoothly with depth is not in "
           "that null: the lag contrast can reject it without any blocks. The variable-speed null covers it: a "
           "monotone function of the gap in warped depth, the speed a smooth (degree-2 log-polynomial) function of "
           "depth, fitted to the whole matrix (`raptor.phases.variable_speed_null`). Because the phases are chosen on "
           "the data, each null is re-segmented too, with the data's own sampling noise (bootstrap over images). "
           "The usual phase metrics do not discriminate: on the lag-only null matrix they score as shown in the last "
           "column.", ""]
    for k, t in tests.items():
        out.append(f"- {null_verdict(t)}.")
    out += ["", "| k | DP phases | lag contrast [95 % CI] | null | p | boundary jump [95 % CI] | null | p | "
            "variable-speed null: p lag / p jump | boundaries: bootstrap frequency | contrast of the null matrix |",
            "|" + "---|" * 11]
    for k, t in tests.items():
        st = a["boundary_stability"][k]
        bf = ", ".join(f"{b}: {f:.2f}" for b, f in zip(st["boundaries"], st["frequency"]))
        j = t["alternatives"]["boundary_jump"]
        cells = []
        for r in (t, j):
            cells += [f"{_num(r['value'])} [{_num(r['ci95'][0])}, {_num(r['ci95'][1])}]", _num(r["null_mean"]),
                      f"{r['p_value']:.3f}"]
        vs = t.get("variable_speed_null") or {}
        vcell = " / ".join(f"{r['p_value']:.3f}" for r in vs.values()) or "–"
        out.append(f"| {k} | {format_phases(t['phases'])} | " + " | ".join(cells) +
                   f" | {vcell} | {bf} | {_num(t['null_phase_metrics']['contrast'])} |")
    return out


def render_report(a: dict) -> str:
    p = a["segmentations"][a["primary_metric"]]
    lines = [
        f"# Layer similarity and phases: {a['teacher'].get('name') or a['teacher'].get('spec')}",
        "",
        f"- teacher: `{a['teacher'].get('spec')}` ({a['teacher'].get('depth')} blocks, dim {a['teacher'].get('dim')})",
        f"- data: {a['data']['spec'] or a['data']['store']} — {a['data']['n_images']} images"
        f" ({len(a['data']['skipped'])} skipped)",
        f"- layers analysed: {a['layers'][0]}..{a['layers'][-1]} ({a['layer_convention']})",
        f"- token layout: {a['layout']}",
        "",
        f"## Phases (primary metric: `{a['primary_metric']}`)",
        "",
        f"Chosen k = **{a['chosen']['k']}** by the `{p['chosen_k']['rule']}` rule (frac {p['chosen_k']['frac']}; "
        f"the elbow rule gives k = {p['chosen_k']['elbow_k']}): **{format_phases(a['chosen']['phases'])}**",
        "",
        "| k | contiguous DP phases | contrast | block energy | cut fraction | max-cut (recursive) | max-cut frac "
        "| contiguous |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, d in p["dp"].items():
        mc = p.get("maxcut", {}).get(k)
        m = d["metrics"]
        lines.append(f"| {k} | {format_phases(d['phases'])} | {m['contrast']:.3f} | {m['block_energy']:.3f} | "
                     f"{m['cut_fraction']:.3f} | {format_phases(mc['phases']) if mc else '—'} | "
                     f"{mc['frac'] if mc else '—'} | {mc['contiguous'] if mc else '—'} |")
    if p.get("maxcut_paper_fracs"):
        lines += ["", "Recursive max-cut at the paper's settings (frac → clusters): "
                  + "; ".join(f"{f} → {format_phases(v)}" for f, v in p["maxcut_paper_fracs"].items())]
    lines += null_test_lines(a)
    lines += ["", "## Other metrics (DP phases at each metric's own chosen k)", "",
              "| metric | kind | chosen k | phases | adjacent-layer mean | first vs last |",
              "|---|---|---|---|---|---|"]
    for name, m in a["metrics"].items():
        M = np.array(m["matrix"])
        s = a["segmentations"][name]
        k = s["chosen_k"]["k"]
        ph = s["dp"].get(str(k), {}).get("phases")
        adj = float(np.mean([M[i, i + 1] for i in range(len(M) - 1)]))
        lines.append(f"| `{name}` | {m['kind']} | {k} | {format_phases(ph) if ph else '—'} | {adj:.3f} | "
                     f"{M[0, -1]:.3f} |")
    lines += ["", "## Figures", ""]
    for name, f in a["figures"].items():
        lines += [f"### {name}", "", f"![{name}]({f})", ""]
    lines += ["## Definitions", "",
              "- `paper_cosine_distance`: " + a["metrics"]["paper_cosine_distance"]["description"],
              "- DP: exact contiguous segmentation minimising total within-phase distance (= maximising the "
              "distance that crosses phase boundaries).",
              "- contrast = mean between-phase distance − mean within-phase distance; block energy = share of "
              "squared off-diagonal similarity inside phases; cut fraction = share of total distance crossing "
              "boundaries (see `raptor/phases/segment.py`).", ""]
    return "\n".join(lines)


def console_summary(a: dict, out: Path) -> list[str]:
    """What ``raptor analyze`` prints when it is done: the chosen phases, each null test's verdict, the files."""
    lines = [f"phases ({a['primary_metric']}, k={a['chosen']['k']}): {a['chosen']['phases']}"]
    lines += [null_verdict(t).replace("**", "") for t in a["null_tests"].values()]
    lines.append(f"wrote {out / 'analysis.json'}, {out / 'report.md'} and {len(a['figures'])} figures")
    return lines
