"""Figures in the shape of the paper's Figures 3 and 4, and ``report.md`` of ``raptor study``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
    "gap in sigma": "(DP-phase score − mean over random contiguous partitions of the same k) / their std",
    "layer swap": "block j run in place of block i, j from the same DP phase (intra) or another (inter); n = 1..3 "
                  "layers swapped; mean over random draws",
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

    if cfg.random_partitions:
        fig, axes = plt.subplots(1, len(cfg.ks), figsize=(5.5 * len(cfg.ks), 3.6), squeeze=False)
        for ax, k in zip(axes[0], cfg.ks):
            order = sorted(results, key=lambda r: (r["p"], r["seed"]))
            for i, r in enumerate(order):
                f = r["fits"][str(k)]
                ax.scatter([i] * len(f["random"]), [x["accuracy"] for x in f["random"]], s=8, color="grey",
                           label="random partitions" if i == 0 else None)
                ax.scatter([i], [f["dp"]["accuracy"]], s=30, color="C3", marker="D",
                           label="DP (max-cut) phases" if i == 0 else None)
            ax.set_xticks(range(len(order)), [f"p{r['p']:g}\ns{r['seed']}" for r in order], fontsize=7)
            ax.set_ylabel(f"Raptor k={k} test top-1")
            ax.legend(fontsize=7)
        fig.suptitle("Figure 3 shape: phases found from similarity vs random contiguous partitions of the same k",
                     fontsize=9)
        figs["phases_vs_random"] = save_figure(fig, out / "fig3_phases_vs_random.png")
    return figs


def _f(v, fmt="{:.3f}") -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else fmt.format(v)


def render(cfg, study: dict) -> str:
    runs = sorted(study["runs"], key=lambda r: (r["p"], r["seed"]))
    k0 = min(cfg.ks)
    lines = [f"# Small-scale study: stochastic depth and block recurrence ({cfg.data})", "",
             f"ViT: HF Dinov2 classifier, depth {cfg.vit.depth}, width {cfg.vit.dim}, {cfg.vit.heads} heads, patch "
             f"{cfg.vit.patch_size} at {cfg.vit.image_size} px; {cfg.train.epochs} epochs, AdamW lr {cfg.train.lr:g}, "
             f"batch {cfg.train.batch_size}, translation ±{cfg.train.shift} px. Uniform stochastic depth p ∈ "
             f"{list(cfg.sd)}, seeds {list(cfg.seeds)}. Raptor fits: {cfg.fit.steps1} stage-1 steps per block, "
             f"{cfg.fit.steps2} stage-2 steps, batch {cfg.fit.batch_size}; k ∈ {list(cfg.ks)}; "
             f"{cfg.random_partitions} random contiguous partitions per k.", "",
             "## Correlations across the sweep", "", "| correlation | ρ | 95 % CI | p-value | runs |",
             "|---|---|---|---|---|"]
    for name, c in study["correlations"].items():
        ci = "–" if not c["ci95"] else f"[{c['ci95'][0]:.2f}, {c['ci95'][1]:.2f}]"
        lines.append(f"| {name} | {_f(c['rho'], '{:.2f}')} | {ci} | {_f(c['p_value'], '{:.3g}')} | {c['n']} |")
    lines += ["", "## Per run", "",
              f"| p | seed | teacher top-1 | mean layer sim | DP phases k={max(cfg.ks)} | "
              + " | ".join(f"k={k} R² (cls / patches) | k={k} top-1 | random k={k} top-1 | gap σ (top-1 / R²)"
                           for k in cfg.ks) + " | baselines R²: identity ℓ−1→ℓ (teacher forced) / ridge chained "
                                              "from layer 0 (autoregressive) |",
              "|---|---|---|---|---|" + "---|---|---|---|" * len(cfg.ks) + "---|"]
    for r in runs:
        cells = [f"{r['p']:g}", str(r["seed"]), _f(r["teacher_accuracy"]), _f(r["phases"]["mean_layer_similarity"]),
                 " / ".join(f"{p[0]}–{p[-1]}" for p in r["phases"]["dp"][str(max(cfg.ks))]["phases"])]
        for k in cfg.ks:
            f = r["fits"][str(k)]
            g = f["dp"]["r2_groups_mean"]
            cells += [f"{_f(f['dp']['r2_mean'])} ({_f(g.get('cls'))} / {_f(g.get('patches'))})",
                      _f(f["dp"]["accuracy"]),
                      f"{_f(f.get('random_accuracy_mean'))} ± {_f(f.get('random_accuracy_std'))}",
                      f"{_f(f.get('gap_sigma_accuracy'), '{:.1f}')} / {_f(f.get('gap_sigma_r2_mean'), '{:.1f}')}"]
        b = r["fits"][str(k0)]["dp"].get("baselines_r2_mean", {})
        cells.append(f"{_f(b.get('identity'))} / {_f(b.get('ridge_autoregressive'))}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "DP (max-cut) phases vs random contiguous partitions: the DP fit beats the random mean in " +
              "; ".join(f"k={k}: top-1 {study['fraction_dp_beats_random_mean'][str(k)]['accuracy']:.0%} of runs "
                        f"(> 1σ in {study['fraction_gap_above_1_sigma'][str(k)]['accuracy']:.0%}), R² "
                        f"{study['fraction_dp_beats_random_mean'][str(k)]['r2_mean']:.0%} (> 1σ in "
                        f"{study['fraction_gap_above_1_sigma'][str(k)]['r2_mean']:.0%})" for k in cfg.ks) + "."]
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
    lines += ["", "## Definitions", ""] + [f"- **{k}**: {v}" for k, v in study["definitions"].items()]
    lines += ["", "## Figures", ""] + [f"![{k}]({v})" for k, v in study["figures"].items()]
    return "\n".join(lines) + "\n"
