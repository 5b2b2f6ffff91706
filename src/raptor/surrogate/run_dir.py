"""A fit's run directory, written by ``raptor fit`` (:class:`RunProgress`, :class:`BlockProgress` at each
checkpoint) and read by everything else through :class:`FitRun`:

- ``config.yaml`` (the FitConfig), ``surrogate.json`` (the surrogate's phases and blocks + the teacher spec),
  ``model.safetensors`` (its weights), ``metrics.json`` (schema: ``raptor/schemas/metrics.schema.json``, written
  last: a run is finished when it is there), ``phases.json`` (phases found from the data), plots;
- ``checkpoints/``: ``latest.json`` + the optimiser and model state of the current work item, and per-block
  checkpoints of a parallel stage 1.

Here too: what an existing directory means for a new fit (refuse, resume or re-evaluate) and the progress saved at
each checkpoint."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import torch

from raptor.config import to_dict
from raptor.errors import RaptorError
from raptor.surrogate.batches import step_generator
from raptor.surrogate.checkpoint import latest_checkpoint, load_tensors, save_checkpoint
from raptor.surrogate.config import EVAL_ONLY, FitConfig
from raptor.surrogate.model import RaptorModel, SurrogateConfig
from raptor.tracking import LOG, WANDB_ID, Tracker, history_from_log, read_log


def check_existing_run(cfg: FitConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run). Refuses a run directory that already holds a run
    unless ``resume``, and a resume with other training settings -- naming them -- before anything is written."""
    out = Path(cfg.out)
    ck = latest_checkpoint(out / "checkpoints")
    blocks = block_checkpoints(out)
    if ck is None and not blocks:
        if (out / "metrics.json").exists():
            raise RaptorError(f"{out} holds a finished run whose checkpoints are gone; choose another --out")
        return None
    if ck is None:  # stage 1 in parallel (--parallel-blocks) was under way: per-block checkpoints only
        ck = next(iter(blocks.values()))
        top = None
    else:
        top = ck
    if not resume:
        raise RaptorError(f"{out} already holds a run (checkpoint {ck.name}); pass --resume to continue it "
                          f"or choose another --out")
    try:
        st = json.loads((ck / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise RaptorError(f"cannot read checkpoint {ck}: {e}") from None
    if st.get("fingerprint") != cfg.training_fingerprint():
        diff = ""
        try:
            import yaml

            old = yaml.safe_load((out / "config.yaml").read_text()) or {}
            new = json.loads(json.dumps(to_dict(cfg)))  # tuples as lists, as the YAML holds them
            keys = [k for k in new if k not in EVAL_ONLY and old.get(k) != new[k]]
            diff = ": " + ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in keys) if keys else ""
        except (OSError, ValueError, ImportError, AttributeError):
            pass
        raise RaptorError(f"cannot resume {out}: it was started with other settings{diff}")
    return top


def block_checkpoints(out: Path) -> dict[int, Path]:
    """Block -> latest checkpoint of a stage-1 block trained in parallel (``checkpoints/block<b>/``)."""
    found = {}
    for d in sorted((Path(out) / "checkpoints").glob("block*")):
        ck = latest_checkpoint(d) if d.is_dir() and d.name[5:].isdigit() else None
        if ck is not None:
            found[int(d.name[5:])] = ck
    return found


def noise_device_type(device: torch.device) -> str:
    """The kind of device whose generator draws a step's input noise (:func:`step_generator`)."""
    return step_generator(0, device).device.type


def check_noise_device(cfg: FitConfig, state: dict, device: torch.device, training_left: bool) -> None:
    """With ``--sigma > 0`` the input noise is drawn on the training device's generator, and a CUDA generator's
    numbers differ from the CPU's: a run resumed on the other kind of device would continue on a different noise
    stream, so it is refused (checkpoints from before the noise moved to the device drew it on the CPU)."""
    if cfg.sigma > 0 and training_left:
        was, now = state.get("noise_device", "cpu"), noise_device_type(device)
        if was != now:
            raise RaptorError(f"this run's input noise (--sigma {cfg.sigma}) was drawn on the {was} and this "
                              f"process would draw it on the {now}: resume it with --device {was} (or start a new "
                              f"run)")


def save_progress(cfg: FitConfig, model: RaptorModel, opt, name: str, item: int, step: int,
                  train_seconds: float, device: torch.device | None = None, tracking: dict | None = None) -> None:
    """The run's checkpoint ``name``: training resumes at work item ``item``, step ``step``. The loss history is
    not in it (OUT/log.jsonl holds it; ``tracking``: how far the logs go, the wandb run id)."""
    save_checkpoint(Path(cfg.out) / "checkpoints", name, model, opt,
                    {"item": item, "step": step, "tracking": tracking, "fingerprint": cfg.training_fingerprint(),
                     "train_seconds": train_seconds,
                     "noise_device": noise_device_type(device or torch.device("cpu")),
                     "surrogate": model.cfg.to_dict()})


def global_offsets(items: list) -> list[int]:
    """The global step at which each work item starts (the x axis of the tracked curves)."""
    return list(itertools.accumulate([0] + [it.steps for it in items]))[:-1]


def open_tracker(cfg: FitConfig, items: list, state, st: dict | None) -> Tracker:
    """Rank 0's tracker. The loss history lives in OUT/log.jsonl: a resumed run cuts it back to its checkpoint
    (the steps after it are trained again) and reads the history from it; a new run starts it empty (checkpoints
    written before log.jsonl carried the history themselves: it is written out from them)."""
    resumed = (st or {}).get("tracking")
    if st is None and not block_checkpoints(Path(cfg.out)):
        (Path(cfg.out) / WANDB_ID).unlink(missing_ok=True)  # a new run: a new wandb run
    elif st is not None and resumed and resumed.get("global_step") and not (Path(cfg.out) / LOG).is_file():
        warnings.warn(f"{cfg.out}/log.jsonl is missing: the loss history before the checkpoint is lost, and "
                      f"metrics.json's loss_history will start at step {state.step} of item {state.item}")
    tracker = Tracker(cfg.out, cfg.log_to, every=cfg.log_every, resume=resumed,
                      config=json.loads(json.dumps(to_dict(cfg))))
    if st is None:
        tracker.cut([])
    elif "history" in st:
        tracker.cut(records_of(state.history, items))
    else:
        order = {it.name: i for i, it in enumerate(items)}
        keep = [r for r in read_log(cfg.out) if r["item"] in order and (
            order[r["item"]] < state.item or (order[r["item"]] == state.item and (
                r["step"] < state.step if r["kind"] == "step" else r["step"] <= state.step)))]
        tracker.cut(keep)
        state.history = history_from_log(keep)
    return tracker


def records_of(history: dict, items: list) -> list[dict]:
    """log.jsonl lines for a history kept the older way (in the checkpoint)."""
    offsets = dict(zip((it.name for it in items), global_offsets(items)))
    out = []
    for name, hist in history.items():
        if name.startswith("val/"):
            item = name[4:]
            out += [{"kind": "val", "item": item, "step": s, "global_step": offsets.get(item, 0) + s - 1,
                     "r2_image_specific": r2} for s, r2 in hist]
        else:
            out += [{"kind": "step", "item": name, "step": s, "global_step": offsets.get(name, 0) + s, "loss": v,
                     "lr": lr, "images_per_s": None} for s, v, lr in hist]
    return sorted(out, key=lambda r: (r["global_step"], r["kind"] == "val"))


METRICS_SCHEMA = "schemas/metrics.schema.json"


class FitRun:
    """A ``raptor fit`` run directory (see the module doc). Opening one checks only that the folder exists; each
    reader refuses, with one error line, a run that lacks what it needs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._meta: dict | None = None  # surrogate.json, read once
        if not self.path.is_dir():
            raise RaptorError(f"run folder {path} not found" if not self.path.exists() else
                              f"{path} is a file, not a raptor fit run folder")

    @property
    def finished(self) -> bool:
        """The surrogate, its weights and the metrics are all there (metrics.json is written last)."""
        return all((self.path / f).is_file() for f in ("surrogate.json", "model.safetensors", "metrics.json"))

    def _surrogate_json(self) -> dict:
        if self._meta is not None:
            return self._meta
        path = self.path / "surrogate.json"
        try:
            d = json.loads(path.read_text())
            d["surrogate"], d["teacher"]
            self._meta = d
            return d
        except FileNotFoundError:
            raise RaptorError(f"{self.path} is not a finished raptor fit run (no surrogate.json)") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RaptorError(f"{path} is damaged ({type(e).__name__}: {str(e)[:120]})") from None

    @property
    def surrogate_config(self) -> SurrogateConfig:
        """The surrogate's phases and block configuration (``surrogate.json``)."""
        try:
            return SurrogateConfig.from_dict(self._surrogate_json()["surrogate"])
        except (ValueError, KeyError, TypeError) as e:
            raise RaptorError(f"{self.path / 'surrogate.json'} is damaged ({type(e).__name__}: {str(e)[:120]})") \
                from None

    @property
    def teacher_spec(self) -> str:
        """The spec of the teacher the surrogate was fit on."""
        return str(self._surrogate_json()["teacher"])

    @property
    def has_weights(self) -> bool:
        """The trained surrogate is there (``surrogate.json`` + ``model.safetensors``)."""
        return (self.path / "surrogate.json").is_file() and (self.path / "model.safetensors").is_file()

    def require_weights(self, what: str) -> "FitRun":
        """Refuse a folder without the trained surrogate (``what`` names the option that pointed here)."""
        if not self.has_weights:
            raise RaptorError(f"{what} is not a finished raptor fit run (needs surrogate.json and "
                              f"model.safetensors)")
        return self

    def model(self, teacher=None) -> RaptorModel:
        """The trained RaptorModel (eval mode); with ``teacher``, checked against its depth and width first."""
        cfg = self.surrogate_config
        if teacher is not None and (cfg.depth != teacher.depth or cfg.block.dim != teacher.dim):
            raise RaptorError(f"run {self.path} is a depth-{cfg.depth}, width-{cfg.block.dim} surrogate; the "
                              f"teacher {teacher.spec} has depth {teacher.depth}, width {teacher.dim}")
        model = RaptorModel(cfg)
        try:
            model.load_state_dict(load_tensors(self.path / "model.safetensors"))
        except RuntimeError as e:
            raise RaptorError(f"{self.path}/model.safetensors does not fit its surrogate.json: "
                              f"{str(e).splitlines()[0]}") from None
        model.teacher_spec = self.teacher_spec
        return model.eval()

    def metrics(self) -> dict:
        """``metrics.json`` (see :func:`read_metrics`)."""
        return read_metrics(self.path / "metrics.json", self.path)


def read_metrics(f: Path, run: str | Path | None = None) -> dict:
    """A fit's ``metrics.json``, checked for the keys its schema requires (at the top and in ``validation``);
    ``run``: what the user named (the run folder or the file), for the error line."""
    try:
        m = json.loads(Path(f).read_text())
    except (OSError, ValueError) as e:
        raise RaptorError(f"cannot read a finished run at {run or f}: {e}") from None
    missing = _missing_keys(m, metrics_schema())
    if missing:
        raise RaptorError(f"{f} is not a metrics.json from raptor fit (missing {', '.join(missing[:4])})")
    return m


def metrics_schema() -> dict:
    """The JSON schema of a fit's metrics.json (shipped with the package)."""
    from importlib import resources

    return json.loads(resources.files("raptor").joinpath(METRICS_SCHEMA).read_text())


def _missing_keys(d: dict, schema: dict, where: str = "") -> list[str]:
    """The required keys of ``schema`` (and of its required object properties, recursively) absent from ``d``."""
    out = []
    for key in schema.get("required", []):
        if not isinstance(d, dict) or key not in d:
            out.append(where + key)
        elif schema.get("properties", {}).get(key, {}).get("type") == "object":
            out += _missing_keys(d[key], schema["properties"][key], f"{where}{key}.")
    return out


def init_from_run(model: RaptorModel, run: str | Path) -> None:
    """Start ``model`` from the weights of a finished run with the same phases and block configuration (e.g. stage 2
    of one run from the stage-1 blocks of another, as the official code trains its stages separately)."""
    src = FitRun(run).surrogate_config
    if src.phases != model.cfg.phases:
        raise RaptorError(f"--init-from {run}: its phases {src.phases} differ from this fit's {model.cfg.phases}")
    if src.block != model.cfg.block:
        raise RaptorError(f"--init-from {run}: its blocks ({src.block}) differ from this fit's ({model.cfg.block})")
    with torch.no_grad():
        model.load_state_dict(FitRun(run).model().state_dict())


class StepOutputs:
    """What the step loop of one work item leaves behind after step ``done``: a validation every ``val_every``
    steps, then a checkpoint every ``ckpt_every`` steps and at the item's end. Subclasses say how each is
    written; :meth:`due` tells the loop to read its pending losses back first (a NaN stops before a save)."""

    def __init__(self, cfg, item):
        self.cfg, self.item = cfg, item

    def due(self, done: int) -> bool:
        return self._val_due(done) or self._ckpt_due(done)

    def after_step(self, done: int, opt) -> None:
        if self._val_due(done):
            self.validate(done)
        if self._ckpt_due(done):
            self.checkpoint(done, opt)

    def _val_due(self, done: int) -> bool:
        return bool(self.cfg.val_every) and done % self.cfg.val_every == 0

    def _ckpt_due(self, done: int) -> bool:
        return done % self.cfg.ckpt_every == 0 or done == self.item.steps

    def checkpoint(self, done: int, opt) -> None:
        raise NotImplementedError

    def validate(self, done: int) -> None:
        pass


class RunProgress(StepOutputs):
    """The run's checkpoint (rank 0, with the whole history and the training time so far) and the periodic
    held-out validation (rank 0; the other ranks wait on the CPU side group meanwhile)."""

    def __init__(self, cfg, model, item, it_idx: int, state, dist, device, clock, validate_fn, tracker=None,
                 offset: int = 0):
        super().__init__(cfg, item)
        self.model, self.it_idx, self.state = model, it_idx, state
        self.dist, self.device, self.clock, self.validate_fn = dist, device, clock, validate_fn
        self.tracker, self.offset = tracker, offset

    def checkpoint(self, done: int, opt) -> None:
        seconds = self.clock()  # the last step's checkpoint sets the run's final time
        if self.dist.main:
            last = done >= self.item.steps
            nxt = (self.it_idx + 1, 0) if last else (self.it_idx, done)
            save_progress(self.cfg, self.model, None if last else opt, f"item{self.it_idx}-step{done:07d}", *nxt,
                          seconds, self.device, self.tracker.state() if self.tracker is not None else None)

    def validate(self, done: int) -> None:
        if self.validate_fn is None:
            return
        if self.dist.main:
            self.model.eval()
            r2 = self.validate_fn(self.model)
            self.state.history.setdefault(f"val/{self.item.name}", []).append([done, r2])
            if self.tracker is not None:
                self.tracker.log_val(self.item.name, done, self.offset + done - 1, r2)
            self.model.train()
        self.dist.wait_all()  # the other ranks wait on the CPU side group, not in the next step's all_reduce


class BlockProgress(StepOutputs):
    """Parallel stage 1: the checkpoint of one block, written by its rank group's first rank under
    ``checkpoints/block<b>/`` (no validation there)."""

    def __init__(self, cfg, model, item, hist: list, leader: bool):
        super().__init__(cfg, item)
        self.model, self.hist, self.leader = model, hist, leader
        self.root = Path(cfg.out) / "checkpoints" / f"block{item.block}"

    def checkpoint(self, done: int, opt) -> None:
        if self.leader:
            save_checkpoint(self.root, f"step{done:07d}", self.model.blocks[self.item.block],
                            opt if done < self.item.steps else None,
                            {"item": None, "step": done, "history": {self.item.name: self.hist},
                             "fingerprint": self.cfg.training_fingerprint(), "block": self.item.block})
