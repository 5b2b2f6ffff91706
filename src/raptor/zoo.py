"""``raptor zoo``: the paper's Figure 1 across models. Do ViTs of different families compute in a few contiguous
phases of depth, and is that more than smooth drift?

For each teacher, ``raptor analyze`` runs on the same images (its own folder under ``OUT/teachers/``, with its full
report and figures; a teacher already analysed with the same settings is skipped, so an interrupted zoo resumes).
Then one figure puts the similarity matrices side by side with each model's chosen phases, and one table gives, per
model: depth, width, tokens, the k the gain rule chooses, the phase boundaries as layers and as fractions of depth,
and the lag-only null test at that k (its statistic, the null's mean and the p-value; docs/phases.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raptor import plots
from raptor.analyze import PRIMARY, AnalyzeConfig, run_analyze
from raptor.config import atomic_write_text, save_config, to_dict
from raptor.data import open_source
from raptor.errors import RaptorError, check_positive
from raptor.lifecycle import command_run
from raptor.outputs import safe_name
from raptor.phases import format_phases
from raptor.teachers import KINDS

log = logging.getLogger("raptor")


@dataclass
class ZooConfig:
    teachers: tuple[str, ...]
    data: str = "bundled:photos"
    out: str = "runs/zoo"
    limit: int | None = None
    sample: str = "random"
    sample_seed: int = 1
    batch_size: int = 16
    image_size: int | None = None   # default: each teacher's own crop size
    k_max: int = 6
    k_rule: str = "gain"
    k_frac: float = 0.1
    null_resamples: int = 200
    autocast: str | None = None
    device: str = "auto"

    def check(self) -> None:
        check_positive(limit=self.limit, batch_size=self.batch_size, image_size=self.image_size, k_max=self.k_max)
        if not self.teachers:
            raise RaptorError("--teachers names no teacher (give a comma-separated list of specs)")
        seen = set()
        for spec in self.teachers:
            kind, sep, target = spec.partition(":")
            if not sep or not target or kind not in KINDS:
                raise RaptorError(f"--teachers: bad teacher spec {spec!r} (kinds: {', '.join(KINDS)})")
            if safe_name(spec) in seen:
                raise RaptorError(f"--teachers names {spec} twice")
            seen.add(safe_name(spec))
        for spec in self.teachers:
            self.analyze_config(spec).check()

    def analyze_config(self, spec: str) -> AnalyzeConfig:
        return AnalyzeConfig(teacher=spec, data=self.data, out=str(Path(self.out) / "teachers" / safe_name(spec)),
                             limit=self.limit, sample=self.sample, sample_seed=self.sample_seed,
                             batch_size=self.batch_size, image_size=self.image_size, k_min=2, k_max=self.k_max,
                             k_rule=self.k_rule, k_frac=self.k_frac, autocast=self.autocast,
                             null_resamples=self.null_resamples, device=self.device)


def split_teachers(text: str) -> tuple[str, ...]:
    """``--teachers A,B,C``: a part that is a ``key=value`` setting belongs to the spec before it
    (``planted:2,depth=8,base=tiny:dinov2`` keeps its own commas); any other part starts a new spec."""
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, eq, _ = part.partition("=")
        if specs and eq and ":" not in key:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return tuple(specs)


_NOT_COMPARED = ("out", "device")  # where a teacher's analysis is, and the device: not what it computed


def _settings(cfg: AnalyzeConfig) -> dict:
    return {k: v for k, v in json.loads(json.dumps(to_dict(cfg))).items() if k not in _NOT_COMPARED}


def _finished(acfg: AnalyzeConfig) -> dict | None:
    """The teacher's analysis when it was made with these settings; None when there is none yet."""
    path = Path(acfg.out) / "analysis.json"
    if not path.is_file():
        return None
    try:
        a = json.loads(path.read_text())
        have = {k: v for k, v in a["config"].items() if k not in _NOT_COMPARED}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RaptorError(f"{path} is damaged ({type(e).__name__}); delete that folder to analyse it again") from None
    want = _settings(acfg)
    diff = sorted(k for k in want if have.get(k) != want[k])
    if diff:
        raise RaptorError(f"{acfg.out} was analysed with other settings ({', '.join(diff)}); use another --out or "
                          f"delete that folder")
    return a


