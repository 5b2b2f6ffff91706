"""``raptor fit-report``: Markdown tables comparing finished ``raptor fit`` runs (from their metrics.json), every
surrogate number beside the baselines that give it meaning."""

from __future__ import annotations

import json
from pathlib import Path

from raptor.errors import RaptorError


def load_run(path: str | Path) -> dict:
    p = Path(path)
    f = p / "metrics.json" if p.is_dir() else p
    try:
        m = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise RaptorError(f"cannot read a finished run at {path}: {e}") from None
    if "validation" not in m or "baselines" not in m["validation"]:
        raise RaptorError(f"{f} is not a metrics.json from this version of raptor fit (no baselines)")
    m["_name"] = p.name if p.is_dir() else p.parent.name
    return m


def _f(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _phases(m) -> str:
    return " / ".join(f"{p[0]}–{p[-1]}" if len(p) > 1 else str(p[0]) for p in m["surrogate"]["phases"])


def _full(probes: dict) -> dict:
    return next(v for k, v in probes["backbones"].items() if k.startswith("full"))


def report(runs: list[dict]) -> str:
    if not runs:
        raise RaptorError("give at least one run directory")
    out = []
    out.append("| run | teacher | k | phases | loss | steps (stage 1 / 2) × batch | train s | mean AR R² | "
               "mean per-block R² | image-level R² (variance kept) | fresh probe, full | % of teacher | "
               "teacher-probe agreement |")
    out.append("|" + "---|" * 13)
    for m in runs:
        c, v = m["config"], m["validation"]
        ar, pb, il = v["autoregressive"], v["per_block_from_teacher"], v["image_level"]["autoregressive"]
        pr = v.get("probes")
        full = _full(pr) if pr else {}
        out.append(f"| `{m['_name']}` | {m['teacher']['spec']} | {len(m['surrogate']['phases'])} | {_phases(m)} | "
                   f"{c.get('loss_norm', 'none')} | {c['steps1']} / {c['steps2']} × {c['batch_size']} | "
                   f"{m['train_seconds']:.0f} | **{_f(ar['r2_mean'])}** | {_f(pb['r2_mean'])} | "
                   f"{_f(il['r2'])} ({_f(il['variance_kept'], 2)}) | {_f(full.get('fresh_probe_accuracy'))} | "
                   f"{_f(full.get('pct_of_teacher'), 1)} | {_f(full.get('teacher_probe_agreement'))} |")
    out.append("")
    out.append("Baselines on the same held-out images (mean R² over layers 1..L; image-level R² of the pooled "
               "features):")
    out.append("")
    out.append("| run | identity l−1 → l (TF) | ridge l−1 → l (TF) | ridge chained (AR) | copy layer 0 (AR) | "
               "position mean | image-level: identity | image-level: ridge AR |")
    out.append("|" + "---|" * 8)
    for m in runs:
        b, il = m["validation"]["baselines"], m["validation"]["image_level"]
        g = lambda k: _f(b[k]["r2_mean"]) if k in b else "–"  # noqa: E731
        out.append(f"| `{m['_name']}` | {g('identity')} | {g('ridge_teacher_forced')} | {g('ridge_autoregressive')} "
                   f"| {g('copy_layer0')} | {g('position_mean')} | {_f(il.get('identity', {}).get('r2'))} | "
                   f"{_f(il.get('ridge_autoregressive', {}).get('r2'))} |")
    L = len(runs[0]["validation"]["layers"])
    hdr = "| held-out R² per layer | " + " | ".join(str(i) for i in range(1, L + 1)) + " | mean |"
    out += ["", hdr, "|" + "---|" * (L + 2)]

    def row(name, r):
        return f"| {name} | " + " | ".join(_f(x, 2) for x in r) + f" | {_f(sum(r) / len(r))} |"

    base0 = runs[0]["validation"]["baselines"]
    for key, label in (("identity", "baseline: identity (TF)"), ("ridge_teacher_forced", "baseline: ridge (TF)"),
                       ("ridge_autoregressive", "baseline: ridge chained (AR)")):
        if key in base0 and len(base0[key]["r2"]) == L:
            out.append(row(label + f" [{runs[0]['_name']}]", base0[key]["r2"]))
    for m in runs:
        v = m["validation"]
        if len(v["layers"]) != L:
            continue
        out.append(row(f"`{m['_name']}` AR", v["autoregressive"]["r2"]))
        for g in ("cls", "patches"):
            if g in v["autoregressive"].get("r2_groups", {}):
                out.append(row(f"`{m['_name']}` AR, {g} tokens", v["autoregressive"]["r2_groups"][g]))
    out += ["", "Probes per backbone (splice = teacher 0..i, surrogate i..j, teacher j..L): fresh probe accuracy "
            "(% of the teacher's) / teacher-probe agreement:", ""]
    for m in runs:
        pr = m["validation"].get("probes")
        if not pr:
            continue
        cells = [f"{k}: {_f(b['fresh_probe_accuracy'])} ({_f(b['pct_of_teacher'], 1)} %) / "
                 f"{_f(b['teacher_probe_agreement'])}" for k, b in pr["backbones"].items()]
        out.append(f"- `{m['_name']}` ({pr['data']}, {pr['n_train']} train / {pr['n_test']} held-out images): "
                   + "; ".join(cells))
    return "\n".join(out) + "\n"
