"""Training a grid of linear probes (one per learning rate) on cached features, and choosing the best.

All heads of the grid see the same batches in the same order (one pass over the features per epoch serves every
learning rate); each has its own AdamW parameter group. Before training and after every epoch every head is scored
on the validation and the test split; the reported number is the **test** score of the (learning rate, epoch) with
the best **validation** score (epoch 0, before training, included as in the paper). The paper reports the best score
over epochs on its evaluation split; that number is kept too (``test_best_over_epochs``) for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from raptor.errors import RaptorError
from raptor.probes.heads import (
    GridHead,
    accuracy,
    as_float,
    bin_centres,
    confusion,
    depth_logits,
    depth_loss,
    eval_mask,
    miou,
    rmse,
    seg_logits,
    to_target,
)

METRICS = {"cls": ("top1", True), "seg": ("miou", True), "depth": ("rmse", False)}


@dataclass
class Recipe:
    """Optimiser and schedule of one task's probes (defaults: the official recipes, docs/method.md §7)."""

    lrs: tuple[float, ...]
    epochs: int
    batch_size: int
    weight_decay: float
    warmup_iters: int = 100       # linear warm-up from 0.01x (capped at 10 % of all iterations)
    min_lr: float = 0.0           # cosine floor; schedule "constant" ignores it
    schedule: str = "cosine"      # cosine | constant
    clip: float | None = 1.0
    standardize: bool = True     # z-score features with training-split mean/std (see ``feature_stats``)

    def check(self) -> None:
        if not self.lrs or any(not (lr > 0 and math.isfinite(lr)) for lr in self.lrs):
            raise RaptorError(f"--lrs must be positive numbers, got {list(self.lrs)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise RaptorError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "constant"):
            raise RaptorError(f"unknown schedule {self.schedule!r}")


DEFAULT_RECIPES = {
    # ImageNet: AdamW lr 1e-4, wd 1e-2, 15 epochs, batch 512, clip 1, warm-up 100 it + cosine to 1e-6; the grid
    # spans the paper's 1e-4 and DINOv2's linear-eval range
    "cls": Recipe((1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1), 15, 512, 1e-2, 100, 1e-6),
    # ADE20k: lr 1e-3, wd 1e-2, 10 epochs, batch 32, warm-up 100 it + cosine to 1e-5, clip 1
    "seg": Recipe((3e-4, 1e-3, 3e-3), 10, 32, 1e-2, 100, 1e-5),
    # NYUd: lr 1e-3, wd 1e-3, 25 epochs, batch 128, no schedule, no clipping
    "depth": Recipe((3e-4, 1e-3, 3e-3), 25, 128, 1e-3, 0, 0.0, "constant", None),
}


@dataclass
class DenseGeometry:
    patch: int
    pad: tuple[int, int]
    hw: tuple[int, int]
    n_classes: int = 0
    depth_range: tuple[float, float] = (0.001, 10.0)
    eigen: bool = False


@dataclass
class ProbeResult:
    metric: str
    higher_is_better: bool
    history: dict = field(default_factory=dict)   # split -> [lr][epoch]
    best: dict = field(default_factory=dict)

    def select(self, lrs) -> dict:
        """Best validation score; ties (a small validation split saturates) go to the lower validation loss, then
        to the smaller learning rate and the earlier epoch."""
        val, test = np.array(self.history["val"], float), np.array(self.history["test"], float)
        score = np.where(np.isnan(val), -np.inf, val if self.higher_is_better else -val)
        loss = np.array(self.history.get("val_loss") or np.zeros_like(val), float)
        tied = np.argwhere(score == score.max())
        g, e = min(tied, key=lambda ge: (loss[ge[0], ge[1]], ge[0], ge[1]))
        pick = (np.nanargmax if self.higher_is_better else np.nanargmin)(test[g])
        self.best = {"lr": float(lrs[g]), "epoch": int(e), "val": float(val[g, e]), "test": float(test[g, e]),
                     "test_best_over_epochs": float(test[g, pick])}
        return self.best


def _schedule(recipe: Recipe, total: int):
    warm = min(recipe.warmup_iters, max(total // 10, 0))

    def factor(it: int, base: float) -> float:
        f = 1.0
        if warm and it < warm:
            f = 0.01 + 0.99 * it / warm
        if recipe.schedule == "cosine":
            t = min(max(it - warm, 0) / max(total - warm, 1), 1.0)
            floor = min(recipe.min_lr / base, 1.0)
            f *= floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        return f
    return factor


def feature_stats(task: str, tr: dict, rows: np.ndarray, chunk: int = 256) -> dict:
    """Per-channel mean and std of the training split's features (float64, read in chunks): ``pooled`` for cls;
    ``patches`` (over images and positions) and ``cls`` for dense tasks.

    Standardising is an affine map of the features that a linear head absorbs exactly (W' = W diag(std),
    b' = b + W mean), so it does not change what a probe can represent, only how fast AdamW gets there. It matters
    on a short budget: a surrogate whose pooled features keep a small share of the teacher's between-image variance
    (docs/surrogate.md) would otherwise be judged by how well the optimiser copes with small-variance directions.
    ``--no-standardize`` gives the paper's raw-feature protocol."""
    names = ["pooled"] if task == "cls" else ["patches", "cls"]
    out = {}
    for name in names:
        a = tr[name]
        s1 = s2 = 0.0
        n = 0
        for s in range(0, len(rows), chunk):
            x = torch.from_numpy(np.asarray(a[rows[s:s + chunk]], dtype=np.float64))
            x = x.reshape(-1, x.shape[-1])
            s1, s2, n = s1 + x.sum(0), s2 + (x * x).sum(0), n + len(x)
        mean = s1 / n
        std = (s2 / n - mean ** 2).clamp(min=0).sqrt()
        out[name] = (mean.float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float())
    return out


def _rows(a: dict, valid_only: bool = True) -> np.ndarray:
    v = np.asarray(a["valid"])
    return np.flatnonzero(v) if valid_only else np.arange(len(v))


class _Task:
    """Per-task pieces: batch fetch, per-head loss, evaluation."""

    def __init__(self, task: str, geo: DenseGeometry | None, n_classes: int, stats: dict | None = None):
        self.task, self.geo, self.n_classes, self.stats = task, geo, n_classes, stats or {}
        self.centres = bin_centres(geo.depth_range) if task == "depth" else None

    def _z(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in self.stats:
            return x
        mean, std = self.stats[name]
        return (x - mean) / std

    def fetch(self, a: dict, idx: np.ndarray):
        idx = np.sort(idx)
        if self.task == "cls":
            return self._z("pooled", as_float(a["pooled"][idx])), torch.from_numpy(np.asarray(a["labels"][idx]))
        x = (self._z("patches", as_float(a["patches"][idx])), self._z("cls", as_float(a["cls"][idx])))
        if self.task == "seg":
            return x, torch.from_numpy(np.asarray(a["masks"][idx]).astype(np.int64))
        return x, as_float(a["depth"][idx])

    def _input_size(self, x) -> tuple[int, int]:
        """The (padded) input resolution: the patch grid times the patch size."""
        return x[0].shape[1] * self.geo.patch, x[0].shape[2] * self.geo.patch

    def seg_pred(self, head, g, x) -> torch.Tensor:
        """(B, C, H, W) logits at the target resolution."""
        return to_target(seg_logits(head, g, x[0]), self._input_size(x), self.geo.pad, self.geo.hw)

    def depth_pred(self, head, g, x):
        """Bin logits on the x4 grid and the depth map (B, 1, H, W) at the target resolution."""
        logits4 = depth_logits(head, g, *x)
        d = (logits4.softmax(1) * self.centres[None, :, None, None]).sum(1, keepdim=True)
        return logits4, to_target(d, self._input_size(x), self.geo.pad, self.geo.hw)

    def loss(self, head: GridHead, x, y) -> torch.Tensor:
        if self.task == "cls":
            logits = head.all(x)  # (G, B, C)
            return F.cross_entropy(logits.flatten(0, 1), y.repeat(len(head)), reduction="mean") * len(head)
        total = 0.0
        if self.task == "depth":  # the target on the padded input canvas (padding = invalid), for the bin CE
            top, left = self.geo.pad
            y_padded = y.new_zeros((y.shape[0], *self._input_size(x)))
            y_padded[:, top:top + y.shape[-2], left:left + y.shape[-1]] = y
        for g in range(len(head)):
            if self.task == "seg":
                total = total + F.cross_entropy(self.seg_pred(head, g, x), y, ignore_index=255)
            else:
                logits4, pred = self.depth_pred(head, g, x)
                total = total + depth_loss(logits4, pred, y, y_padded, self.geo.depth_range)
        return total

    @torch.no_grad()
    def evaluate(self, head: GridHead, a: dict, batch: int) -> tuple[list[float], list[float]]:
        """Per head: the metric and (cls) the mean cross-entropy, the tie-breaker of ``select``."""
        rows = _rows(a)
        G = len(head)
        acc = [[0.0, 0] for _ in range(G)]
        ce = torch.zeros(G, dtype=torch.float64)
        cms = [torch.zeros(self.n_classes, self.n_classes, dtype=torch.long) for _ in range(G)]
        for s in range(0, len(rows), batch):
            x, y = self.fetch(a, rows[s:s + batch])
            if self.task == "cls":
                logits = head.all(x)
                ce += F.cross_entropy(logits.transpose(1, 2), y[None].expand(G, -1), reduction="none").sum(1)
                pred = logits.argmax(-1)
                for g in range(G):
                    acc[g][0] += int((pred[g] == y).sum())
                    acc[g][1] += len(y)
                continue
            for g in range(G):
                if self.task == "seg":
                    cms[g] += confusion(self.seg_pred(head, g, x).argmax(1), y, self.n_classes)
                else:
                    _, pred = self.depth_pred(head, g, x)
                    m = eval_mask(y, self.geo.depth_range, self.geo.eigen)
                    acc[g][0] += float(((pred[:, 0] - y)[m] ** 2).sum())
                    acc[g][1] += int(m.sum())
        losses = (ce / max(len(rows), 1)).tolist()
        if self.task == "cls":
            return [accuracy(c, n) for c, n in acc], losses
        if self.task == "seg":
            return [100 * miou(cm) for cm in cms], losses
        return [rmse(s, n) for s, n in acc], losses


def train_probe(task: str, arrays: dict, recipe: Recipe, seed: int, *, geo: DenseGeometry | None = None,
                n_classes: int = 0, init: tuple[torch.Tensor, torch.Tensor] | None = None, bar=None) -> ProbeResult:
    """Train one grid (``recipe.lrs``) on ``arrays['train']``; score ``val`` and ``test`` every epoch."""
    tr = arrays["train"]
    rows = _rows(tr)
    if len(rows) == 0:
        raise RaptorError("no readable training images")
    if task == "cls":
        labels = np.asarray(tr["labels"])[rows]
        if len(np.unique(labels)) < 2:
            raise RaptorError(f"the training split holds a single class ({int(labels[0])}); a classifier needs 2+")
        n_classes = max(n_classes, int(labels.max()) + 1)
        in_dim, out_dim = tr["pooled"].shape[1], n_classes
    elif task == "seg":
        in_dim, out_dim = tr["patches"].shape[-1], n_classes
    else:
        in_dim, out_dim = 2 * tr["patches"].shape[-1], len(bin_centres(geo.depth_range))
    gen = torch.Generator().manual_seed(seed)
    head = GridHead(len(recipe.lrs), in_dim, out_dim, gen)
    stats = feature_stats(task, tr, rows) if recipe.standardize else None
    if init is not None:
        w, b = init
        if tuple(w.shape) != (out_dim, in_dim):
            raise RaptorError(f"--init-head has shape {tuple(w.shape)}; this probe needs ({out_dim}, {in_dim})")
        if stats:  # the same map on standardised features
            mean, std = stats["pooled"]
            w, b = w * std[None, :], b + w @ mean
        head.init_from(w, b)
    spec = _Task(task, geo, n_classes, stats)
    opt = torch.optim.AdamW(head.param_groups(recipe.lrs), weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(rows) / recipe.batch_size)
    factor = _schedule(recipe, recipe.epochs * steps_per_epoch)
    name, higher = METRICS[task]
    res = ProbeResult(name, higher, {"val": [[] for _ in recipe.lrs], "test": [[] for _ in recipe.lrs],
                                     "val_loss": [[] for _ in recipe.lrs]})
    eval_batch = max(recipe.batch_size, 256) if task == "cls" else 16

    def score():
        for split in ("val", "test"):
            scores, losses = spec.evaluate(head, arrays[split], eval_batch)
            for g, v in enumerate(scores):
                res.history[split][g].append(v)
                if split == "val":
                    res.history["val_loss"][g].append(losses[g])

    score()
    it = 0
    order_gen = np.random.default_rng(seed)
    train_loss = []
    for _epoch in range(recipe.epochs):
        perm = rows[order_gen.permutation(len(rows))]
        tot = 0.0
        for s in range(0, len(perm), recipe.batch_size):
            for grp, lr in zip(opt.param_groups, recipe.lrs):
                grp["lr"] = lr * factor(it, lr)
            x, y = spec.fetch(tr, perm[s:s + recipe.batch_size])
            loss = spec.loss(head, x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.clip:
                for g in range(len(head)):  # each head clipped on its own, as if trained alone
                    torch.nn.utils.clip_grad_norm_([head.weights[g], head.biases[g]], recipe.clip)
            opt.step()
            tot += float(loss.detach()) / len(head)
            it += 1
        train_loss.append(tot / steps_per_epoch)
        score()
        if bar is not None:
            bar.advance(1)
    res.history["train_loss"] = train_loss
    res.select(recipe.lrs)
    return res


def prior_baseline(task: str, arrays: dict, geo: DenseGeometry | None = None, n_classes: int = 0,
                   chunk: int = 64) -> float:
    """The score of a predictor that never looks at the test image, from training targets alone: the majority class
    (cls), the majority class at every pixel (seg), the mean training depth at every pixel (depth). Dense targets
    are read in chunks of ``chunk`` images (memory stays bounded on ADE20k / NYUd)."""
    tr, te = arrays["train"], arrays["test"]
    rtr, rte = _rows(tr), _rows(te)
    if task == "cls":
        y = np.asarray(tr["labels"])[rtr]
        return float((np.asarray(te["labels"])[rte] == np.bincount(y).argmax()).mean())

    def chunks(a, rows):
        for s in range(0, len(rows), chunk):
            yield torch.from_numpy(np.asarray(a[rows[s:s + chunk]]))

    if task == "seg":
        hw = tr["masks"].shape[1:]
        counts = torch.zeros(n_classes + 1, int(np.prod(hw)), dtype=torch.int64)  # last row: ignored pixels
        for m in chunks(tr["masks"], rtr):
            lab = m.reshape(len(m), -1).long().clamp(max=n_classes)  # 255 -> the extra row
            counts.scatter_add_(0, lab, torch.ones_like(lab))
        mode = counts[:n_classes].argmax(0).reshape(hw)
        cm = torch.zeros(n_classes, n_classes, dtype=torch.int64)
        for yt in chunks(te["masks"], rte):
            cm += confusion(mode.expand_as(yt), yt, n_classes)
        return 100 * miou(cm)
    total = count = None
    for d in chunks(tr["depth"], rtr):
        d = d.float()
        ok = eval_mask(d, geo.depth_range, False)
        s_, c_ = torch.where(ok, d, torch.zeros_like(d)).sum(0, dtype=torch.float64), ok.sum(0)
        total, count = (s_, c_) if total is None else (total + s_, count + c_)
    fill = float(total.sum() / count.sum().clamp(min=1))
    mean_map = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, fill)).float()
    sq, n = 0.0, 0
    for yt in chunks(te["depth"], rte):
        yt = yt.float()
        m = eval_mask(yt, geo.depth_range, geo.eigen)
        sq += float(((mean_map.expand_as(yt) - yt)[m] ** 2).sum())
        n += int(m.sum())
    return rmse(sq, n)
