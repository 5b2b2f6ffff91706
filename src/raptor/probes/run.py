"""``raptor probe``: features of one backbone on one labelled data set, computed once and cached, then a grid of
linear probes per seed; one JSON line per (backbone, task, data, seed) appended to ``OUT/results.jsonl``.

Outputs in OUT: ``features/`` (the cache, reusable by later runs with ``--cache``), ``results.jsonl`` (one complete
line per finished seed; a re-run skips the seeds already there with the same settings), ``configs/*.yaml`` (the
typed config of each run) and ``curves/*.png`` (validation score per learning rate over epochs, first seed).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raptor import plots
from raptor.config import FILE_MODE, save_config, to_dict
from raptor.data.sampling import check_sample_order, sample_positions
from raptor.data.transforms import check_transform
from raptor.distributed import Dist
from raptor.errors import RaptorError, check_positive
from raptor.lifecycle import command_run
from raptor.outputs import safe_name
from raptor.probes.backbones import Backbone, parse_backbone
from raptor.probes.data import TASKS, open_probe_data
from raptor.probes.features import DenseTransform, split_features, transform_for
from raptor.probes.train import DEFAULT_RECIPES, METRICS, DenseGeometry, Recipe, prior_baseline, train_probe
from raptor.progress import progress_bar
from raptor.teachers.dinov2_pth import load_linear_head, load_state_file
from raptor.tracking import Tracker, check_log_to

RESULTS = "results.jsonl"


@dataclass
class ProbeConfig:
    task: str
    backbone: str
    data: str
    out: str
    seeds: tuple[int, ...] = (0,)
    layer: int | None = None
    splice: str | None = None
    image_size: int | None = None
    transform: str = "paper"                    # cls: paper | model (the teacher's own processor config)
    lrs: tuple[float, ...] | None = None        # default: the task's grid
    epochs: int | None = None                   # default: the data set's recipe, else the paper's
    batch_size: int | None = None
    weight_decay: float | None = None
    init_head: str | None = None                # cls only: "teacher" (its own head) or an official *_linear_head.pth
    cache: str | None = None                    # default: OUT/features
    limit: int | None = None                    # at most N images per split (smoke runs)
    sample: str = "random"                      # --limit: seeded random sample (stratified by class) | sorted
    sample_seed: int = 1
    feature_batch: int = 32
    device: str = "auto"                        # the feature passes' device (the heads train on the CPU)
    standardize: bool = True                    # z-score features with training-split statistics (train.py)
    log_to: tuple[str, ...] = ()                # live tracking (raptor.tracking): any of jsonl, tensorboard, wandb
    log_every: int = 1                          # every N epochs of the validation curves (the last always)
    recipe: dict = field(default_factory=dict)  # filled in: the recipe actually used

    def check(self) -> None:
        if self.task not in TASKS:
            raise RaptorError(f"unknown --task {self.task!r} (use cls, seg or depth)")
        if not self.seeds:
            raise RaptorError("--seeds is empty: give e.g. 0,1,2")
        if any(s < 0 for s in self.seeds):
            raise RaptorError(f"--seeds must be >= 0, got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise RaptorError(f"--seeds repeats a seed: {list(self.seeds)}")
        check_positive(image_size=self.image_size, epochs=self.epochs, batch_size=self.batch_size, limit=self.limit,
                       feature_batch=self.feature_batch)

        check_sample_order(self.sample)
        check_transform(self.transform)
        if self.log_to:
            check_log_to(self.log_to)
        check_positive(log_every=self.log_every)
        if self.transform != "paper" and self.task != "cls":
            raise RaptorError("--transform model is for --task cls (dense tasks keep the whole image, padded)")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise RaptorError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.init_head is not None:
            if self.task != "cls":
                raise RaptorError("--init-head is for classification probes (--task cls)")
            if self.init_head != "teacher" and not Path(self.init_head).is_file():
                raise RaptorError(f"--init-head {self.init_head}: not 'teacher' and no such file")

    def make_recipe(self, data_recipe: dict) -> Recipe:
        base = DEFAULT_RECIPES[self.task]
        d = {**to_dict(base), **data_recipe}
        for k in ("lrs", "epochs", "batch_size", "weight_decay"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        d["lrs"] = tuple(d["lrs"])
        d["standardize"] = self.standardize
        r = Recipe(**d)
        r.check()
        return r


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise RaptorError(f"bad --seeds {text!r}: use e.g. 0,1,2") from None


def parse_lrs(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise RaptorError(f"bad --lrs {text!r}: use e.g. 1e-4,1e-3,1e-2") from None


def read_results(path: Path) -> list[dict]:
    """Complete lines of a results.jsonl (a torn last line from a killed run is ignored)."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict) and "metric" in d:
            out.append(d)
    return out


