"""Live tracking of a training run: ``--log-to jsonl,tensorboard,wandb`` (any subset) every ``--log-every`` steps.
``raptor fit`` logs its steps and validations; ``raptor probe`` and ``raptor study`` log named metrics
(:meth:`Tracker.log_metrics`: each probe's validation curve per learning rate and its test score; each ViT's training
loss per epoch and each finished run's teacher accuracy, block similarity and Raptor scores).

- ``jsonl`` (always on for ``raptor fit``): ``OUT/log.jsonl``, one line per logged step (work item, step, global
  step, loss, learning rate, images/s) and per validation (the held-out image-specific R²). It is the run's loss
  history: checkpoints keep only how far it goes, not the history itself, and a resumed run first cuts the file back
  to its checkpoint, so the file always reads as one uninterrupted run.
- ``tensorboard``: event files under ``OUT/tensorboard`` (tensorboardX, a small pure-Python writer); a resumed run
  purges the events after its checkpoint and continues the same curves.
- ``wandb``: a Weights & Biases run (its id kept in the checkpoints, so a resumed run continues the same wandb run;
  ``WANDB_MODE=offline`` works without a network).

tensorboardX and wandb are optional: asking for one that is not installed is one error line.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import string
import sys
from pathlib import Path

from raptor.errors import RaptorError

KINDS = ("jsonl", "tensorboard", "wandb")
_NEEDS = {"tensorboard": ("tensorboardX", "tensorboardX"), "wandb": ("wandb", "wandb")}
LOG = "log.jsonl"
WANDB_ID = "wandb_id.txt"


def _saved_wandb_id(out: Path) -> str | None:
    try:
        return (out / WANDB_ID).read_text().strip() or None
    except OSError:
        return None


def parse_log_to(text: str | tuple | list | None) -> tuple[str, ...]:
    """``"jsonl,tensorboard"`` -> ("jsonl", "tensorboard"), checked (known kinds, their library installed)."""
    if text is None:
        return ("jsonl",)
    kinds = tuple(k.strip() for k in (text.split(",") if isinstance(text, str) else text) if str(k).strip())
    check_log_to(kinds)
    return kinds


def check_log_to(kinds) -> None:
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise RaptorError(f"bad --log-to {','.join(map(str, kinds))!r} (any of {', '.join(KINDS)})")
    for k in kinds:
        if k in _NEEDS and importlib.util.find_spec(_NEEDS[k][0]) is None:
            raise RaptorError(f"--log-to {k} needs the {_NEEDS[k][1]} package: pip install {_NEEDS[k][1]}")


def read_log(out: Path) -> list[dict]:
    """Every line of ``OUT/log.jsonl`` (a torn last line, from a kill mid-write, is dropped)."""
    path = Path(out) / LOG
    if not path.is_file():
        return []
    lines = []
    for ln in path.read_text().splitlines():
        try:
            lines.append(json.loads(ln))
        except ValueError:
            break
    return lines


def history_from_log(records: list[dict]) -> dict:
    """The in-memory loss history (``{item: [[step, loss, lr], ...], "val/<item>": [[step, r2], ...]}``)."""
    hist: dict = {}
    for r in records:
        if r.get("kind") == "val":
            hist.setdefault(f"val/{r['item']}", []).append([r["step"], r["r2_image_specific"]])
        elif r.get("kind") == "step":
            hist.setdefault(r["item"], []).append([r["step"], r["loss"], r["lr"]])
    return hist


class Tracker:
    """The sinks of one run (rank 0 only). ``log_step`` / ``log_val`` write to each; ``state()`` is what a checkpoint
    keeps so that a resumed run continues the same logs; ``cut(keep)`` rewrites log.jsonl to the lines a resumed
    checkpoint has seen."""

    def __init__(self, out: str | Path, kinds=("jsonl",), *, every: int = 1, resume: dict | None = None,
                 config: dict | None = None, name: str | None = None, project: str = "raptor"):
        check_log_to(kinds)
        self.out, self.kinds, self.every = Path(out), tuple(kinds), max(1, int(every))
        resume = resume or {}
        self.global_step = int(resume.get("global_step", 0))
        self._tb = self._wandb = self._log = None
        self._wandb_items: set[str] = set()
        self.wandb_id = resume.get("wandb_id")
        if "tensorboard" in self.kinds:
            from tensorboardX import SummaryWriter

            # one file per (re)start: a resume within the same second must not reuse (truncate) the last file's name
            self._tb = SummaryWriter(str(self.out / "tensorboard"), filename_suffix=f".{secrets.token_hex(3)}",
                                     purge_step=self.global_step if self.global_step else None)
        if "wandb" in self.kinds:
            import wandb

            self.wandb_id = self.wandb_id or _saved_wandb_id(self.out) or "".join(
                secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            (self.out / WANDB_ID).write_text(self.wandb_id + "\n")  # a run resumed before its first checkpoint
            self._wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", project), id=self.wandb_id,
                                     resume="allow", dir=str(self.out), name=name or self.out.name, config=config,
                                     reinit=True)

    def state(self) -> dict:
        return {"global_step": self.global_step, "wandb_id": self.wandb_id}

    def _write(self, record: dict) -> None:
        if self._log is None:  # opened once (not per step); a line reaches the file when written (line-buffered)
            self._log = open(self.out / LOG, "a", buffering=1)
        self._log.write(json.dumps(record) + "\n")

    def log_step(self, item: str, step: int, global_step: int, loss: float, lr: float,
                 images_per_s: float | None) -> None:
        self.global_step = max(self.global_step, global_step + 1)
        self._write({"kind": "step", "item": item, "step": step, "global_step": global_step, "loss": loss, "lr": lr,
                     "images_per_s": images_per_s})
        if global_step % self.every:
            return
        scalars = {f"loss/{item}": loss, f"lr/{item}": lr}
        if images_per_s is not None:
            scalars["throughput/images_per_s"] = images_per_s
        self._scalars(scalars, global_step)

    def log_val(self, item: str, step: int, global_step: int, r2: float) -> None:
        self._write({"kind": "val", "item": item, "step": step, "global_step": global_step,
                     "r2_image_specific": r2})
        self._scalars({f"val/r2_image_specific/{item}": r2}, global_step)

    def log_metrics(self, item: str, step: int, scalars: dict, **context) -> None:
        """Named scalars of one work item at one step (its own step axis: a probe's epochs, a study's runs):
        a ``{"kind": "metrics", "item", "step", "values", ...context}`` line in log.jsonl, and ``<item>/<name>``
        scalars in TensorBoard / wandb (every ``--log-every``-th step of the item, and always its last)."""
        values = {k: float(v) for k, v in scalars.items() if v is not None}
        self._write({"kind": "metrics", "item": item, "step": step, "values": values, **context})
        if not (step % self.every == 0 or context.get("last")):
            return
        named = {f"{item}/{k}": v for k, v in values.items()}
        if self._tb is not None:
            for k, v in named.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:  # wandb has one step counter per run and drops steps below it: each item gets
            # its own x axis (<item>/step), and the run's counter is left to advance by itself
            if item not in self._wandb_items:
                self._wandb.define_metric(f"{item}/step")
                self._wandb.define_metric(f"{item}/*", step_metric=f"{item}/step")
                self._wandb_items.add(item)
            self._wandb.log({**named, f"{item}/step": step})

    def _scalars(self, scalars: dict, step: int) -> None:
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def cut(self, keep: list[dict]) -> None:
        """Rewrite log.jsonl to ``keep`` (what the resumed checkpoint had seen), atomically."""
        self._close_log()
        tmp = self.out / (LOG + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.out / LOG)

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self._close_log()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish(exit_code=0 if sys.exc_info()[0] is None else 1)
            self._wandb = None
