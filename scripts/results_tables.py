"""Regenerate the result tables the docs cite, from the committed run folders (``make results``).

Each table lives in a docs page between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` and is rewritten
in place from the runs under ``docs/results/`` (analysis.json, metrics.json). The runs themselves come from the
scripts named beside each table (``scripts/phases_v2.sh``, ``scripts/natural_protocol.sh``); a later protocol
writes a new versioned folder, so a table never silently changes its source runs.

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
    return " / ".join(f"{p[0]}–{p[-1]}" if len(p) > 1 else str(p[0]) for p in ph)


def phases_v2() -> str:
    """The phase null tests of every analyze run in docs/results/phases_v2."""
    rows = ["| data | images | k | DP phases | lag contrast [95 % CI] | null | p | boundary jump [95 % CI] | null | "
            "p | held out: lag / jump | boundary frequency | verdict |", "|" + "---|" * 13]
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
            sig = [t["p_value"] < 0.05, j["p_value"] < 0.05]
            verdict = "both significant" if all(sig) else "neither" if not any(sig) else \
                ("lag only" if sig[0] else "jump only")
            rows.append(
                f"| [{label}](results/phases_v2/{d.name}/report.md) | {a['data']['n_images']} | {k} | "
                f"{_phases(t['phases'])} | {_n(t['value'])} [{_n(t['ci95'][0])}, {_n(t['ci95'][1])}] | "
                f"{_n(t['null_mean'])} | {t['p_value']:.3f} | {_n(j['value'], 3)} [{_n(j['ci95'][0], 3)}, "
                f"{_n(j['ci95'][1], 3)}] | {_n(j['null_mean'], 3)} | {j['p_value']:.3f} | "
                f"{_n((half.get('lag_contrast') or {}).get('value'))} / "
                f"{_n((half.get('boundary_jump') or {}).get('value'), 3)} | "
                f"{', '.join(f'{b}: {fr:.2f}' for b, fr in zip(st['boundaries'], st['frequency']))} | {verdict} |")
    return "\n".join(rows)


def natural_v1() -> str:
    root = RESULTS / "natural_v1"
    runs = [load_run(d) for d in sorted(root.iterdir()) if (d / "metrics.json").is_file()] if root.is_dir() else []
    return report(runs) if runs else "(no runs yet)"


TABLES = {"phases_v2": (ROOT / "docs" / "phases.md", phases_v2),
          "natural_v1": (ROOT / "docs" / "surrogate.md", natural_v1)}


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
        new = pat.sub(lambda m: m.group(1) + fn() + "\n" + m.group(3), text)
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
