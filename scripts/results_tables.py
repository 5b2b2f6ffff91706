"""Regenerate the result tables the docs cite, from the committed run folders (``make results``).

Each table lives in a docs page between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` and is rewritten
in place from the runs under ``docs/results/`` (analysis.json, metrics.json, results.jsonl, dynamics.json,
study.json). The runs themselves come from the scripts named beside each table (``scripts/phases_v2.sh``,
``natural_protocol.sh``, ``probes_v2.sh``, ``dynamics_v2.sh``, ``study_v2.sh``); a later protocol writes a new
versioned folder, so a table never silently changes its source runs.

    .venv/bin/python scripts/results_tables.py [--check]   # --check: exit 1 if a page is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from raptor.surrogate.report import load_run, report  # noqa: E402

RESULTS = ROOT / "docs" / "results"


def _n(x, nd: int = 4) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _phases(ph) -> str:
    from raptor.phases import format_phases

    return format_phases(ph)


def phases_v2() -> str:
    """The phase null tests of every analyze run in docs/results/phases_v2."""
    rows = ["| data | images | k | DP phases | lag contrast [95 % CI] | null | p | boundary jump [95 % CI] | null | "
            "p | variable-speed null: p lag / p jump | held out: lag / jump | boundary frequency | verdict (lag-only "
            "null) | verdict (variable-speed null) |", "|" + "---|" * 15]
    root = RESULTS / "phases_v2"
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        f = d / "analysis.json"
        if not f.is_file():
            continue
        a = json.loads(f.read_text())
        teacher = a["teacher"].get("spec")
        data = a["data"]["spec"] or a["data"]["store"]
        label = f"{data}" + ("" if teacher == "bundled:dinov2-s" else f" ({teacher})")
        for k, t in a["null_tests"].items():
            if int(k) > 4:
                continue
            j = t["alternatives"]["boundary_jump"]
            half = t.get("split_half") or {}
            st = a["boundary_stability"][k]
            vs = t.get("variable_speed_null") or {}
            verdict = _verdict(t["p_value"], j["p_value"])
            vverdict = _verdict(vs["lag_contrast"]["p_value"], vs["boundary_jump"]["p_value"]) if vs else "–"
            vcell = f"{vs['lag_contrast']['p_value']:.3f} / {vs['boundary_jump']['p_value']:.3f}" if vs else "–"
            rows.append(
                f"| [{label}](results/phases_v2/{d.name}/report.md) | {a['data']['n_images']} | {k} | "
                f"{_phases(t['phases'])} | {_n(t['value'])} [{_n(t['ci95'][0])}, {_n(t['ci95'][1])}] | "
                f"{_n(t['null_mean'])} | {t['p_value']:.3f} | {_n(j['value'], 3)} [{_n(j['ci95'][0], 3)}, "
                f"{_n(j['ci95'][1], 3)}] | {_n(j['null_mean'], 3)} | {j['p_value']:.3f} | {vcell} | "
                f"{_n((half.get('lag_contrast') or {}).get('value'))} / "
                f"{_n((half.get('boundary_jump') or {}).get('value'), 3)} | "
                f"{', '.join(f'{b}: {fr:.2f}' for b, fr in zip(st['boundaries'], st['frequency']))} | {verdict} | "
                f"{vverdict} |")
    return "\n".join(rows)


def _verdict(p_lag: float, p_jump: float, alpha: float = 0.05) -> str:
    sig = [p_lag < alpha, p_jump < alpha]
    return "both significant" if all(sig) else "neither" if not any(sig) else ("lag only" if sig[0] else "jump only")


# natural_v1: which runs answer which question (scripts/natural_protocol.sh defines and runs them)
CANDIDATE_K2 = "k2_s0"  # analyze's k=2 phases on bundled:natural (cut after layer 7; docs/phases.md), seed 0
BALANCED_K2 = ("ctrl_k2_bal3_s0", "ctrl_k2_bal4_s0", "ctrl_k2_bal6_s0")  # every phase >= 3 layers, same budget
BUDGETS = {"k=2, 1–7 / 8–12 (DINOv2-S)": ("k2_budget025_s0", "k2_budget05_s0", "k2_s0"),
           "planted control: k=2 teacher, 1–6 / 7–12": ("planted_k2_budget025_s0", "planted_k2_budget05_s0",
                                                          "planted_k2_s0")}
GOALS = ((3, "image-specific R²", 0.90), (2, "image-specific R²", 0.80), (3, "image-level R²", 0.80),
         (2, "image-level R²", 0.60))


def _spec_of(m) -> tuple[float, list]:
    ar = m["validation"]["autoregressive"]
    return ar["r2_image_specific_mean"], ar["r2_image_specific_ci95"]


def _cmd(name: str) -> str:
    return f"`scripts/natural_protocol.sh {name}`"


def _natural_runs() -> dict:
    root = RESULTS / "natural_v1"
    return {d.name: load_run(d) for d in sorted(root.iterdir()) if (d / "metrics.json").is_file()} \
        if root.is_dir() else {}


def natural_v1_verdicts(runs: dict, plot_dir: Path | None = None) -> str:
    """The protocol's three questions, each against its control: the goals; analyze's phases against balanced
    random partitions at equal compute; and the budget curve, with the planted control beside it."""
    import statistics

    out = ["**Every run, ranked** (same held-out photos; budget: steps (stage 1 + 2) × batch 16; CIs resample the 20 "
           "held-out photos), beside the baselines a model without the property scores:", "",
           "| run | teacher / setting | k | phases | steps (1 + 2) | image-specific R² [95 % CI] | layer 12 | "
           "image-level R² |",
           "|---|---|---|---|---|---|---|---|"]
    for name, m in sorted(runs.items(), key=lambda kv: -_spec_of(kv[1])[0]):
        v, ci = _spec_of(m)
        c = m["config"]
        setting = m["teacher"]["spec"] + (f", --image-loss {c['image_loss']:g}" if c.get("image_loss") else "")
        out.append(f"| `{name}` | {setting} | {len(m['surrogate']['phases'])} | {_phases(m['surrogate']['phases'])} | "
                   f"{c['steps1'] + c['steps2']} | **{v:.3f}** [{ci[0]:.3f}, {ci[1]:.3f}] | "
                   f"{m['validation']['autoregressive']['r2_image_specific'][-1]:.2f} | "
                   f"{m['validation']['image_level']['autoregressive']['r2']:.3f} |")
    any_run = next(iter(runs.values()))
    b = any_run["validation"]["baselines"]
    il = any_run["validation"]["image_level"]
    for key, label in (("ridge_autoregressive", "baseline: chained ridge (linear, AR)"),
                       ("identity", "baseline: identity ℓ−1 → ℓ (teacher-forced)"),
                       ("position_mean", "baseline: per-position mean (image-blind)")):
        if key in b:
            img = il.get(key, {}).get("r2")
            out.append(f"| {label} | – | – | – | – | {b[key]['r2_image_specific_mean']:.3f} | "
                       f"{b[key]['r2_image_specific'][-1]:.2f} | {'–' if img is None else f'{img:.3f}'} |")
    out += ["", "**Goals** (held-out photos; the main configurations: k=2 `1–7 / 8–12` = analyze's k=2 phases, k=3 = "
           "`--k 3`, phases chosen by fit on the training photos; mean ± sd over the seeds run so far):", "",
           "| k | measure | goal | measured | runs | met? |", "|---|---|---|---|---|---|"]
    for k, what, goal in GOALS:
        names = [n for n in runs if re.fullmatch(rf"k{k}(dp)?_s\d", n)]
        if not names:
            out.append(f"| {k} | {what} | ≥ {goal:.2f} | – | not run | – |")
            continue
        vals = [_spec_of(runs[n])[0] if what.startswith("image-specific")
                else runs[n]["validation"]["image_level"]["autoregressive"]["r2"] for n in names]
        mean = statistics.fmean(vals)
        sd = f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else " (1 seed)"
        out.append(f"| {k} | {what} | ≥ {goal:.2f} | {mean:.3f}{sd} | {', '.join(f'`{n}`' for n in names)} | "
                   f"{'**met**' if mean >= goal else 'missed'} |")
    # analyze's phases vs balanced random partitions, one seed each, equal budget
    out += ["", "**Analyze's phases against balanced random partitions** (k=2, every phase ≥ 3 layers, the same "
            "budget and seed; image-specific R² on the held-out photos):", "",
            "| run | phases | image-specific R² [95 % CI] | image-level R² | command |", "|---|---|---|---|---|"]
    present = [n for n in BALANCED_K2 if n in runs]
    for n in (CANDIDATE_K2, *BALANCED_K2, "ctrl_k2_1-11_12_s0"):
        if n in runs:
            v, ci = _spec_of(runs[n])
            out.append(f"| `{n}` | {_phases(runs[n]['surrogate']['phases'])} | {v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | "
                       f"{runs[n]['validation']['image_level']['autoregressive']['r2']:.3f} | {_cmd(n)} |")
        else:
            out.append(f"| `{n}` | – | not run yet | – | {_cmd(n)} |")
    if CANDIDATE_K2 in runs and len(present) >= 2:
        vals = [_spec_of(runs[n])[0] for n in present]
        mu, sd = statistics.fmean(vals), statistics.stdev(vals)
        x = _spec_of(runs[CANDIDATE_K2])[0]
        z = (x - mu) / sd if sd > 0 else float("inf")
        out += ["", f"Analyze's phases: {x:.3f}; balanced random partitions: {mu:.3f} ± {sd:.3f} (n = {len(vals)}); "
                f"difference {x - mu:+.3f} = {z:+.2f} σ of the random partitions: the goal (> 1 σ) is "
                f"**{'met' if z > 1 else 'missed'}**" + (" (with so few partitions σ itself is uncertain)."
                                                        if len(vals) < 5 else ".")]
    else:
        out += ["", f"Not decided yet: {len(present)} of {len(BALANCED_K2)} balanced partitions run."]
    # the budget curve
    out += ["", "**Budget curve** (¼, ½ and 1 × the short recipe's 450 / 200 steps × 16 (k × 450 + 200 optimizer "
            "steps in all); image-specific R² on the "
            "held-out photos; the least-squares line y = a + b ln(steps) through the points, extrapolated — a naive "
            "model with 3 points and no saturation term, to be read as an order of magnitude):", "",
            "| curve | optimizer steps (k × stage-1 + stage-2) → image-specific R² [95 % CI] | slope per doubling | "
            "steps to 0.80 (extrapolated) |", "|---|---|---|---|"]
    curves = {}
    for label, names in BUDGETS.items():
        have = [n for n in names if n in runs]
        pts = []
        for n in have:
            c = runs[n]["config"]
            v, ci = _spec_of(runs[n])
            # optimizer steps: stage 1 trains each of the k blocks for steps1, then stage 2 runs steps2
            pts.append((len(runs[n]["surrogate"]["phases"]) * c["steps1"] + c["steps2"], v, ci, n))
        cells = "; ".join(f"{s}: {v:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" for s, v, ci, _ in pts) or "–"
        missing = [n for n in names if n not in runs]
        if missing:
            cells += " (not run yet: " + ", ".join(_cmd(n) for n in missing) + ")"
        slope = reach = "–"
        if len(pts) >= 2:
            import numpy as np

            b, a = np.polyfit(np.log([p[0] for p in pts]), [p[1] for p in pts], 1)
            slope = f"{b * np.log(2):+.3f}"
            reach = f"{np.exp((0.80 - a) / b):,.0f}" if b > 0 else "never (flat or falling)"
            curves[label] = ([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts])
        out.append(f"| {label} | {cells} | {slope} | {reach} |")
    if curves and plot_dir is not None:
        from raptor.plots import budget_curve

        budget_curve(plot_dir / "budget_curve.png", curves,
                     xlabel="optimizer steps (k × stage-1 + stage-2, batch 16)", ylabel="held-out image-specific R²",
                     title="natural_v1: image-specific R² against budget", goal=0.80,
                     extend_to=10 * max(max(c[0]) for c in curves.values()), ceiling=1.0)
    if curves:
        out += ["", "![budget curve](results/natural_v1/budget_curve.png)"]
    return "\n".join(out) + "\n"


def natural_v1(plot_dir: Path | None = None) -> str:
    runs = _natural_runs()
    if not runs:
        return "(no runs yet)"
    return natural_v1_verdicts(runs, plot_dir) + "\n" + report(list(runs.values()))


def _probe_table(f: Path) -> str:
    from raptor.probes.table import aggregate, collect, markdown

    return markdown(*aggregate(collect([f])))


def probes_v2() -> str:
    """Table 1 on bundled data with the natural_v1 surrogates (scripts/probes_v2.sh), from its results.jsonl."""
    f = RESULTS / "probes_v2" / "results.jsonl"
    if not f.is_file():
        return "(not run yet: `scripts/probes_v2.sh`, about 40 CPU-minutes after the natural_v1 runs it probes)"
    return _probe_table(f)


def dynamics_v2() -> str:
    """The dynamics verdicts against their nulls of every run in docs/results/dynamics_v2 (scripts/dynamics_v2.sh)."""
    from raptor.dynamics.report import verdict_section

    root = RESULTS / "dynamics_v2"
    runs = [d for d in sorted(root.iterdir()) if (d / "dynamics.json").is_file()] if root.is_dir() else []
    if not runs:
        return "(not run yet: `scripts/dynamics_v2.sh`)"
    out = []
    for d in runs:
        dyn = json.loads((d / "dynamics.json").read_text())
        data = dyn["data"]["spec"] or dyn["data"]["store"]
        out += [f"### `{d.name}`: {data}, {dyn['data']['n_images']} images, phases {_phases(dyn['phases'])} "
                f"([report](results/dynamics_v2/{d.name}/report.md))", ""]
        out += [line.replace("## Verdicts against their nulls", "").strip("\n") for line in verdict_section(dyn)]
    return "\n".join(out).replace("\n\n\n", "\n\n") + "\n"


def study_v2() -> str:
    """The study's verdicts against their nulls of every run in docs/results/study_v2 (scripts/study_v2.sh)."""
    from raptor.config import from_dict
    from raptor.study.report import verdict_sections
    from raptor.study.run import StudyConfig

    root = RESULTS / "study_v2"
    runs = [d for d in sorted(root.iterdir()) if (d / "study.json").is_file()] if root.is_dir() else []
    if not runs:
        return "(not run yet: `scripts/study_v2.sh digits`, about 3 CPU-hours; `scripts/study_v2.sh fashion` on a GPU)"
    out = []
    for d in runs:
        study = json.loads((d / "study.json").read_text())
        cfg = from_dict(StudyConfig, study["config"])
        out += [f"### `{d.name}`: {cfg.data} ([report](results/study_v2/{d.name}/report.md))", "",
                verdict_sections(cfg, study).replace("## ", "#### ")]
    return "\n".join(out)


