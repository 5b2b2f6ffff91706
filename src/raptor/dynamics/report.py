"""The plots and ``report.md`` of ``raptor dynamics``. The criteria they report are in
:mod:`raptor.dynamics.criteria`, the tests against nulls in :mod:`raptor.dynamics.verdicts`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raptor.dynamics.metrics import pca_2d
from raptor.plots import plt, save_figure

# ---- plots ---------------------------------------------------------------------------------------------------
STYLE = {"teacher": "-", "surrogate": "--"}
PCA_POINTS = 600
GROUP_COLOR = {"cls": "C3", "registers": "C2", "patches": "C0", "all": "C7"}


def _boundaries(ax, phases) -> None:
    for p in phases[1:]:
        ax.axvline(p[0] - 0.5, color="grey", ls=":", lw=1)


def _per_group(stage: Path, name: str, dyn: dict, key: str, x0: int, ylabel: str, title: str) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for model, m in dyn["models"].items():
        for g, s in m[key].items():
            mean, std = np.asarray(s["mean"]), np.asarray(s["std"])
            x = np.arange(x0, x0 + len(mean))
            ax.plot(x, mean, STYLE[model], color=GROUP_COLOR[g], marker="o", ms=3, label=f"{g} ({model})")
            if model == "teacher":
                ax.fill_between(x, mean - std, mean + std, color=GROUP_COLOR[g], alpha=0.12)
    _boundaries(ax, dyn["phases"])
    ax.set_xlabel("layer" if x0 == 0 else "layer produced (step ℓ−1 → ℓ)")
    ax.set_ylabel(ylabel)
    ax.set_title(title + "  (dotted: phase boundaries)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, stage / name)


def plots(stage: Path, dyn: dict, results: dict, basins: dict) -> dict:
    figs = {"convergence": _per_group(stage, "convergence.png", dyn, "gamma", 0, "γ = cos(x̂_ℓ, x̂_L)",
                                      "directional convergence (band: ±1 std over images, teacher)"),
            "speed": _per_group(stage, "speed.png", dyn, "speed", 1, "angular speed (rad)", "angular speed")}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for model, m in dyn["models"].items():
        ax.plot(dyn["layers"], m["coherence"]["mean"], STYLE[model], marker="o", ms=3, label=model)
    _boundaries(ax, dyn["phases"])
    ax.set_xlabel("layer")
    ax.set_ylabel("patch coherence κ")
    ax.set_title("patch coherence (mean cosine of patches to their mean direction)", fontsize=9)
    ax.legend(fontsize=8)
    figs["coherence"] = save_figure(fig, stage / "coherence.png")

    if dyn["models"]["teacher"]["ranks"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for ax, kind in zip(axes, ("effective_rank", "stable_rank")):
            for model, m in dyn["models"].items():
                for suffix, color in (("", "C0"), ("_directions", "C1")):
                    y = m["ranks"][kind + suffix]["mean"]
                    ax.plot(range(1, len(y) + 1), y, STYLE[model], color=color, marker="o", ms=3,
                            label=f"{'unit-direction' if suffix else 'raw'} update ({model})")
            _boundaries(ax, dyn["phases"])
            ax.set_yscale("log")
            ax.set_xlabel("layer produced")
            ax.set_title(kind.replace("_", " ") + " of Δ_ℓ (tokens × channels, per image)", fontsize=9)
            ax.legend(fontsize=7)
        figs["ranks"] = save_figure(fig, stage / "ranks.png")

    avail = {k: b for k, b in basins.items() if b.get("available")}
    if avail:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for model, b in avail.items():
            axes[0].plot(dyn["layers"], b["knn_accuracy"], STYLE[model], marker="o", ms=3, label=model)
            axes[1].plot(dyn["layers"], b["silhouette"], STYLE[model], marker="o", ms=3, label=model)
        axes[0].axhline(next(iter(avail.values()))["majority_baseline"], color="k", ls=":", lw=1,
                        label="baseline: majority class")
        axes[0].set_ylabel(f"leave-one-out {next(iter(avail.values()))['knn_k']}-NN accuracy")
        axes[1].set_ylabel("cosine silhouette")
        for ax in axes:
            _boundaries(ax, dyn["phases"])
            ax.set_xlabel("layer")
            ax.legend(fontsize=8)
        fig.suptitle(f"class basins of the {dyn['readout']} direction", fontsize=10)
        figs["basins"] = save_figure(fig, stage / "basins.png")
        figs["basins_pca"] = _pca_grid(stage / "basins_pca.png", dyn, results, avail)

    fig, ax = plt.subplots(figsize=(6.6, 4))
    for model, m in dyn["models"].items():
        for i, r in enumerate(m["perturbation"]["runs"]):
            color = f"C{dyn['inject_layers'].index(r['layer']) % 10}"
            alpha = 0.45 + 0.55 * (dyn["eps"].index(r["eps"]) + 1) / len(dyn["eps"])
            ax.plot(r["layers"], r["distance"]["all"], STYLE[model], color=color, alpha=alpha, marker="o", ms=2,
                    label=f"ℓ={r['layer']}, ε={r['eps']:g} ({model})")
            if model == "teacher" and r["eps"] == max(dyn["eps"]):  # what norm growth alone would leave
                ax.plot(r["layers"], np.asarray(r["baseline_norm_growth"]) * r["distance"]["all"][0], ":",
                        color=color, lw=1, label=f"baseline: norm growth, ℓ={r['layer']} (teacher)")
    _boundaries(ax, dyn["phases"])
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("angle to the unperturbed run (rad)")
    ax.set_title("perturbation recovery (noise ε at layer ℓ; falling = self-correcting)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    figs["perturbation"] = save_figure(fig, stage / "perturbation.png")
    return figs


def _pca_grid(path: Path, dyn: dict, results: dict, basins: dict) -> str:
    """Rows: models; columns: the embedded pixels (layer-0 mean patch direction, the baseline) and the read-out
    direction at the middle layer and at each phase's last layer."""
    L = dyn["layers"][-1]
    cols = [None] + sorted({p[-1] for p in dyn["phases"]} | {L // 2})[:6]
    fig, axes = plt.subplots(len(basins), len(cols), figsize=(2.3 * len(cols), 2.4 * len(basins)), squeeze=False)
    for r, (model, b) in enumerate(basins.items()):
        y = results[model]["labels"]
        if len(y) > PCA_POINTS:  # the projection uses every image; the scatter shows a fixed random subset
            show = np.sort(np.random.default_rng(0).choice(len(y), PCA_POINTS, replace=False))
        else:
            show = np.arange(len(y))
        for c, layer in enumerate(cols):
            if layer is None:
                feats, knn = results[model]["embedded"].numpy(), b["embedded_baseline"]["knn_accuracy"]
                title = f"{model} · embedded pixels"
            else:
                feats, knn = results[model]["readout"][:, layer].numpy(), b["knn_accuracy"][layer]
                title = f"{model} · layer {layer}"
            xy, var = pca_2d(feats)
            ax = axes[r, c]
            ax.scatter(xy[show, 0], xy[show, 1], c=y[show], cmap="tab10", s=4, vmin=0, vmax=max(9, int(y.max())))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{title}\nkNN {knn:.2f}, PCA {var.sum():.0%}", fontsize=7)
    fig.suptitle(f"{dyn['readout']} directions (first column: layer-0 mean patch, the baseline): first two principal "
                 f"components per panel, colour = class", fontsize=9)
    return save_figure(fig, path)


# ---- report ----------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items() if not isinstance(x, (list, dict)) or k == "value")
    return str(v)


def _row(values, fmt="{:.3f}") -> str:
    return " | ".join(fmt.format(v) for v in values)


def _test_cell(t: dict | None) -> str:
    if not t:
        return "–"
    if t.get("effect") is None:
        return "not measurable"
    ci = t.get("ci95")
    return (f"{t['effect']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") +
            f", p = {t['p_value']:.3g}" + (f" (Holm {t['p_holm']:.3g})" if t.get("p_holm") is not None else ""))


def verdict_section(dyn: dict) -> list[str]:
    """The verdicts as tests against their nulls, and which survive every operationalisation."""
    if not dyn.get("verdicts"):
        return []
    null = dyn.get("null", {})
    out = ["## Verdicts against their nulls", "",
           f"Each operationalisation is a test: effect with a bootstrap 95 % CI over images and a one-sided p-value, "
           f"against a reference on the same images and against {null.get('draws', 0)} random-weight teachers "
           f"({null.get('what', '')}); it **holds** when every test it has gives p < 0.05 in the claimed direction "
           f"after Holm's correction over all tests of the model (`raptor/dynamics/verdicts.py`).", ""]
    for model, v in dyn["verdicts"].items():
        out += [f"**{model}**", "", "| finding | operationalisation | against the reference | against random weights "
                "| verdict |", "|---|---|---|---|---|"]
        for row in v.values():
            ref = row.get("against_reference") or row.get("against_partitions")
            ref_txt = (_test_cell(ref) + (f" (null: {ref['null']})" if ref and ref.get("null") else "")) if ref \
                else "–"
            if ref and (ref.get("min_p") or 0) >= 0.05:
                ref_txt += f"; the smallest p this null allows is {ref['min_p']:.3f}: it cannot reach 0.05"
            out.append(f"| ({row['finding'].replace('boundary_jumps', 'speed jumps')}) | {row['operationalisation']} "
                       f"| {ref_txt} | {_test_cell(row.get('against_random_weights'))} | **{row['verdict']}** |")
        rob = dyn["robustness"][model]
        out += ["", "Robustness: " + "; ".join(f"({f}) {r['summary']}" for f, r in rob.items()) + ".", ""]
    agree = dyn.get("surrogate_agreement")
    if agree:
        out += ["**Does the surrogate reproduce the teacher's curves?** Pearson r over layers of the mean curves "
                "[bootstrap 95 % CI over images] and the largest gap, with and without the last layer:", "",
                "| curve | r, all layers | largest gap | r, without the last layer | largest gap |",
                "|---|---|---|---|---|"]
        for name, row in agree.items():
            cells = []
            for label in ("all layers", "without the last layer"):
                c = row[label]
                r = "–" if c["r"] is None else f"{c['r']:.3f}" + (f" [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
                                                                   if c["ci95"] else "")
                cells += [r, "–" if c["max_abs_gap"] is None else f"{c['max_abs_gap']:.3f}"]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def render(dyn: dict) -> str:
    L = dyn["layers"][-1]
    t = dyn["teacher"]
    models = dyn["models"]
    space = "the residual stream x_ℓ (as the paper)" if dyn["space"] == "raw" else "final_norm(x_ℓ) at every layer"
    sur = dyn["surrogate"]
    sur_line = f"{sur['run']} (phases {sur['phases']}); rolled out on its own from the teacher’s layer 0" if sur \
        else "none"
    lines = [f"# Dynamics of {t['name'] or t['spec']} ({t['spec']})", "",
             f"- data: {dyn['data']['spec'] or 'store ' + str(dyn['data']['store'])}, "
             f"{dyn['data']['n_images']} images ({dyn['data']['source']}); tokens: {dyn['layout']['n_tokens']} "
             f"({dyn['layout']['n_cls']} cls, {dyn['layout']['n_registers']} registers, "
             f"{dyn['layout']['n_patches']} patches)",
             f"- phases: {dyn['phases']} — {dyn['phases_source']}",
             f"- space: {space}",
             f"- surrogate: {sur_line}",
             f"- perturbation: ε = {', '.join(f'{e:g}' for e in dyn['eps'])} at layers {dyn['inject_layers']} on "
             f"{dyn['perturb_images']} images; ranks on {models['teacher']['n_ranked']} images",
             ""]
    lines += verdict_section(dyn)
    lines += ["", "## Findings by fixed thresholds (the earlier criteria, no null)", "",
              "| finding | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
    for key in ("i", "ii", "iii", "boundary_jumps"):
        f0 = dyn["findings"]["teacher"][key]
        lines.append(f"| ({key}) {f0['finding']} | " + " | ".join(f"**{dyn['findings'][m][key]['verdict']}**"
                                                                  for m in models) + " |")
    for model in models:
        lines += ["", f"### {model}", ""]
        for key in ("i", "ii", "iii"):
            f = dyn["findings"][model][key]
            lines.append(f"**({key}) {f['finding']}: {f['verdict']}**")
            lines.append("")
            for c in f["checks"]:
                mark = {True: "✔", False: "✘", None: "–"}[c["holds"]]
                lines.append(f"- {mark} {c['check']}: {_fmt(c['value'])}")
            lines.append("")
        bj = dyn["findings"][model]["boundary_jumps"]
        lines.append(f"**speed jumps at phase boundaries: {bj['verdict']}** (ratio {_fmt(bj['value'])}; "
                     f"{bj['check']})")
    lines += ["", "## Curves (mean over images)", ""]
    head = "| layer | " + " | ".join(str(i) for i in range(L + 1)) + " |"
    sep = "|---|" + "---|" * (L + 1)
    for model, m in models.items():
        lines += [f"**{model}**", "", head, sep]
        for g, s in m["gamma"].items():
            lines.append(f"| γ {g} | " + _row(s["mean"]) + " |")
        lines.append("| κ patches | " + _row(m["coherence"]["mean"]) + " |")
        for g, s in m["speed"].items():
            lines.append(f"| speed {g} (→ℓ) | – | " + _row(s["mean"]) + " |")
        for k, s in m["ranks"].items():
            lines.append(f"| {k.replace('_', ' ')} (→ℓ) | – | " + _row(s["mean"], "{:.1f}") + " |")
        b = m["basins"]
        if b.get("available"):
            lines.append(f"| kNN accuracy ({dyn['readout']}) | " + _row(b["knn_accuracy"]) + " |")
            lines.append(f"| silhouette ({dyn['readout']}) | " + _row(b["silhouette"]) + " |")
        lines.append("")
        if b.get("available"):
            e = b["embedded_baseline"]
            lines.append(f"Baselines for the basins: majority class {b['majority_baseline']:.3f}; the embedded pixels "
                         f"(layer-0 mean patch direction) kNN {e['knn_accuracy']:.3f}, silhouette "
                         f"{e['silhouette']:.3f} "
                         f"({b['n_images']} labelled images, {b['n_classes']} classes).")
            lines.append("")
        lines += ["Perturbation recovery (all tokens): angle at injection → at layer L, and contraction ratio per "
                  "phase crossed", "",
                  "| ℓ | ε | d_ℓ | d_L | d_L / d_ℓ | baseline: norm growth ‖x_ℓ‖/‖x_L‖ "
                  "| per phase (entry→exit: ratio) |",
                  "|---|---|---|---|---|---|---|"]
        for r in m["perturbation"]["runs"]:
            d = r["distance"]["all"]
            ph = "; ".join(f"{p['layers'][0]}→{p['layers'][1]}: {p['ratio']:.2f}" for p in r["phases"])
            lines.append(f"| {r['layer']} | {r['eps']:g} | {d[0]:.4f} | {d[-1]:.4f} | {r['final_over_initial']:.2f} | "
                         f"{r['baseline_norm_growth'][-1]:.2f} | {ph} |")
        lines.append("")
    lines += ["## Definitions", ""] + [f"- **{k}**: {v}" for k, v in dyn["definitions"].items()]
    lines += ["", "Criteria: a finding holds when every check holds; the thresholds are ours, fixed in "
              "`raptor/dynamics/criteria.py` and the same for every run (the paper states its findings qualitatively).",
              "", "## Figures", ""] + [f"![{k}]({v})" for k, v in dyn["figures"].items()]
    tm = dyn["timing"]
    lines += ["", f"Timing: metrics pass {tm['pass_s']:.1f} s, basins {tm['basins_s']:.1f} s, perturbation "
              f"{tm['perturbation_s']:.1f} s, total {tm['total_s']:.1f} s.", ""]
    return "\n".join(lines)


def console_summary(dyn: dict, out: Path) -> list[str]:
    """What ``raptor dynamics`` prints when it is done: the phases, the teacher against its nulls, each finding's
    verdict per model, the files."""
    lines = [f"phases: {dyn['phases']}  ({dyn['phases_source']})"]
    for f, r in dyn["robustness"]["teacher"].items():
        lines.append(f"teacher ({f}) against its nulls: {r['summary']} "
                     f"({', '.join(f'{k} {v}' for k, v in r['verdicts'].items())})")
    for key in ("i", "ii", "iii", "boundary_jumps"):
        verdicts = ", ".join(f"{m}: {f[key]['verdict']}" for m, f in dyn["findings"].items())
        lines.append(f"({key}) {dyn['findings']['teacher'][key]['finding']}: {verdicts}")
    lines.append(f"wrote {out / 'report.md'}, {out / 'dynamics.json'} and {len(dyn['figures'])} plots")
    return lines
