"""``raptor fit-report``: Markdown tables comparing finished ``raptor fit`` runs (from their metrics.json), every
surrogate number beside the baselines that give it meaning."""

from __future__ import annotations

import json
from pathlib import Path

from raptor.errors import RaptorError


def load_run(path: str | Path) -> dict:
    from raptor.surrogate.run_dir import read_metrics  # imports torch: the CLI imports this module at start

    p = Path(path)
    m = read_metrics(p / "metrics.json" if p.is_dir() else p, path)
    m["_name"] = p.name if p.is_dir() else p.parent.name
    m["_stage1"] = None
    c = m.get("config", {})
    if c.get("stage") == "2" and c.get("init_from"):  # continued from a stage-1 run: report both halves together
        src = Path(c["init_from"])
        if not src.is_absolute() and not src.exists():
            src = (p if p.is_dir() else p.parent).parent / src.name
        try:
            s1 = json.loads((src / "metrics.json").read_text())
        except (OSError, ValueError):
            s1 = None
        if s1 and s1.get("config", {}).get("stage") in ("1", "both"):
            m["_stage1"] = {"name": src.name, "steps1": s1["config"]["steps1"],
                            "train_seconds": s1["train_seconds"], "stage1_last_weights":
                            s1["config"].get("stage1_last_weights"), "lr": s1["config"]["lr"]}
    return m


def _steps1(m) -> int:
    return m["_stage1"]["steps1"] if m.get("_stage1") else m["config"]["steps1"]


def _train_s(m) -> float:
    return m["train_seconds"] + (m["_stage1"]["train_seconds"] if m.get("_stage1") else 0.0)


def _label(m) -> str:
    return f"`{m['_name']}`" + (f" (stage 1: `{m['_stage1']['name']}`)" if m.get("_stage1") else "")


# config fields that do not change what a run trains (where it writes, how often it checkpoints or validates, and
# the split of one training into two stage runs, whose stage-1 settings are read back from the stage-1 run)
_NOT_TRAINING = ("seed", "out", "init_from", "stage", "ckpt_every", "val_every", "progress")


def recipe_key(m) -> str:
    """What a run trained, but not its seed: runs with equal keys are seeds of one configuration. Every config field
    counts (so ``--image-loss 1`` or another recipe is never a 'seed') except those in ``_NOT_TRAINING`` and the
    evaluation-only ones, and a setting added later counts only where it differs from its default (older runs do not
    record it), as in ``FitConfig.training_fingerprint``."""
    from raptor.surrogate.config import EVAL_ONLY, NEW_DEFAULTS

    c = {k: v for k, v in m["config"].items() if k not in _NOT_TRAINING and k not in EVAL_ONLY
         and not (k in NEW_DEFAULTS and v == NEW_DEFAULTS[k])}  # as the training fingerprint: a later default
    s1 = m.get("_stage1") or {}
    c.update(steps1=_steps1(m), lr=s1.get("lr", c.get("lr")),
             stage1_last_weights=s1.get("stage1_last_weights", c.get("stage1_last_weights")))
    return json.dumps([m["teacher"]["spec"], c], sort_keys=True, default=str)


def _mean_std(xs: list[float], nd: int = 3) -> str:
    import statistics

    if len(xs) == 1:
        return _f(xs[0], nd)
    return f"{_f(statistics.fmean(xs), nd)} ± {_f(statistics.stdev(xs), nd)}"


