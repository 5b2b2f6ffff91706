"""Matplotlib figures, written as PNG files and closed (never shown). The backend is matplotlib's own choice
(Agg on a headless machine, the inline one in a notebook); the ``raptor`` command sets Agg for its process."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np


def save_figure(fig, path: Path) -> str:
    """Lay out, write as PNG (110 dpi) and close ``fig``; returns the file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path).name


def heatmap(path: Path, M: np.ndarray, layers: Sequence[int], title: str, *, kind: str = "score",
            dp_phases: list[list[int]] | None = None, maxcut_phases: list[list[int]] | None = None,
            cbar_label: str = "") -> Path:
    """Layer x layer heatmap with DP phase boundaries (white lines) and max-cut clusters (coloured axis bar)."""
    n = len(layers)
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    cmap = "viridis" if kind == "score" else "magma_r"
    im = ax.imshow(M, cmap=cmap, origin="upper", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=cbar_label or kind)
    ticks = list(range(n))
    step = max(1, n // 13)
    ax.set_xticks(ticks[::step], [str(layers[i]) for i in ticks[::step]])
    ax.set_yticks(ticks[::step], [str(layers[i]) for i in ticks[::step]])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    if dp_phases:
        for p in dp_phases:
            a, b = p[0] - 0.5, p[-1] + 0.5
            ax.add_patch(plt.Rectangle((a, a), b - a, b - a, fill=False, edgecolor="white", lw=2))
    if maxcut_phases:
        colors = plt.cm.tab10(np.arange(len(maxcut_phases)) % 10)
        for c, members in zip(colors, maxcut_phases):
            for m in members:
                ax.add_patch(plt.Rectangle((m - 0.5, n - 0.5), 1, 0.35 * max(1, n / 12), color=c, clip_on=False))
        ax.text(n / 2, n + 0.55 * max(1, n / 12), "max-cut clusters (colour)", ha="center", va="top", fontsize=8)
    save_figure(fig, path)
    return path


def matrices_side_by_side(path: Path, matrices: Sequence[np.ndarray], layers: Sequence[Sequence[int]],
                          phases: Sequence[list[list[int]] | None], titles: Sequence[str], per_row: int = 4) -> Path:
    """Several models' layer x layer distance matrices on one figure (one colour scale each, axes in fractions of
    depth so that models of different depths line up), each with its phases as white boxes."""
    n = len(matrices)
    cols = min(per_row, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, M, lay, ph, title in zip(axes.flat, matrices, layers, phases, titles):
        L = len(lay)
        ax.imshow(M, cmap="magma_r", origin="upper", interpolation="nearest", extent=(0, 1, 1, 0))
        ticks = [0, 0.25, 0.5, 0.75, 1]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
        ax.set_xlabel(f"depth (layers {lay[0]}..{lay[-1]})", fontsize=7)
        ax.set_title(title, fontsize=8)
        for p in ph or []:
            a, b = lay.index(p[0]) / L, (lay.index(p[-1]) + 1) / L
            ax.add_patch(plt.Rectangle((a, a), b - a, b - a, fill=False, edgecolor="white", lw=1.6))
    save_figure(fig, path)
    return Path(path)


def phase_evidence(path: Path, M: np.ndarray, layers: Sequence[int], tests: dict, title: str) -> Path:
    """Left: the distance matrix with the chosen k's DP phases; right: for each k, how often a phase boundary falls
    before each layer in bootstrap re-segmentations, with each statistic's p against the lag-only null in the
    legend."""
    n = len(layers)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.6), gridspec_kw={"width_ratios": [1, 1.25]})
    im = ax.imshow(M, cmap="magma_r", origin="upper", interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="distance")
    step = max(1, n // 13)
    ax.set_xticks(range(0, n, step), [str(layers[i]) for i in range(0, n, step)])
    ax.set_yticks(range(0, n, step), [str(layers[i]) for i in range(0, n, step)])
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    width = 0.8 / max(1, len(tests))
    for j, (k, t) in enumerate(tests.items()):
        freq = np.asarray(t["boundary_stability"]["all"])
        xs = np.arange(n) + (j - (len(tests) - 1) / 2) * width
        ps = ", ".join(f"{r['statistic'].replace('_', ' ')} p={r['p_value']:.3f}"
                       for r in [t, *t.get("alternatives", {}).values()])
        bx.bar(xs[1:], freq[1:], width=width, label=f"k={k}: {ps}")
        if j == 0:  # the smallest k's boundaries on the matrix
            for b in t["boundary_stability"]["boundaries"]:
                ax.axhline(b - 0.5, color="C0", lw=1.2)
                ax.axvline(b - 0.5, color="C0", lw=1.2)
    bx.set_xticks(range(1, n), [f"{layers[i - 1]}|{layers[i]}" for i in range(1, n)], rotation=60, fontsize=7)
    bx.set_ylim(0, 1.05)
    bx.set_xlabel("boundary between layers")
    bx.set_ylabel("bootstrap frequency")
    bx.set_title("boundary stability (images resampled, re-segmented)", fontsize=10)
    bx.legend(fontsize=7)
    save_figure(fig, path)
    return path


def cost_curve(path: Path, costs: np.ndarray, chosen: int, total: float, title: str) -> Path:
    ks = np.arange(1, len(costs) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(ks, costs / total, "o-")
    ax.axvline(chosen, color="C3", ls="--", label=f"chosen k = {chosen}")
    ax.set_xlabel("number of phases k")
    ax.set_ylabel("within-phase distance / total")
    ax.set_title(title, fontsize=10)
    ax.legend()
    save_figure(fig, path)
    return path


def line_plot(path: Path, x, series: dict[str, Sequence[float]], *, xlabel: str, ylabel: str, title: str,
              vlines: Sequence[float] = (), logy: bool = False, ylim: tuple[float, float] | None = None) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, y in series.items():
        ax.plot(x, y, "o--" if name.startswith("baseline") else "o-", ms=3, label=name)
    if ylim is not None:  # clip wild baselines so the surrogate's curve stays readable
        lo = max(ylim[0], min(min(y) for y in series.values()) - 0.05)
        ax.set_ylim(lo, ylim[1])
    for v in vlines:
        ax.axvline(v, color="grey", ls=":", lw=1)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return path


def budget_curve(path: Path, curves: dict[str, tuple[Sequence[float], Sequence[float], Sequence[tuple]]], *,
                 xlabel: str, ylabel: str, title: str, goal: float | None = None,
                 extend_to: float | None = None, ceiling: float | None = None) -> Path:
    """Measured points with CI bars on a log x axis, one line per curve, and (dashed, to ``extend_to``) the least-
    squares fit y = a + b ln x through them: a naive extrapolation, drawn as such, and never past ``ceiling``
    (1 for an R²: the line stops where it would cross it)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, (x, y, ci) in curves.items():
        x, y = np.asarray(x, float), np.asarray(y, float)
        err = np.array([[yi - c[0] for yi, c in zip(y, ci)], [c[1] - yi for yi, c in zip(y, ci)]])
        line = ax.errorbar(x, y, yerr=np.clip(err, 0, None), fmt="o-", ms=4, capsize=3, label=name)
        if extend_to and len(x) >= 2:
            b, a = np.polyfit(np.log(x), y, 1)
            xs = np.geomspace(x.min(), extend_to, 200)
            ys = a + b * np.log(xs)
            keep = ys <= ceiling if ceiling is not None else np.ones(len(xs), bool)
            ax.plot(xs[keep], ys[keep], ls="--", lw=1, color=line[0].get_color(), alpha=0.7)
    ax.set_xscale("log")
    if goal is not None:
        ax.axhline(goal, color="grey", ls=":", lw=1)
        ax.text(0.01, goal, f"goal {goal:g}", va="bottom", fontsize=8, color="grey",
                transform=ax.get_yaxis_transform())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return path
