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
    console.print("\n[bold green]Demo outputs[/bold green]:")
    console.print(f"  trajectory store : {store_dir.resolve()}  (inspect: raptor info {store_dir})")
    return {"store": str(store_dir)}