def row_of(a: dict) -> dict:
    """One model's line of the zoo table, from its analysis.json."""
    t, seg = a["teacher"], a["segmentations"][PRIMARY]
    k = int(seg["chosen_k"]["k"])
    phases = seg["dp"][str(k)]["phases"] if str(k) in seg["dp"] else None
    depth = int(t["depth"])
    layers = a["layers"]
    bounds = [p[0] - 1 for p in phases[1:]] if phases else []  # cut after layer b
    tests = a.get("null_tests") or {}
    return {"teacher": t["spec"], "name": t.get("name") or t["spec"], "family": t.get("family"), "depth": depth,
            "width": int(t["dim"]), "tokens": a["layout"]["n_tokens"], "n_registers": int(t["n_registers"]),
            "n_images": a["data"]["n_images"], "layers": layers, "k": k, "phases": phases,
            "cuts_after": bounds, "cuts_frac": [round(b / depth, 3) for b in bounds],
            "null_test": _statistics(tests.get(str(k))), "null_test_k2": _statistics(tests.get("2")),
            "variable_speed_null": _statistics_vs(tests.get(str(k))),
            "phases_k2": (seg["dp"].get("2") or {}).get("phases"),
            "boundary_frequency": ((a.get("boundary_stability") or {}).get(str(k)) or {}).get("frequency")}


def _statistics(test: dict | None) -> dict:
    """{statistic: {value, null_mean, p_value}} of one null test: the primary statistic and its alternatives."""
    if not test:
        return {}
    out = {test["statistic"]: {k: test.get(k) for k in ("value", "null_mean", "p_value")}}
    for name, alt in (test.get("alternatives") or {}).items():
        out[name] = {k: alt.get(k) for k in ("value", "null_mean", "p_value")}
    return out


def _statistics_vs(test: dict | None) -> dict:
    """{statistic: {value, null_mean, p_value}} of the same test against the variable-speed null (absent in
    analyses written before it)."""
    return {name: {k: r.get(k) for k in ("value", "null_mean", "p_value")}
            for name, r in ((test or {}).get("variable_speed_null") or {}).items()}


STATISTICS = ("lag_contrast", "boundary_jump")


def _num(x, fmt=".3f") -> str:
    return "–" if x is None else format(x, fmt)