TABLES = {"phases_v2": (ROOT / "docs" / "phases.md", lambda _plot_dir: phases_v2()),
          "natural_v1": (ROOT / "docs" / "surrogate.md", natural_v1),
          "probes_v2": (ROOT / "docs" / "probes.md", lambda _plot_dir: probes_v2()),
          "dynamics_v2": (ROOT / "docs" / "dynamics.md", lambda _d: dynamics_v2()),
          "study_v2": (ROOT / "docs" / "study.md", lambda _d: study_v2()),
          # the first-recipe digit surrogates (stale models, committed results): scripts listed in docs/probes.md
          "probes_v1": (ROOT / "docs" / "probes.md", lambda _d: _probe_table(RESULTS / "probes" / "results.jsonl")),
          "probes_v1_raw": (ROOT / "docs" / "probes.md",
                            lambda _d: _probe_table(RESULTS / "probes" / "results_raw.jsonl"))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if a page is out of date (nothing written)")
    a = p.parse_args(argv)
    stale = []
    for name, (page, fn) in TABLES.items():
        text = page.read_text()
        pat = re.compile(rf"(<!-- results:{name} -->\n)(.*?)(<!-- /results:{name} -->)", re.S)
        if not pat.search(text):
            print(f"error: {page.relative_to(ROOT)} has no <!-- results:{name} --> block", file=sys.stderr)
            return 2
        body = fn(None) if a.check or name != "natural_v1" else fn(RESULTS / "natural_v1")  # --check: no files
        new = pat.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)
        if new != text:
            stale.append(str(page.relative_to(ROOT)))
            if not a.check:
                page.write_text(new)
    if stale:
        print(("out of date (run make results): " if a.check else "rewrote: ") + ", ".join(stale))
    else:
        print("every result table is up to date")
    return 1 if (a.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
