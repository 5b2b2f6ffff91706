"""``make demo``: the main job end to end on the embedded default, offline."""

from __future__ import annotations

import json
from pathlib import Path

from raptor.progress import console


def run_demo(out: Path, limit: int | None = None) -> dict:
    from raptor.data import open_source
    from raptor.store import TrajectoryStore, extract
    from raptor.teachers import DEFAULT_TEACHER, load_teacher

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]Raptor demo[/bold]: teacher {DEFAULT_TEACHER}, data bundled:photos -> {out}")
    teacher = load_teacher(DEFAULT_TEACHER)
    source = open_source("bundled:photos").subset(limit)
    store_dir = out / "store"
    extract(teacher, source, store_dir, dtype="bfloat16")
    summary = TrajectoryStore(store_dir).summary()
    console.print_json(json.dumps(summary))

    from raptor.analyze import AnalyzeConfig, run_analyze

    an_dir = out / "analyze"
    console.print(f"\n[bold]Layer similarity and phases[/bold] (from the store) -> {an_dir}")
    res = run_analyze(AnalyzeConfig(teacher=DEFAULT_TEACHER, data="bundled:photos", store=str(store_dir),
                                    out=str(an_dir)))
    a = res.analysis
    console.print(f"phases ({a['primary_metric']}, k={a['chosen']['k']}): {a['chosen']['phases']}")

    from raptor.surrogate.fit import run_fit
    from raptor.surrogate.train import FitConfig

    fit_dir = out / "fit_k2"
    console.print(f"\n[bold]Brief Raptor fit[/bold] (k=2 blocks on the analysed phases, from the store) -> {fit_dir}")
    fit_cfg = FitConfig(teacher=DEFAULT_TEACHER, data=None, store=str(store_dir), out=str(fit_dir),
                        phases_file=str(an_dir / "analysis.json"), k=2, steps1=10, steps2=10, batch_size=4,
                        lr=1e-3, probe_data="bundled:digits", probe_limit=200, ckpt_every=10,
                        autocast="bfloat16")
    resume = (fit_dir / "checkpoints" / "latest.json").exists()
    m = run_fit(fit_cfg, resume=resume)
    ar = m["validation"]["autoregressive"]
    console.print("held-out R² per layer: " + " ".join(f"{x:.2f}" for x in ar["r2"]) +
                  "  (a 30-step demo; see docs/surrogate.md for real runs)")
    console.print("\n[bold green]Demo outputs[/bold green]:")
    console.print(f"  trajectory store : {store_dir.resolve()}  (inspect: raptor info {store_dir})")
    console.print(f"  phase analysis   : {(an_dir / 'report.md').resolve()}")
    console.print(f"                     {(an_dir / 'analysis.json').resolve()}")
    console.print(f"  heatmap          : {(an_dir / 'paper_cosine_distance.png').resolve()}")
    console.print(f"  Raptor k=2 fit   : {(fit_dir / 'metrics.json').resolve()}")
    console.print(f"                     {(fit_dir / 'r2_per_layer.png').resolve()}")
    return {"store": str(store_dir), "analyze": str(an_dir), "fit": str(fit_dir)}
