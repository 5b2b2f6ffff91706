"""``raptor ablation``: the paper's training ablation (camera-ready Table 1) as one command.

The rows are cumulative, as in the paper: teacher forcing only -> + the autoregressive anneal -> + depth scaling ->
+ cls weighting -> + stage 2 -> + a fine-tuned probe. Rows 1-4 are stage-1 fits (each block trained on its phase);
row 5 continues row 4's blocks with stage 2 (``--stage 2 --init-from`` row 4: the same training as ``--stage both``,
tested in the suite), so the five fits cost four stage-1 trainings and one stage 2. Every row is scored with the
measures a blind baseline cannot pass (image-specific R² with its CI over held-out photos, image-level R²) beside
the paper's R². Row 6 needs a linear classifier of the teacher (``--init-head``) and labelled data
(``--probe-data``): the row-5 surrogate's top-1 with a fresh probe and with the teacher's head fine-tuned.

Each row is a normal ``raptor fit`` run under ``OUT/<n>_<row>``; a finished row is reused, so the command resumes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from raptor.config import atomic_write_text, save_config
from raptor.data import open_source
from raptor.errors import RaptorError
from raptor.plots import plt, save_figure
from raptor.probes.data import open_probe_data
from raptor.probes.run import ProbeConfig, run_probe
from raptor.progress import console
from raptor.store import TrajectoryStore
from raptor.surrogate.fit import run_fit
from raptor.surrogate.run_dir import check_existing_run
from raptor.teachers import load_teacher
from raptor.teachers.dinov2_pth import load_state_file

# (directory name, the paper's row label, FitConfig changes against the full recipe)
ROWS = (
    ("1_tf_only", "teacher forcing only", dict(stage="1", teacher_forcing_only=True, t_scale=False,
                                               stage1_last_weights=None)),
    ("2_ar_anneal", "+ autoregressive (annealed TF)", dict(stage="1", t_scale=False, stage1_last_weights=None)),
    ("3_depth_scaling", "+ depth scaling", dict(stage="1", stage1_last_weights=None)),
    ("4_cls_weighting", "+ cls weighting", dict(stage="1")),
    ("5_stage2", "+ stage 2 (full-model AR)", dict(stage="2")),  # init_from: row 4
)
PAPER_TOP1 = {"teacher forcing only": 3.9, "+ autoregressive (annealed TF)": 72.7, "+ depth scaling": 75.2,
              "+ cls weighting": 76.7, "+ stage 2 (full-model AR)": 82.4, "+ fine-tuned probe": 83.0}


@dataclass
class AblationConfig:
    out: str
    fit: object  # the FitConfig of the full recipe (stage both); each row changes it as in ROWS
    probe_data: str | None = None  # labelled cls data for row 6
    init_head: str | None = None  # the teacher's linear classifier for row 6 ("teacher" or a *_linear_head.pth)

    def check(self) -> None:
        self.fit.check()
        if self.fit.stage != "both":
            raise RaptorError("raptor ablation runs both stages itself: leave --stage at both")
        if self.fit.init_from or self.fit.teacher_forcing_only:
            raise RaptorError("raptor ablation sets --init-from and --teacher-forcing-only per row itself")
        if (self.init_head is None) != (self.probe_data is None):
            raise RaptorError("row 6 (the fine-tuned probe) needs both --probe-data and --init-head")


def row_configs(cfg: AblationConfig) -> list[tuple[str, str, object]]:
    """(directory, label, FitConfig) of rows 1-5."""
    out = Path(cfg.out)
    rows = []
    for name, label, change in ROWS:
        extra = {"init_from": str(out / ROWS[3][0])} if change.get("stage") == "2" else {}
        rows.append((name, label, dataclasses.replace(cfg.fit, out=str(out / name), **change, **extra)))
    return rows


def _row(label: str, m: dict) -> dict:
    v = m["validation"]
    ar = v["autoregressive"]
    return {"row": label, "r2_image_specific_mean": ar.get("r2_image_specific_mean"),
            "r2_image_specific_ci95": ar.get("r2_image_specific_ci95"),
            "r2_image_specific_last": (ar.get("r2_image_specific") or [None])[-1],
            "image_level_r2": v["image_level"]["autoregressive"]["r2"], "r2_mean": ar["r2_mean"],
            "r2_official_all_layers": ar.get("r2_official_all_layers"), "train_seconds": m["train_seconds"],
            "paper_in1k_top1": PAPER_TOP1.get(label)}


def _preflight(cfg: AblationConfig, rows: list) -> None:
    """Everything cheap, before anything is written or trained: every row's settings, the data, row 6's probe data
    and head, and that finished or started rows were trained with these settings."""
    cfg.check()
    for _, _, fc in rows:
        if fc.stage == "1":
            fc.check()
    if cfg.fit.store:
        TrajectoryStore(cfg.fit.store).require_complete("ablation never trains on part of a store")
    else:
        open_source(cfg.fit.data)
        if cfg.fit.val_data:
            open_source(cfg.fit.val_data)
    if cfg.probe_data:
        ProbeConfig("cls", str(Path(cfg.out) / ROWS[4][0]), cfg.probe_data, cfg.out, init_head=cfg.init_head).check()
        open_probe_data(cfg.probe_data, "cls")
        if cfg.init_head != "teacher":
            load_state_file(cfg.init_head)
    for name, _, fc in rows:  # a re-run must be the same ablation: each existing row's settings are checked
        if Path(fc.out).exists():
            try:
                check_existing_run(fc, resume=True)
            except RaptorError as e:
                raise RaptorError(f"ablation row {name}: {e}") from None


def run_ablation(cfg: AblationConfig, progress: bool = True) -> dict:
    rows_cfg = row_configs(cfg)
    _preflight(cfg, rows_cfg)
    out = Path(cfg.out)
    rows, teacher = [], None
    for name, label, fc in rows_cfg:
        done = Path(fc.out) / "metrics.json"
        if done.is_file():
            m = json.loads(done.read_text())
        else:
            if teacher is None:
                teacher = load_teacher(fc.teacher)
            resume = (Path(fc.out) / "checkpoints" / "latest.json").is_file()
            m = run_fit(fc, resume=resume, progress=progress, teacher=teacher)
        rows.append(_row(label, m) | {"run": name})
        if progress:
            r = rows[-1]
            console.print(f"{label}: image-specific R² {r['r2_image_specific_mean']:.3f}, image-level R² "
                          f"{r['image_level_r2']:.3f}")
    probe = None
    if cfg.probe_data:
        probe = _fine_tuned_probe(cfg, out / ROWS[4][0], progress)
        rows.append({"row": "+ fine-tuned probe", "run": ROWS[4][0],
                     "paper_in1k_top1": PAPER_TOP1["+ fine-tuned probe"], **probe})
    res = {"config": {"fit": dataclasses.asdict(cfg.fit), "probe_data": cfg.probe_data, "init_head": cfg.init_head},
           "rows": rows, "paper": "camera-ready Table 1: Raptor k=3 on DINOv2-B, ImageNet-1k top-1 (%)"}
    res["figure"] = _plot(out / "ablation.png", rows)
    save_config(cfg, out / "config.yaml")  # nested: fit (the full model's FitConfig), probe_data, init_head
    atomic_write_text(out / "ablation.md", render(res))
    atomic_write_text(out / "ablation.json", json.dumps(res, indent=1))
    return res


def _fine_tuned_probe(cfg: AblationConfig, run: Path, progress: bool) -> dict:
    """Row 6: the row-5 surrogate's test top-1 with a fresh linear probe and with the teacher's head fine-tuned."""
    pdir = Path(cfg.out) / "6_probe"
    out = {}
    for key, head in (("fresh_probe_top1", None), ("fine_tuned_head_top1", cfg.init_head)):
        recs = run_probe(ProbeConfig("cls", str(run), cfg.probe_data, str(pdir), seeds=(0,), init_head=head),
                         progress=progress)
        out[key] = recs[0]["best"]["test"]
    return out


def _f(v, nd=3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def render(res: dict) -> str:
    lines = ["# The paper's training ablation (Table 1), cumulative rows", "",
             "Held-out measures of each row's surrogate (image-specific R²: 1 − SSE / SSE of the image-blind per-"
             "position mean, which scores 0; CI over held-out photos), beside the paper's ImageNet-1k top-1 for "
             "Raptor k = 3 on DINOv2-B (another model, data and budget: the *order* of the rows is what compares).",
             "", "| row | run | image-specific R² [95 % CI] | at the last layer | image-level R² | mean R² | "
                 "paper's R² (pooled) | train s | paper: IN-1k top-1 % |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "r2_image_specific_mean" not in r:  # row 6
            lines.append(f"| {r['row']} | `{r['run']}` + probe | fresh probe top-1 {_f(r['fresh_probe_top1'])}, "
                         f"teacher's head fine-tuned {_f(r['fine_tuned_head_top1'])} | | | | | | "
                         f"{r['paper_in1k_top1']} |")
            continue
        ci = r["r2_image_specific_ci95"]
        lines.append(f"| {r['row']} | `{r['run']}` | **{_f(r['r2_image_specific_mean'])}**"
                     + (f" [{_f(ci[0])}, {_f(ci[1])}]" if ci else "") +
                     f" | {_f(r['r2_image_specific_last'])} | {_f(r['image_level_r2'])} | {_f(r['r2_mean'])} | "
                     f"{_f(r['r2_official_all_layers'])} | {r['train_seconds']:.0f} | {r['paper_in1k_top1']} |")
    if not any(r["row"] == "+ fine-tuned probe" for r in res["rows"]):
        lines += ["", "Row 6 (+ fine-tuned probe) was not run: it needs the teacher's linear classifier "
                      "(`--init-head`, e.g. Meta's `dinov2_vits14_linear_head.pth`) and labelled data "
                      "(`--probe-data`)."]
    lines += ["", f"![ablation]({res['figure']})"]
    return "\n".join(lines) + "\n"


def _plot(path: Path, rows: list[dict]) -> str:
    rs = [r for r in rows if r.get("r2_image_specific_mean") is not None]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = range(len(rs))
    y = [r["r2_image_specific_mean"] for r in rs]
    lo = [r["r2_image_specific_mean"] - r["r2_image_specific_ci95"][0] if r["r2_image_specific_ci95"] else 0
          for r in rs]
    hi = [r["r2_image_specific_ci95"][1] - r["r2_image_specific_mean"] if r["r2_image_specific_ci95"] else 0
          for r in rs]
    ax.bar(x, y, yerr=[lo, hi], capsize=3, color="C0", label="image-specific R² (held out)")
    ax.plot(list(x), [r["image_level_r2"] for r in rs], "o--", color="C3", label="image-level R²")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(list(x), [r["row"].replace(" (", "\n(") for r in rs], fontsize=7)
    ax.set_ylabel("held-out R²")
    ax.set_title("training ablation (cumulative rows, as the paper's Table 1)", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def console_summary(res: dict, out: Path) -> list[str]:
    """What ``raptor ablation`` prints when it is done: each row's held-out scores (row 6: its two probes), the
    files."""
    lines = []
    for r in res["rows"]:
        if "r2_image_specific_mean" in r:
            lines.append(f"{r['row']}: image-specific R2 {r['r2_image_specific_mean']:.3f}, image-level R2 "
                         f"{r['image_level_r2']:.3f} (paper, IN-1k top-1: {r['paper_in1k_top1']})")
        else:
            lines.append(f"{r['row']}: fresh probe {r['fresh_probe_top1']:.3f}, fine-tuned teacher head "
                         f"{r['fine_tuned_head_top1']:.3f}")
    lines.append(f"wrote {out / 'ablation.md'}, {out / 'ablation.json'} and {out / res['figure']}")
    return lines