def seed_summary(runs: list[dict]) -> list[str]:
    """One row per configuration trained with several seeds: mean ± sample std over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for m in runs:
        groups.setdefault(recipe_key(m), []).append(m)
    multi = [g for g in groups.values() if len(g) > 1]
    if not multi:
        return []
    out = ["", "Over seeds (runs that differ only in their seed; mean ± sample standard deviation):", "",
           "| configuration | seeds | runs | image-specific R², AR | image-level R² | mean AR R² | "
           "fresh probe, % of teacher | teacher-probe agreement | train s |", "|" + "---|" * 9]
    for g in multi:
        m0 = g[0]
        fulls = [_full(m["validation"]["probes"]) if m["validation"].get("probes") else {} for m in g]
        pct = [f["pct_of_teacher"] for f in fulls if "pct_of_teacher" in f]
        agr = [f["teacher_probe_agreement"] for f in fulls if "teacher_probe_agreement" in f]
        spec = [m["validation"]["autoregressive"]["r2_image_specific_mean"] for m in g
                if "r2_image_specific_mean" in m["validation"]["autoregressive"]]
        phases = {_phases(m) for m in g}
        out.append(f"| {m0['teacher']['spec']}, k = {len(m0['surrogate']['phases'])}, "
                   f"{_phases(m0) if len(phases) == 1 else 'phases per seed: ' + '; '.join(sorted(phases))} | "
                   f"{', '.join(str(m['config']['seed']) for m in g)} | "
                   f"{', '.join('`' + m['_name'] + '`' for m in g)} | "
                   f"**{_mean_std(spec) if len(spec) == len(g) else '–'}** | "
                   f"{_mean_std([m['validation']['image_level']['autoregressive']['r2'] for m in g])} | "
                   f"{_mean_std([m['validation']['autoregressive']['r2_mean'] for m in g])} | "
                   f"{_mean_std(pct, 2) if len(pct) == len(g) else '–'} | "
                   f"{_mean_std(agr) if len(agr) == len(g) else '–'} | "
                   f"{_mean_std([_train_s(m) for m in g], 0)} |")
    return out


def _f(x, nd=3) -> str:
    return "–" if x is None else f"{x:.{nd}f}"


def _phases(m) -> str:
    from raptor.phases import format_phases

    return format_phases(m["surrogate"]["phases"])


def _full(probes: dict) -> dict:
    return next(v for k, v in probes["backbones"].items() if k.startswith("full"))


def _spec(r: dict | None) -> str:
    return _f(r.get("r2_image_specific_mean")) if r else "–"


def discriminating_table(runs: list[dict]) -> list[str]:
    """The measures a blind baseline cannot pass, first: the mean image-specific R² (1 − SSE / SSE of the
    per-position mean; the position mean scores 0) with its CI over images, beside the same for the identity and
    chained-ridge baselines; the image-level R² of the pooled features; and the paper's R² beside the score the
    image-blind position mean gets under it."""
    out = ["Discriminating measures (held-out images): image-specific R² = 1 − SSE / SSE of the image-blind "
           "per-position mean (which scores 0); image-level R² across images of the pooled features.", "",
           "| run | k | phases | **image-specific R², AR** [95 % CI] | identity (TF) | ridge chained (AR) | "
           "image-level R² | image-level: ridge AR | paper's R² (all layers) | paper's R² of the position mean |",
           "|" + "---|" * 10]
    for m in runs:
        v = m["validation"]
        ar, b, il = v["autoregressive"], v.get("baselines", {}), v["image_level"]
        ci = ar.get("r2_image_specific_ci95")
        out.append(f"| `{m['_name']}` | {len(m['surrogate']['phases'])} | {_phases(m)} | **{_spec(ar)}**"
                   + (f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else "") + f" | {_spec(b.get('identity'))} | "
                   f"{_spec(b.get('ridge_autoregressive'))} | {_f(il['autoregressive']['r2'])} | "
                   f"{_f(il.get('ridge_autoregressive', {}).get('r2'))} | {_f(ar.get('r2_official_all_layers'))} | "
                   f"{_f(b.get('position_mean', {}).get('r2_official_all_layers'))} |")
    spec = [m for m in runs if "r2_image_specific" in m["validation"]["autoregressive"]]
    if spec:
        L = len(spec[0]["validation"]["layers"])
        out += ["", "| held-out image-specific R² per layer | " + " | ".join(str(i) for i in range(1, L + 1))
                + " | mean |", "|" + "---|" * (L + 2)]
        for m in spec:
            ar = m["validation"]["autoregressive"]
            if len(ar["r2_image_specific"]) != L:
                continue
            rows = [(f"`{m['_name']}` AR", ar["r2_image_specific"])]
            rows += [(f"`{m['_name']}` AR, {g} tokens", ar["r2_image_specific_groups"][g]) for g in ("cls", "patches")
                     if g in ar.get("r2_image_specific_groups", {})]
            for name, r in rows:
                out.append(f"| {name} | " + " | ".join(_f(x, 2) for x in r) + f" | {_f(sum(r) / len(r))} |")
    return out + [""]


def report(runs: list[dict]) -> str:
    if not runs:
        raise RaptorError("give at least one run directory")
    out = discriminating_table(runs)
    out.append("| run | teacher | k | phases | loss | steps (stage 1 / 2) × batch | train s | mean AR R² | "
               "mean per-block R² | image-level R² (variance kept) | fresh probe, full | % of teacher | "
               "teacher-probe agreement |")
    out.append("|" + "---|" * 13)
    for m in runs:
        c, v = m["config"], m["validation"]
        ar, pb, il = v["autoregressive"], v["per_block_from_teacher"], v["image_level"]["autoregressive"]
        pr = v.get("probes")
        full = _full(pr) if pr else {}
        out.append(f"| {_label(m)} | {m['teacher']['spec']} | {len(m['surrogate']['phases'])} | {_phases(m)} | "
                   f"{c.get('loss_norm', 'none')} | {_steps1(m)} / {c['steps2']} × {c['batch_size']} | "
                   f"{_train_s(m):.0f} | **{_f(ar['r2_mean'])}** | {_f(pb['r2_mean'])} | "
                   f"{_f(il['r2'])} ({_f(il['variance_kept'], 2)}) | {_f(full.get('fresh_probe_accuracy'))} | "
                   f"{_f(full.get('pct_of_teacher'), 2)} | {_f(full.get('teacher_probe_agreement'))} |")
    out += seed_summary(runs)
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
        cells = [f"{k}: {_f(b['fresh_probe_accuracy'])} ({_f(b['pct_of_teacher'], 2)} %) / "
                 f"{_f(b['teacher_probe_agreement'])}" for k, b in pr["backbones"].items()]
        out.append(f"- `{m['_name']}` ({pr['data']}, {pr['n_train']} train / {pr['n_test']} held-out images): "
                   + "; ".join(cells))
    return "\n".join(out) + "\n"


def console_summary(m: dict, out: Path) -> list[str]:
    """What ``raptor fit`` prints when it is done: the phases, the recipe, held-out R² per layer (image-specific
    first) beside the baselines, the probes, and the files written to ``out``."""
    v = m["validation"]
    ar = v["autoregressive"]
    lines = [f"phases: {m['surrogate']['phases']}  ({m['phases_chosen']['how']}; {v['n_images']} held-out images)"]
    rec = m["recipe"]
    lines.append(f"recipe: {rec['name']}" + (" (overridden: " + ", ".join(f"{n} {o['used']}" for n, o in
                                                                         rec["overridden"].items()) + ")"
                                            if rec["overridden"] else ""))
    bl = v.get("baselines", {})
    if "r2_image_specific" in ar:  # first: what a model blind to the image cannot score (the position mean: 0)
        lo, hi = ar["r2_image_specific_ci95"]
        lines.append("held-out image-specific R2 per layer, Raptor AR:  " + " ".join(f"{x:.3f}" for x in
                                                                                ar["r2_image_specific"]) +
                     f"  mean {ar['r2_image_specific_mean']:.3f} [95% CI {lo:.3f}, {hi:.3f}]")
        for key in ("identity", "ridge_autoregressive"):
            if key in bl:
                lines.append(f"  baseline {key:<21}" + " ".join(f"{x:.3f}" for x in bl[key]["r2_image_specific"]) +
                             f"  mean {bl[key]['r2_image_specific_mean']:.3f}")
    il = v["image_level"]["autoregressive"]
    lines.append(f"image-level R2 of pooled features: {il['r2']:.3f} (variance kept {il['variance_kept']:.2f})")
    lines.append("held-out R2 per layer, Raptor AR:  " + " ".join(f"{x:.3f}" for x in ar["r2"]) +
                 f"  mean {ar['r2_mean']:.3f}")
    for key in ("identity", "ridge_teacher_forced", "position_mean"):
        if key in bl:
            b = bl[key]
            lines.append(f"  baseline {key:<21}" + " ".join(f"{x:.3f}" for x in b["r2"]) + f"  mean {b['r2_mean']:.3f}")
    if "position_mean" in bl:
        lines.append(f"paper's R2 (all layers pooled): Raptor {ar['r2_official_all_layers']:.3f}; the image-blind "
                     f"position mean scores {bl['position_mean']['r2_official_all_layers']:.3f} under it")
    if v.get("probes"):
        for name, b in v["probes"]["backbones"].items():
            lines.append(f"fresh probe {name:<14} {b['fresh_probe_accuracy']:.3f} ({b['pct_of_teacher']:.1f} % of "
                         f"teacher); teacher-probe agreement {b['teacher_probe_agreement']:.3f}")
    lines.append(f"wrote {out / 'metrics.json'}, {out / 'r2_image_specific_per_layer.png'}, "
                 f"{out / 'r2_per_layer.png'}, {out / 'model.safetensors'} and the run's config, plots and checkpoints")
    return lines
