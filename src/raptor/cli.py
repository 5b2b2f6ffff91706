"""The ``raptor`` command line. Every bad input ends in one ``error: ...`` line and exit code 2."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from raptor.errors import RaptorError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Raptor: phases, block-recurrent surrogates and dynamics of Vision Transformers.")

TEACHER_HELP = "Teacher spec: bundled:dinov2-s | hf:<hub id or dir> | dinov2-pth:<file> | tiny:<family>"
DATA_HELP = "Data spec: bundled:photos | bundled:digits | bundled:lfw | <dir> | folder:<dir> | classes:<dir>"


def parse_layers(text: str | None) -> list[int] | None:
    """'0-12', '0,6,12', '3' or None (all)."""
    if text is None or text in ("", "all"):
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise RaptorError(f"bad --layers {text!r}: use e.g. 0-12 or 0,6,12") from None
    return out


def _echo_json(d: dict) -> None:
    typer.echo(json.dumps(d, indent=2, default=str))


@app.command()
def extract(
    teacher: str = typer.Option("bundled:dinov2-s", "--teacher", "-t", help=TEACHER_HELP),
    data: str = typer.Option(..., "--data", "-d", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Store directory (zarr v3); re-run the same command to resume"),
    dtype: str = typer.Option("bfloat16", help="Stored dtype: bfloat16 | float16 | float32"),
    limit: Optional[int] = typer.Option(None, help="Only the first N images"),
    batch_size: int = typer.Option(16, help="Forward batch size"),
    chunk_images: int = typer.Option(32, help="Images per store chunk (also the resume granularity)"),
    layers: Optional[str] = typer.Option(None, help="Layers to store, e.g. 0-12 or 0,6,12 (default all)"),
    image_size: Optional[int] = typer.Option(None, help="Crop size (default: the teacher's, 224 for DINOv2)"),
    compression: str = typer.Option("lz4", help="lz4 (bit-shuffled, default) | zstd | none"),
    autocast: Optional[str] = typer.Option(None, help="bfloat16 autocast for the forward pass (faster on CPU)"),
    head: Optional[str] = typer.Option(None, help="Official DINOv2 linear head .pth (for dinov2-pth teachers)"),
    progress: bool = typer.Option(True, help="Show a progress bar"),
):
    """Store every image's trajectory (layers 0..L, all tokens) in a resumable zarr v3 store."""
    from raptor.data import open_source
    from raptor.store import COMPRESSIONS, DTYPES, TrajectoryStore
    from raptor.store import extract as run_extract
    from raptor.teachers import load_teacher

    if dtype not in DTYPES:
        raise RaptorError(f"unknown --dtype {dtype!r} (use {', '.join(DTYPES)})")
    if compression not in COMPRESSIONS:
        raise RaptorError(f"unknown --compression {compression!r} (use {', '.join(COMPRESSIONS)})")
    layer_list = parse_layers(layers)
    source = open_source(data).subset(limit)
    t = load_teacher(teacher, head=head)
    s = run_extract(t, source, out, dtype=dtype, layers=layer_list, batch_size=batch_size, chunk_images=chunk_images,
                    image_size=image_size, compression=compression, autocast=autocast, progress=progress)
    info = TrajectoryStore(out).summary()
    info["this_run"] = {"chunks_written": s.chunks_written, "chunks_already_done": s.chunks_done_before,
                        "seconds": round(s.seconds, 2), "images_per_s": round(s.images_per_s, 2),
                        "skipped_images": s.skipped}
    _echo_json(info)


@app.command()
def analyze(
    teacher: str = typer.Option("bundled:dinov2-s", "--teacher", "-t", help=TEACHER_HELP),
    data: str = typer.Option("bundled:photos", "--data", "-d", help=DATA_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory"),
    store: Optional[Path] = typer.Option(None, help="Read trajectories from this store instead of running the teacher"),
    limit: Optional[int] = typer.Option(None, help="Only the first N images"),
    batch_size: int = typer.Option(16, help="Batch size"),
    image_size: Optional[int] = typer.Option(None, help="Crop size (default: the teacher's)"),
    layers: Optional[str] = typer.Option(None, help="Layers, e.g. 1-12 (default: block outputs 1..L, as the paper)"),
    cka_groups: str = typer.Option("auto", help="CKA token groups: auto (cls + registers if any) or a list of "
                                   "cls,registers,patches,all (patches/all cost about one more forward pass)"),
    k_max: int = typer.Option(6, help="Largest number of phases to segment into"),
    k_rule: str = typer.Option("gain", help="Rule to choose k: gain | elbow"),
    k_frac: float = typer.Option(0.1, help="gain rule: add a phase while it adds > frac of the total distance"),
    autocast: Optional[str] = typer.Option(None, help="bfloat16 autocast for the forward pass"),
    head: Optional[str] = typer.Option(None, help="Official DINOv2 linear head .pth"),
    progress: bool = typer.Option(True, help="Show a progress bar"),
):
    """Layer x layer similarity (paper metric, MSE, CKA, token cosine) and phases of depth (DP + max-cut)."""
    from raptor.analyze import AnalyzeConfig, run_analyze

    groups = tuple(g.strip() for g in cka_groups.split(",") if g.strip())
    cfg = AnalyzeConfig(teacher=teacher, data=data, out=str(out), store=str(store) if store else None, limit=limit,
                        batch_size=batch_size, image_size=image_size, layers=parse_layers(layers),
                        cka_groups=groups, k_max=k_max, k_rule=k_rule, k_frac=k_frac, autocast=autocast, head=head)
    res = run_analyze(cfg, progress=progress)
    a = res.analysis
    typer.echo(f"phases ({a['primary_metric']}, k={a['chosen']['k']}): {a['chosen']['phases']}")
    typer.echo(f"wrote {out / 'analysis.json'}, {out / 'report.md'} and {len(a['figures'])} figures")


@app.command()
def info(store: Path = typer.Argument(..., help="Store directory")):
    """Summarise a trajectory store."""
    from raptor.store import TrajectoryStore

    _echo_json(TrajectoryStore(store).summary())


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Output directory"),
         limit: Optional[int] = typer.Option(None, help="Only the first N bundled photos")):
    """The main job end to end on the embedded default (bundled DINOv2-S, bundled photos)."""
    from raptor.demo import run_demo

    run_demo(out, limit=limit)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except RaptorError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted (re-run the same command to resume where supported)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
