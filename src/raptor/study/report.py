"""Figures in the shape of the paper's Figures 3 and 4, and ``report.md`` of ``raptor study``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raptor.phases import format_phases
from raptor.plots import plt, save_figure

DEFINITIONS = {
    "mean_layer_similarity": "mean over layer pairs i < j of 1 − d_ij, d = the paper's cosine distance on the [cls, "
                             "mean patch] summary over the test images (the primary block-structure metric: the "
                             "paper's 'higher p gives more similar layers')",
    "dp phases": "the contiguous segmentation minimising total within-phase distance (exact DP) for each k",
    "contrast": "mean distance between phases − mean distance within phases, for the DP phases",
    "raptor R2": "held-out autoregressive R² of a Raptor fit, mean over layers (and per token group), on 128 whole "
                 "training-split images held out from the fit",
    "raptor accuracy": "the teacher's own head on the surrogate's last layer, test split",
    "partition nulls": "random: any contiguous partition of the same k; balanced: contiguous partitions whose every "
                       "phase has ≥ max(2, ⌊L / 2k⌋) layers; shuffled: non-contiguous partitions with the DP phase "
                       "sizes (each fitted with the same budget and seed as the DP phases)",
    "gap in sigma": "(DP-phase score − mean over a null family's partitions) / their sample std; rank: the DP fit's "
                    "place among the DP fit and the family's fits (1 = best)",
    "layer swap": "block j run in place of block i, j from the same DP phase (intra) or another (inter); n = 1..3 "
                  "layers swapped; mean over random draws (an intra partner is closer in depth by construction)",
    "matched swap effect": "every single swap i ← j scored; per depth distance |i − j| holding both kinds, mean "
                           "intra − mean inter accuracy; averaged over those distances weighted by min(n_intra, "
                           "n_inter). Phases chosen on one half of the test images, swaps scored on the other; null: "
                           "the same effect for every other contiguous partition of the same k",
    "spearman": "Spearman ρ over all (p, seed) runs, 95 % CI from a percentile bootstrap over runs (2,000)",
}


def _by_p(results, fn):
    ps = sorted({r["p"] for r in results})
    vals = [[fn(r) for r in results if r["p"] == p] for p in ps]
    return np.array(ps), np.array([np.mean(v) for v in vals]), np.array([np.std(v) for v in vals])


def plots(out: Path, cfg, results: list[dict]) -> dict:
    figs = {}
    seed0 = min(r["seed"] for r in results)
    rs = sorted([r for r in results if r["seed"] == seed0], key=lambda r: r["p"])
    kk = str(max(cfg.ks))
    fig, axes = plt.subplots(1, len(rs), figsize=(2.6 * len(rs), 2.8), squeeze=False)
    for ax, r in zip(axes[0], rs):
        D = np.array(r["phases"]["distance"])
        ax.imshow(1 - D, cmap="viridis", vmin=min(0.0, float((1 - D).min())), vmax=1)
        for ph in r["phases"]["dp"][kk]["phases"][1:]:
            ax.axhline(ph[0] - 1.5, color="red", ls="--", lw=1)
            ax.axvline(ph[0] - 1.5, color="red", ls="--", lw=1)
        ax.set_title(f"p = {r['p']:g}\nmean sim {r['phases']['mean_layer_similarity']:.2f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"layer similarity (1 − cosine distance), seed {seed0}; dashed: DP phases k = {kk}", fontsize=9)
    figs["similarity"] = save_figure(fig, out / "fig4a_similarity.png")

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for k in cfg.ks:
        for g, ls in (("cls", "-"), ("patches", "--")):
            ps, m, s = _by_p(results, lambda r: r["fits"][str(k)]["dp"]["r2_groups_mean"].get(g, np.nan))
            axes[0].errorbar(ps, m, s, ls=ls, marker="o", ms=3, capsize=2, label=f"k={k}, {g}")
    ps, m, s = _by_p(results, lambda r: r["fits"][str(min(cfg.ks))]["dp"]["identity_r2_mean"])
    axes[0].errorbar(ps, m, s, ls=":", color="k", marker="o", ms=3, capsize=2, label="baseline: identity ℓ−1→ℓ")
    axes[0].set_ylabel("held-out AR R² (mean over layers)")
    ps, m, s = _by_p(results, lambda r: r["teacher_accuracy"])
    axes[1].errorbar(ps, m, s, marker="o", ms=3, capsize=2, label="teacher (ViT)", color="k")
    for k in cfg.ks:
        ps, m, s = _by_p(results, lambda r: r["fits"][str(k)]["dp"]["accuracy"])
        axes[1].errorbar(ps, m, s, marker="o", ms=3, capsize=2, label=f"Raptor k={k}")
    axes[1].set_ylabel("test top-1")
    ps, m, s = _by_p(results, lambda r: r["phases"]["mean_layer_similarity"])
    axes[2].errorbar(ps, m, s, marker="o", ms=3, capsize=2, label="mean layer similarity")
    for k in cfg.ks:
        ps, m, s = _by_p(results, lambda r: r["phases"]["dp"][str(k)]["metrics"]["contrast"])
        axes[2].errorbar(ps, m, s, marker="o", ms=3, capsize=2, ls="--", label=f"DP k={k} contrast")
    axes[2].set_ylabel("block structure")
    for ax in axes:
        ax.set_xlabel("stochastic depth p")
        ax.legend(fontsize=7)
    fig.suptitle("Figure 4 shape: R², accuracy and block structure vs stochastic depth (mean ± std over seeds)",
                 fontsize=9)
    figs["vs_p"] = save_figure(fig, out / "fig4bce_vs_p.png")

    families = [f for f in cfg.partitions if any(r["fits"][str(k)].get(f) for r in results for k in cfg.ks)]
    if cfg.random_partitions and families:
        fig, axes = plt.subplots(1, len(cfg.ks), figsize=(5.5 * len(cfg.ks), 3.6), squeeze=False)
        color = {"random": "grey", "balanced": "C0", "shuffled": "C2"}
        for ax, k in zip(axes[0], cfg.ks):
            order = sorted(results, key=lambda r: (r["p"], r["seed"]))
            for i, r in enumerate(order):
                f = r["fits"][str(k)]
                for j, fam in enumerate(families):
                    xs = f.get(fam, [])
                    ax.scatter([i + 0.15 * (j - (len(families) - 1) / 2)] * len(xs), [x["r2_mean"] for x in xs],
                               s=8, color=color[fam], label=f"{fam} partitions" if i == 0 else None)
                ax.scatter([i], [f["dp"]["r2_mean"]], s=30, color="C3", marker="D",
                           label="DP phases" if i == 0 else None)
            ax.set_xticks(range(len(order)), [f"p{r['p']:g}\ns{r['seed']}" for r in order], fontsize=7)
            ax.set_ylabel(f"Raptor k={k} held-out R²")
            ax.legend(fontsize=7)
        fig.suptitle("Figure 3 shape: phases found from similarity vs partition nulls of the same k (same budget)",
                     fontsize=9)
        figs["phases_vs_random"] = save_figure(fig, out / "fig3_phases_vs_random.png")
    return figs


def _f(v, fmt="{:.3f}") -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v)


def _nulls_section(cfg, study: dict, runs: list[dict]) -> list[str]:
    """The found phases against each partition null: a summary over runs, then one row per run, k and family."""
    nulls = study.get("partition_nulls", {})
    if not nulls:
        return []
    out = ["", "## Found phases against partition nulls", "",
           "The DP phases' Raptor fit against fits of other partitions of the same k, same budget and seed "
           "(score: held-out R², mean over layers; and the teacher head's top-1 on the surrogate).", "",
           "| k | null | runs | DP beats the null's mean (R² / top-1) | gap > 1σ (R² / top-1) | mean gap σ "
           "(R² / top-1) | mean rank of the DP fit (R² / top-1) |", "|---|---|---|---|---|---|---|"]
    for k, fams in nulls.items():
        for fam, c in fams.items():
            r2, acc = c["r2_mean"], c["accuracy"]
            pct = (lambda v: "–" if v is None else f"{v:.0%}")  # noqa: E731
            out.append(f"| {k} | {fam} | {r2['runs']} | {pct(r2['fraction_dp_beats_mean'])} / "
                       f"{pct(acc['fraction_dp_beats_mean'])} | {pct(r2['fraction_gap_above_1_sigma'])} / "
                       f"{pct(acc['fraction_gap_above_1_sigma'])} | {_f(r2['mean_gap_sigma'], '{:.2f}')} / "
                       f"{_f(acc['mean_gap_sigma'], '{:.2f}')} | {_f(r2['mean_rank'], '{:.1f}')} / "
                       f"{_f(acc['mean_rank'], '{:.1f}')} of {r2['of']} |")
    out += ["", "| p | seed | k | null | n | DP R² | null R² mean ± sd | gap σ | rank | DP top-1 | null top-1 "
                "mean ± sd | gap σ | rank |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for k in cfg.ks:
            for fam, c in r["fits"][str(k)].get("nulls", {}).items():
                cells = [f"{r['p']:g}", str(r["seed"]), str(k), fam, str(c["n"])]
                for key in ("r2_mean", "accuracy"):
                    d = c[key]
                    cells += [_f(d["dp"]), f"{_f(d['mean'])} ± {_f(d['std'])}", _f(d["gap_sigma"], "{:.2f}"),
                              f"{d['rank']} / {d['of']}"]
                out.append("| " + " | ".join(cells) + " |")
    return out


def _matched_section(cfg, study: dict, runs: list[dict]) -> list[str]:
    rows = [r for r in runs if r.get("swap", {}).get("matched")]
    if not rows:
        return []
    s = study.get("matched_swaps", {})
    out = ["", f"## Depth-matched swaps (k = {max(cfg.ks)}; phases chosen on half of the test images, every single "
               "swap scored on the other half)", "",
           f"Significant (p < 0.05 against every other contiguous partition) in "
           f"{_f(s.get('fraction_significant'), '{:.0%}')} of {s.get('runs')} runs; mean effect "
           f"{_f(s.get('mean_effect'))} top-1.", "",
           "| p | seed | phases | no swap | effect: intra − inter at equal lag | null mean ± sd (n) | p-value | "
           "unmatched intra − inter |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["swap"]["matched"]
        out.append(f"| {r['p']:g} | {r['seed']} | {format_phases(m['phases'])} | {_f(m['baseline_accuracy'])} | "
                   f"{_f(m['effect'])} | {_f(m['null_mean'])} ± {_f(m['null_std'])} ({m['null_n']}) | "
                   f"{_f(m['p_value'])} | {_f(m['unmatched_contrast'])} |")
    return out


def _correlations(study: dict) -> list[str]:
    lines = ["## Correlations across the sweep", "", "| correlation | ρ | 95 % CI | p-value | runs |",
             "|---|---|---|---|---|"]
    for name, c in study["correlations"].items():
        ci = "–" if not c["ci95"] else f"[{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"
        lines.append(f"| {name} | {_f(c['rho'], '{:.2f}')} | {ci} | {_f(c['p_value'], '{:.3g}')} | {c['n']} |")
    return lines


def _references(cfg, study: dict) -> list[str]:
    refs = study.get("references") or []
    if not refs:
        return []
    lines = ["", "## Figure 13 reference points (p = 0, seed 0; not in the correlations)", "",
             "| ViT | what | train top-1 | test top-1 | mean layer sim | DP phases k=" + str(max(cfg.ks)) + " | "
             + " | ".join(f"k={k} R² | k={k} top-1" for k in cfg.ks) + " |",
             "|---|---|---|---|---|---|" + "---|---|" * len(cfg.ks)]
    for r in refs:
        cells = [r["reference"]["kind"], r["reference"]["what"], _f(r["train"].get("train_accuracy")),
                 _f(r["teacher_accuracy"]), _f(r["phases"]["mean_layer_similarity"]),
                 format_phases(r["phases"]["dp"][str(max(cfg.ks))]["phases"])]
        for k in cfg.ks:
            cells += [_f(r["fits"][str(k)]["dp"]["r2_mean"]), _f(r["fits"][str(k)]["dp"]["accuracy"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def verdict_sections(cfg, study: dict) -> str:
    """What the docs page leads with (``make results``): the correlations, the found phases against their partition
    nulls, the depth-matched swaps and the Figure 13 reference points."""
    runs = sorted(study["runs"], key=lambda r: (r["p"], r["seed"]))
    return "\n".join(_correlations(study) + _nulls_section(cfg, study, runs) + _matched_section(cfg, study, runs)
                     + _references(cfg, study)) + "\n"


def render(cfg, study: dict) -> str:
    runs = sorted(study["runs"], key=lambda r: (r["p"], r["seed"]))
    k0 = min(cfg.ks)
    lines = [f"# Small-scale study: stochastic depth and block recurrence ({cfg.data})", "",
             f"ViT: HF Dinov2 classifier, depth {cfg.vit.depth}, width {cfg.vit.dim}, {cfg.vit.heads} heads, patch "
             f"{cfg.vit.patch_size} at {cfg.vit.image_size} px; {cfg.train.epochs} epochs, AdamW lr {cfg.train.lr:g}, "
             f"batch {cfg.train.batch_size}, translation ±{cfg.train.shift} px. Uniform stochastic depth p ∈ "
             f"{list(cfg.sd)}, seeds {list(cfg.seeds)}. Raptor fits: {cfg.fit.steps1} stage-1 steps per block, "
             f"{cfg.fit.steps2} stage-2 steps, batch {cfg.fit.batch_size}; k ∈ {list(cfg.ks)}; up to "
             f"{cfg.random_partitions} partitions per k of each null family: {', '.join(cfg.partitions)}.", ""]
    lines += _correlations(study)
    lines += ["", "## Per run", "",
              f"| p | seed | teacher top-1 | mean layer sim | DP phases k={max(cfg.ks)} | "
              + " | ".join(f"k={k} R² (cls / patches) | k={k} top-1" for k in cfg.ks)
              + " | baselines R²: identity ℓ−1→ℓ (teacher forced) / ridge chained from layer 0 (autoregressive) |",
              "|---|---|---|---|---|" + "---|---|" * len(cfg.ks) + "---|"]
    for r in runs:
        cells = [f"{r['p']:g}", str(r["seed"]), _f(r["teacher_accuracy"]), _f(r["phases"]["mean_layer_similarity"]),
                 format_phases(r["phases"]["dp"][str(max(cfg.ks))]["phases"])]
        for k in cfg.ks:
            f = r["fits"][str(k)]
            g = f["dp"]["r2_groups_mean"]
            cells += [f"{_f(f['dp']['r2_mean'])} ({_f(g.get('cls'))} / {_f(g.get('patches'))})",
                      _f(f["dp"]["accuracy"])]
        b = r["fits"][str(k0)]["dp"].get("baselines_r2_mean", {})
        cells.append(f"{_f(b.get('identity'))} / {_f(b.get('ridge_autoregressive'))}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += _nulls_section(cfg, study, runs)
    swaps = [r for r in runs if r.get("swap", {}).get("by_n")]
    if swaps:
        ns = sorted({n for r in swaps for n in r["swap"]["by_n"]})
        lines += ["", f"## Layer swaps (DP phases k = {max(cfg.ks)}; test top-1, mean over "
                      f"{cfg.swap_samples} draws)", "",
                  "| p | seed | no swap | " + " | ".join(f"{n} intra | {n} inter" for n in ns) + " |",
                  "|---|---|---|" + "---|---|" * len(ns)]
        for r in swaps:
            s = r["swap"]
            cells = [f"{r['p']:g}", str(r["seed"]), _f(s["baseline_accuracy"])]
            for n in ns:
                d = s["by_n"].get(n)
                cells += [_f(d["intra"]["mean"]), _f(d["inter"]["mean"])] if d else ["–", "–"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += _matched_section(cfg, study, runs)
    lines += _references(cfg, study)
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in study["definitions"].items()]
    lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in study["figures"].items()]
    return "\n".join(lines) + "\n"


def console_summary(res: dict, out: Path) -> list[str]:
    """What ``raptor study`` prints when it is done: the correlations, the DP phases against each null family, the
    depth-matched swaps, the files."""
    lines = []
    for name, c in res["correlations"].items():
        rho = "n/a" if c["rho"] is None else f"{c['rho']:.2f} [{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"
        lines.append(f"{name}: {rho} (n = {c['n']})")
    for k, fams in res["partition_nulls"].items():
        for fam, c in fams.items():
            if c["r2_mean"]["runs"]:
                lines.append(f"k={k} DP phases vs {fam} partitions (R²): beat their mean in "
                             f"{c['r2_mean']['fraction_dp_beats_mean']:.0%} of runs, by > 1σ in "
                             f"{c['r2_mean']['fraction_gap_above_1_sigma']:.0%}; mean rank "
                             f"{c['r2_mean']['mean_rank']:.1f} of {c['r2_mean']['of']}")
    m = res["matched_swaps"]
    if m["runs"]:
        lines.append(f"depth-matched swaps: intra − inter {m['mean_effect']:+.3f} top-1, significant in "
                     f"{m['fraction_significant']:.0%} of {m['runs']} runs")
    lines.append(f"wrote {out / 'report.md'}, {out / 'study.json'} and {len(res['figures'])} figures")
    return lines
