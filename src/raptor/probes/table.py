"""``raptor table``: the paper's Table 1 from ``raptor probe`` results: rows are backbones, columns the probe
metrics (top-1 up, mIoU up, RMSE down) per data set, each as mean +- std over seeds (sample std, n-1) with the
number of seeds, and "% of teacher" beside it (up: 100 * value / teacher; down: 100 * teacher / value, so
100 % is the teacher and less is worse either way). "% of teacher" is passed by raw pixels on easy data (95 % on
digits), so beside it stands the **share of the teacher's gain over raw pixels**: 100 * (value - pixels) /
(teacher - pixels) (RMSE: (pixels - value) / (pixels - teacher)), against the strongest raw-pixel baseline
(``pixels:<patch>`` backbone) of the same column: 100 % is the teacher, 0 % is pixels. The share is left out
("teacher ≈ pixels") where the teacher does not beat that baseline by more than twice their combined spread over
seeds: a ratio over a gain that is noise (or negative) says nothing."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from raptor.config import atomic_write_text
from raptor.errors import RaptorError
from raptor.probes.run import RESULTS, read_results

HEAD = {"top1": "top-1 % ↑", "miou": "mIoU ↑", "rmse": "RMSE m ↓"}


def collect(paths: list[Path]) -> list[dict]:
    recs = []
    for p in paths:
        f = p / RESULTS if p.is_dir() else p
        if not f.is_file():
            raise RaptorError(f"no {RESULTS} in {p} (run raptor probe --out {p} first)")
        recs += read_results(f)
    if not recs:
        raise RaptorError("no finished probe results in " + ", ".join(str(p) for p in paths))
    latest: dict = {}
    for r in recs:  # the latest line wins for a repeated (backbone, task, data, seed)
        latest[(r["backbone_spec"]["id"], r["task"], r["data"], r["seed"])] = r
    return list(latest.values())


def display_value(metric: str, v: float) -> float:
    """A stored metric as tables print it: top-1 in % (stored as a fraction), mIoU in % and RMSE in m as stored."""
    return 100 * v if metric == "top1" else v


def aggregate(recs: list[dict]) -> tuple[list[dict], list[tuple]]:
    cols = sorted({(r["task"], r["data"], r["metric"]) for r in recs}, key=lambda c: (["cls", "seg", "depth"].index(
        c[0]), c[1]))
    rows: dict = {}
    for r in recs:
        key = r["backbone_spec"]["id"]
        row = rows.setdefault(key, {"backbone": r["backbone"], "teacher": r["teacher"], "spec": r["backbone_spec"],
                                    "cells": {}})
        row["cells"].setdefault((r["task"], r["data"], r["metric"]), []).append(display_value(r["metric"], r["value"]))
    out = []
    for row in rows.values():
        cells = {}
        for c, vals in row["cells"].items():
            a = np.array(vals, float)
            cells[c] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}
        row["cells"] = cells
        sp = row["spec"]
        row["is_teacher"] = sp["kind"] == "teacher" and sp.get("layer") is None
        out.append(row)
    for row in out:
        ref = next((t for t in out if t["is_teacher"] and t["teacher"] == row["teacher"]), None)
        for c, cell in row["cells"].items():
            t = ref["cells"].get(c) if ref else None
            if t is None or not t["mean"] or not cell["mean"]:
                cell["pct"] = None
            else:
                cell["pct"] = 100 * (cell["mean"] / t["mean"] if c[2] != "rmse" else t["mean"] / cell["mean"])
    for c in {c for row in out for c in row["cells"]}:
        pix = [r["cells"][c] for r in out if r["spec"]["kind"] == "pixels" and c in r["cells"]]
        best = (min(pix, key=lambda x: x["mean"]) if c[2] == "rmse" else max(pix, key=lambda x: x["mean"])) \
            if pix else None
        for row in out:
            cell = row["cells"].get(c)
            ref = next((t for t in out if t["is_teacher"] and t["teacher"] == row["teacher"]), None)
            t = ref["cells"].get(c) if ref else None
            if cell is None:
                continue
            cell["gain_over_pixels"], cell["teacher_near_pixels"] = None, False
            if t is None or best is None:
                continue
            gain = (t["mean"] - best["mean"]) * (-1 if c[2] == "rmse" else 1)  # the teacher's gain, positive = better
            if gain <= 2 * math.hypot(t["std"], best["std"]) or gain <= 0:
                cell["teacher_near_pixels"] = True
                continue
            cell["gain_over_pixels"] = 100 * (cell["mean"] - best["mean"]) / (t["mean"] - best["mean"])
    out.sort(key=lambda r: (r["spec"]["kind"] == "pixels", r["teacher"], not r["is_teacher"], r["backbone"]))
    prior = {}
    for r in recs:
        if r.get("prior_baseline") is not None:
            prior.setdefault((r["task"], r["data"], r["metric"]), display_value(r["metric"], r["prior_baseline"]))
    if prior:
        out.append({"backbone": "baseline: no image (training-set prior)", "teacher": "", "is_teacher": False,
                    "spec": {"kind": "prior"},
                    "cells": {c: {"mean": v, "std": 0.0, "n": 3, "pct": None} for c, v in prior.items()}})
    return out, cols


def _fmt(cell: dict | None, metric: str) -> str:
    if cell is None:
        return "–"
    nd = 3 if metric == "rmse" else 1
    s = f"{cell['mean']:.{nd}f} ± {cell['std']:.{nd}f}"
    if cell["n"] != 3:
        s += f" (n={cell['n']})"
    return s


def markdown(rows: list[dict], cols: list[tuple]) -> str:
    head = ["backbone"]
    for task, data, metric in cols:
        head += [f"{data} {HEAD[metric]}", "% of teacher", "share of the teacher's gain over pixels"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["backbone"]]
        for c in cols:
            cell = r["cells"].get(c)
            cells.append(_fmt(cell, c[2]))
            pct = cell.get("pct") if cell else None
            cells.append("–" if pct is None or not math.isfinite(pct) else f"{pct:.1f} %")
            g = cell.get("gain_over_pixels") if cell else None
            cells.append("teacher ≈ pixels" if cell and cell.get("teacher_near_pixels") else
                         "–" if g is None or not math.isfinite(g) else f"{g:.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (
        "\n\nmean ± sample std over seeds (n = 3 unless marked); top-1 and mIoU in %, RMSE in metres; % of teacher: "
        "up-metrics value / teacher, RMSE teacher / value; share of the teacher's gain over pixels: (value − pixels) "
        "/ (teacher − pixels), the strongest raw-pixel baseline of the column (0 % = pixels, 100 % = teacher); "
        "'teacher ≈ pixels': the teacher does not beat that baseline by more than twice their combined std over "
        "seeds, so no share is given.\n")


def to_csv(rows: list[dict], cols: list[tuple]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["backbone", "teacher", "task", "data", "metric", "mean", "std", "n_seeds", "pct_of_teacher",
                "gain_over_pixels_pct"])
    for r in rows:
        for c in cols:
            cell = r["cells"].get(c)
            if cell:
                w.writerow([r["backbone"], r["teacher"], c[0], c[1], c[2], f"{cell['mean']:.6g}", f"{cell['std']:.6g}",
                            cell["n"], "" if cell["pct"] is None else f"{cell['pct']:.4g}",
                            "" if cell.get("gain_over_pixels") is None else f"{cell['gain_over_pixels']:.4g}"])
    return buf.getvalue()


def write_table(paths: list[Path], out: Path | None = None) -> tuple[str, Path, Path]:
    rows, cols = aggregate(collect(paths))
    md = markdown(rows, cols)
    base = Path(out) if out else (paths[0] if paths[0].is_dir() else paths[0].parent) / "table"
    md_path, csv_path = base.with_suffix(".md"), base.with_suffix(".csv")
    atomic_write_text(md_path, md)
    atomic_write_text(csv_path, to_csv(rows, cols))
    return md, md_path, csv_path


def console_summary(recs: list[dict], task: str, out: Path) -> list[str]:
    """What ``raptor probe`` prints when it is done: the test metric over the seeds (each seed's best lr and epoch)
    and the results file appended to."""
    m = recs[0]["metric"]
    vals = [display_value(m, r["value"]) for r in recs]
    best = ", ".join(f"seed {r['seed']}: {v:.3g} (lr {r['best']['lr']:g}, epoch {r['best']['epoch']})"
                     for r, v in zip(recs, vals))
    return [f"{recs[0]['backbone']} · {task} · {recs[0]['data']}: test {m} {float(np.mean(vals)):.4g} ± "
            f"{float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0:.2g} over {len(vals)} seed(s)  [{best}]",
            f"appended to {out / 'results.jsonl'}"]