def append_line(path: Path, record: dict) -> None:
    """One JSON line, written with a single ``write`` to a file opened for appending, then fsync-ed."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _slug(*parts: str) -> str:
    return safe_name("_".join(parts), 120, "-")


def run_probe(cfg: ProbeConfig, progress: bool = True, backbone=None) -> list[dict]:
    """Check everything cheap (settings, backbone spec, data layout) before the backbone loads; then features
    (cached), probes per seed, one results line each. Returns this run's records (new and already present).
    ``backbone``: an already loaded :class:`~raptor.probes.backbones.Backbone` for ``cfg.backbone`` (callers that
    probe one backbone on several data sets load it once)."""
    cfg.check()
    spec = parse_backbone(cfg.backbone, cfg.layer, cfg.splice)
    data = open_probe_data(cfg.data, cfg.task)
    if cfg.limit:
        for s in data.splits:
            items = data.splits[s]
            labels = np.array([it.target() for it in items]) if cfg.task == "cls" else None
            data.splits[s] = [items[i] for i in sample_positions(len(items), cfg.limit, labels, cfg.sample_seed,
                                                                  cfg.sample)]
    if cfg.init_head not in (None, "teacher"):  # a bad head file is refused before any feature pass
        load_state_file(cfg.init_head)
    recipe = cfg.make_recipe(data.recipe)
    cfg.recipe = to_dict(recipe)
    out = Path(cfg.out)

    def has_progress(p: Path) -> bool:
        return (p / RESULTS).is_file() or (p / "features").is_dir()

    if backbone is not None and backbone.spec != spec:
        raise RaptorError(f"the loaded backbone is {backbone.label}, the config names {spec.label}")
    # under torchrun: the feature passes are sharded over the ranks
    with command_run(out, device=cfg.device, has_progress=has_progress) as run:
        return _run(cfg, spec, data, recipe, out, progress and run.dist.main, backbone, run.dist, run.device)


def _run(cfg: ProbeConfig, spec, data, recipe: Recipe, out: Path, progress: bool, bb=None, dist=None,
         device=None) -> list[dict]:
    dist = dist or Dist()
    bb = (bb or Backbone.load(spec)).to(device or "cpu")
    teacher = bb.teacher
    transform = transform_for(cfg.task, data, teacher, cfg.image_size, cfg.transform)
    ident = bb.identity()
    settings = {"task": cfg.task, "data": data.spec, "backbone_id": ident["id"], "recipe": to_dict(recipe),
                "transform": transform.describe(), "init_head": cfg.init_head, "limit": cfg.limit}
    if cfg.limit:  # which images a --limit chose (runs without one keep their settings, and their results, as before)
        settings["sample"] = {"order": cfg.sample, "seed": cfg.sample_seed}
    done = {r["seed"]: r for r in read_results(out / RESULTS) if r.get("settings") == json.loads(json.dumps(settings))}
    todo = [s for s in cfg.seeds if s not in done]
    slug = _slug(ident["id"], cfg.task, data.spec)
    if dist.main:
        save_config(cfg, out / "configs" / f"{slug}.yaml")
    records = [done[s] for s in cfg.seeds if s in done]
    if not todo:
        return records
    cache = Path(cfg.cache) if cfg.cache else out / "features"
    t0 = time.perf_counter()
    arrays = {s: split_features(bb, data, cfg.task, s, transform, cache, cfg.feature_batch, progress)
              for s in ("train", "val", "test")}
    feature_s = time.perf_counter() - t0
    if not dist.main:  # the other torchrun ranks only help with the feature passes; rank 0 trains the probes
        return []
    geo = None
    if isinstance(transform, DenseTransform):
        tgt = arrays["train"]["masks" if cfg.task == "seg" else "depth"]
        hw = tuple(int(x) for x in tgt.shape[1:])
        for s in ("val", "test"):
            other = arrays[s]["masks" if cfg.task == "seg" else "depth"].shape[1:]
            if tuple(other) != hw:
                raise RaptorError(f"the {s} targets are {other[1]}x{other[0]}, the train targets {hw[1]}x{hw[0]}: "
                                  f"pass --image-size to bring every split to one size")
        geo = DenseGeometry(teacher.patch_size, transform.padding(*hw), hw, data.n_classes, data.depth_range,
                            data.eigen_crop)
    init = _init_head(cfg, teacher) if cfg.init_head else None
    counts = {s: int(np.asarray(arrays[s]["valid"]).sum()) for s in arrays}
    name, higher = METRICS[cfg.task]
    prior = prior_baseline(cfg.task, arrays, geo, data.n_classes)
    tracker = Tracker(out, cfg.log_to, every=cfg.log_every, config=to_dict(cfg)) if cfg.log_to else None
    with progress_bar(len(todo) * recipe.epochs, f"probes {bb.label} · {cfg.task} · {len(recipe.lrs)} lrs", "epoch",
                      enabled=progress) as bar, (tracker or contextlib.nullcontext()):
        for i, seed in enumerate(todo):
            t1 = time.perf_counter()
            res = train_probe(cfg.task, arrays, recipe, seed, geo=geo, n_classes=data.n_classes, init=init, bar=bar)
            rec = {"backbone": bb.label, "backbone_spec": ident,
                   "teacher": teacher.spec, "task": cfg.task, "data": data.spec, "seed": seed,
                   "metric": name, "higher_is_better": higher, "value": res.best["test"], "best": res.best,
                   "prior_baseline": prior,
                   "history": res.history, "n_images": counts, "settings": settings,
                   "seconds": {"features": round(feature_s, 2), "probes": round(time.perf_counter() - t1, 2)},
                   "data_about": data.about, "config": to_dict(cfg)}
            append_line(out / RESULTS, rec)
            records.append(rec)
            if tracker is not None:
                _track(tracker, slug, rec, recipe)
            if i == 0:
                _curves(out / "curves" / f"{slug}.png", res, recipe, f"{bb.label} · {cfg.task} · {data.spec}")
    return sorted(records, key=lambda r: cfg.seeds.index(r["seed"]))


def _track(tracker: Tracker, slug: str, rec: dict, recipe: Recipe) -> None:
    """A finished seed: its validation curve per learning rate (step = epoch, 0 = before training) and its test
    score with the selected learning rate and epoch (step = seed), logged once the seed's line is in results.jsonl
    (a killed seed logs nothing, so a re-run logs it once)."""
    ctx = {"backbone": rec["backbone"], "task": rec["task"], "data": rec["data"], "seed": rec["seed"]}
    curves = rec["history"]["val"]
    n = len(curves[0]) if curves else 0
    for epoch in range(n):
        tracker.log_metrics(f"probe/{slug}/seed{rec['seed']}", epoch,
                            {f"val_{rec['metric']}/lr_{lr:g}": curves[g][epoch] for g, lr in enumerate(recipe.lrs)},
                            last=epoch == n - 1, **ctx)
    tracker.log_metrics(f"probe/{slug}", rec["seed"], {f"test_{rec['metric']}": rec["value"],
                                                      "best_lr": rec["best"]["lr"], "best_epoch": rec["best"]["epoch"]},
                        last=True, **ctx)


def _init_head(cfg: ProbeConfig, teacher):
    if cfg.init_head == "teacher":
        if teacher.head is None:
            raise RaptorError(f"--init-head teacher: {teacher.spec} has no classification head")
        lin = teacher.head.linear
    else:
        lin = load_linear_head(cfg.init_head, teacher.dim).linear
    b = lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0])
    return lin.weight.detach().cpu().clone(), b.detach().cpu().clone()  # the heads train on the CPU


def _curves(path: Path, res, recipe: Recipe, title: str) -> None:
    epochs = list(range(len(res.history["val"][0])))
    series = {f"lr {lr:g}": res.history["val"][g] for g, lr in enumerate(recipe.lrs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    plots.line_plot(path, epochs, series, xlabel="epoch (0 = before training)",
                    ylabel=f"validation {res.metric}", title=title)