def render(rows: list[dict], cfg: ZooConfig, figure: str) -> str:
    lines = ["# Phases of depth across models (`raptor zoo`)", "",
             f"Data: `{cfg.data}`" + (f", {rows[0]['n_images']} images" if rows else "") +
             f" (limit {cfg.limit}, seed {cfg.sample_seed}); metric: `{PRIMARY}`; k chosen by the `{cfg.k_rule}` "
             f"rule (k ≤ {cfg.k_max}); the null test compares the phases at that k with the lag-only null "
             f"({cfg.null_resamples} resamples; docs/phases.md) under two statistics that can disagree: the lag "
             f"contrast (across-phase minus within-phase distance at the same lag; smooth drift whose speed changes "
             f"with depth also raises it) and the boundary jump (log of the step across each cut over the steps "
             f"beside it: a change point); the variable-speed null (a drift that may slow down smoothly, no blocks) "
             f"is tested with both. A cut after layer b at fraction b / depth.", "",
             f"![similarity matrices]({figure})", "",
             "| model | depth | width | tokens | k | phases | cuts after (fraction of depth) | lag contrast (null), "
             "p | boundary jump (null), p | variable-speed null: p lag / jump | k = 2: phases, p lag / jump |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cuts = ", ".join(f"{b} ({f:.2f})" for b, f in zip(r["cuts_after"], r["cuts_frac"])) or "–"
        stats = []
        for name in STATISTICS:
            t = r["null_test"].get(name) or {}
            stats.append(f"{_num(t.get('value'))} ({_num(t.get('null_mean'))}), {_num(t.get('p_value'))}" if t
                         else "–")
        vs = r.get("variable_speed_null") or {}
        stats.append(" / ".join(_num((vs.get(name) or {}).get("p_value")) for name in STATISTICS) if vs else "–")
        k2 = r["null_test_k2"]
        at2 = (f"{format_phases(r['phases_k2'])}, {_num((k2.get('lag_contrast') or {}).get('p_value'))} / "
               f"{_num((k2.get('boundary_jump') or {}).get('p_value'))}" if r["phases_k2"] else "–")
        lines.append(f"| {r['name']} (`{r['teacher']}`) | {r['depth']} | {r['width']} | {r['tokens']} | {r['k']} | "
                     f"{format_phases(r['phases']) if r['phases'] else '–'} | {cuts} | {' | '.join(stats)} | {at2} |")
    lines += ["", "Each model's full analysis (every metric, max-cut, the null tests at every k, boundary stability): "
              "`teachers/<model>/report.md`.", ""]
    return "\n".join(lines)


def run_zoo(cfg: ZooConfig, progress: bool = True) -> dict:
    """Analyse every teacher (skipping those already done with these settings), then the figure and the table."""
    cfg.check()
    open_source(cfg.data)  # a bad data spec is refused before any output exists
    out = Path(cfg.out)
    with command_run(out, has_progress=lambda p: (p / "teachers").is_dir()):
        analyses = []
        for i, spec in enumerate(cfg.teachers):
            acfg = cfg.analyze_config(spec)
            a = _finished(acfg)
            if a is None:
                log.info("[%d/%d] analysing %s", i + 1, len(cfg.teachers), spec)
                a = run_analyze(acfg, progress=progress).analysis
            else:
                log.info("[%d/%d] %s: analysed already with these settings (%s)", i + 1, len(cfg.teachers), spec,
                         acfg.out)
            analyses.append(a)
        rows = [row_of(a) for a in analyses]
        matrices = [np.array(a["metrics"][PRIMARY]["matrix"]) for a in analyses]
        fig = plots.matrices_side_by_side(out / "zoo.png", matrices, [r["layers"] for r in rows],
                                          [r["phases"] for r in rows],
                                          [f"{r['name']}\nk={r['k']}, p = {_p(r, 'lag_contrast')} / "
                                           f"{_p(r, 'boundary_jump')}" for r in rows])
        save_config(cfg, out / "config.yaml")
        atomic_write_text(out / "zoo.md", render(rows, cfg, fig.name))
        result = {"config": to_dict(cfg), "metric": PRIMARY, "models": rows, "figure": fig.name}
        atomic_write_text(out / "zoo.json", json.dumps(result, indent=1))
    return result


def _p(row: dict, statistic: str) -> str:
    return _num((row["null_test"].get(statistic) or {}).get("p_value"), ".3g")


def console_summary(result: dict, out: Path) -> list[str]:
    lines = [f"{'model':<34} {'depth':>5} {'k':>2}  {'cuts after (fraction)':<30} p: lag contrast / boundary jump"]
    for r in result["models"]:
        cuts = ", ".join(f"{b} ({f:.2f})" for b, f in zip(r["cuts_after"], r["cuts_frac"]))
        lines.append(f"{r['name'][:34]:<34} {r['depth']:>5} {r['k']:>2}  {cuts:<30} {_p(r, 'lag_contrast')} / "
                     f"{_p(r, 'boundary_jump')}")
    lines.append(f"wrote {out / 'zoo.md'}, {out / 'zoo.png'}, {out / 'zoo.json'} and each model's analysis under "
                 f"{out / 'teachers'}")
    return lines


__all__ = ["ZooConfig", "console_summary", "render", "row_of", "run_zoo", "split_teachers"]
