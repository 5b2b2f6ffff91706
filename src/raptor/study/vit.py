"""A small ViT for the stochastic-depth study, trained from scratch with exact resume.

The model is an HF ``Dinov2ForImageClassification`` (pre-norm blocks, LayerScale, [cls ‖ mean patch] linear head)
whose ``drop_path_rate`` is the **uniform** stochastic-depth probability p: HF's Dinov2 applies the same rate in every
block, as the paper's study does (docs/method.md §8). Saved with ``save_pretrained`` (safetensors) plus a
``preprocessor_config.json`` holding its mean/std, the trained model is a teacher through the existing contract
(``hf:<dir>``) with no new teacher code.

Training: AdamW, linear warm-up then cosine decay, cross-entropy, standard augmentation on the normalised tensors
(random translation by up to ``shift`` pixels with zero padding, optional horizontal flip). Epoch e's sample order,
augmentation and drop-path masks come from generators seeded by (seed, e) only, and a checkpoint (safetensors +
JSON, atomic) is written after every epoch, so an interrupted run resumes to bit-identical weights.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from raptor.config import atomic_write_text
from raptor.data import EvalTransform, load_images, open_source
from raptor.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raptor.errors import RaptorError, check_positive
from raptor.progress import progress_bar
from raptor.surrogate.checkpoint import latest_checkpoint, load_optimizer, read_checkpoint, save_checkpoint
from raptor.surrogate.config import warmup_cosine
from raptor.versions import require


@dataclass
class ViTConfig:
    image_size: int = 16
    patch_size: int = 4
    dim: int = 64
    depth: int = 12
    heads: int = 4
    mlp_ratio: int = 2
    layerscale: float = 1.0

    def check(self) -> None:
        check_positive(image_size=self.image_size, patch_size=self.patch_size, dim=self.dim, depth=self.depth,
                       heads=self.heads)
        if self.image_size % self.patch_size:
            raise RaptorError(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}")
        if self.dim % self.heads:
            raise RaptorError(f"width {self.dim} is not a multiple of the number of heads {self.heads}")
        if self.depth < 3:
            raise RaptorError(f"the study needs depth >= 3 to have phases, got {self.depth}")


@dataclass
class TrainConfig:
    epochs: int = 25
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 2
    shift: int = 2
    flip: bool = False
    label_smoothing: float = 0.0

    def check(self) -> None:
        check_positive(epochs=self.epochs, batch_size=self.batch_size)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise RaptorError(f"bad learning rate {self.lr}")
        if self.shift < 0 or self.warmup_epochs < 0 or self.weight_decay < 0:
            raise RaptorError("shift, warm-up epochs and weight decay must be >= 0")


def build_model(cfg: ViTConfig, n_classes: int, drop_path: float, seed: int):
    import transformers as T

    require("transformers")

    hf_cfg = T.Dinov2Config(hidden_size=cfg.dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
                            mlp_ratio=cfg.mlp_ratio, image_size=cfg.image_size, patch_size=cfg.patch_size,
                            layerscale_value=cfg.layerscale, drop_path_rate=drop_path, num_labels=n_classes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return T.Dinov2ForImageClassification(hf_cfg)


def augment(x: torch.Tensor, shift: int, flip: bool, g: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (zero = the normalised mean after padding) and optional flip."""
    if shift:
        B, _, H, W = x.shape
        pad = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (B,), generator=g)
        dx = torch.randint(0, 2 * shift + 1, (B,), generator=g)
        x = torch.stack([pad[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    if flip:
        mask = (torch.rand(x.shape[0], generator=g) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2 ** 31)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(x), batch):
        correct += int((model(pixel_values=x[s:s + batch]).logits.argmax(1) == y[s:s + batch]).sum())
    return correct / max(1, len(x))


def save_hf(model, out: Path, mean, std) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model.save_pretrained(str(out), safe_serialization=True)
    atomic_write_text(out / "preprocessor_config.json", json.dumps({"image_mean": list(mean), "image_std": list(std)}))


def train_vit(vcfg: ViTConfig, tcfg: TrainConfig, drop_path: float, seed: int, x_train: torch.Tensor,
              y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, out: Path, mean, std,
              progress: bool = True, on_epoch=None) -> dict:
    """Train (or resume) one ViT into ``out``: ``out/model`` (the HF dir, the teacher) and ``out/train.json``
    (written last) when done; ``out/checkpoints`` while running. Returns the training summary. The ViT trains on
    the device of ``x_train`` (initialised on the CPU, so its starting weights are the same on every device; the
    batch order and augmentation come from CPU generators, the drop-path masks from the device's). ``on_epoch(epoch,
    train_loss)`` is called after each epoch's checkpoint (1-based epochs; live tracking)."""
    done = out / "train.json"
    if done.is_file():
        return json.loads(done.read_text())
    n_classes = int(y_train.max()) + 1
    model = build_model(vcfg, n_classes, drop_path, seed).to(x_train.device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embeddings" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embeddings" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tcfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tcfg.lr, betas=(0.9, 0.999))
    steps_per_epoch = math.ceil(len(x_train) / tcfg.batch_size)
    total = steps_per_epoch * tcfg.epochs
    history: list[dict] = []
    start = 0
    ck = latest_checkpoint(out / "checkpoints")
    if ck is not None:
        weights, optim, state = read_checkpoint(ck)
        model.load_state_dict(weights)
        if optim is not None:
            load_optimizer(opt, optim, state["optimizer"])
        start, history = int(state["epoch"]), list(state["history"])
    t0 = time.perf_counter()
    with progress_bar(tcfg.epochs, f"train ViT p={drop_path:g} seed {seed}", "epoch", enabled=progress) as bar:
        bar.advance(start)
        for epoch in range(start, tcfg.epochs):
            es = _epoch_seed(seed, epoch)
            g = torch.Generator().manual_seed(es)
            torch.manual_seed(es)  # drop-path masks (HF samples them from the global generator)
            model.train()
            order = torch.randperm(len(x_train), generator=g)
            loss_sum = 0.0
            for b in range(steps_per_epoch):
                idx = order[b * tcfg.batch_size:(b + 1) * tcfg.batch_size]
                step = epoch * steps_per_epoch + b
                for group in opt.param_groups:
                    group["lr"] = warmup_cosine(step, total, tcfg.warmup_epochs * steps_per_epoch, tcfg.lr)
                xb = augment(x_train[idx], tcfg.shift, tcfg.flip, g)
                loss = F.cross_entropy(model(pixel_values=xb).logits, y_train[idx],
                                       label_smoothing=tcfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise RaptorError(f"non-finite loss in epoch {epoch + 1} of the ViT with p={drop_path:g}, "
                                      f"seed {seed} (lower the learning rate)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                loss_sum += float(loss.detach()) * len(idx)
            history.append({"epoch": epoch + 1, "train_loss": loss_sum / len(x_train)})
            save_checkpoint(out / "checkpoints", f"epoch{epoch + 1:04d}", model, opt,
                            {"epoch": epoch + 1, "history": history})
            if on_epoch is not None:
                on_epoch(epoch + 1, history[-1]["train_loss"])
            bar.advance(1)
    model.eval()
    save_hf(model, out / "model", mean, std)
    summary = {"drop_path": drop_path, "seed": seed, "vit": asdict(vcfg), "train": asdict(tcfg),
               "train_accuracy": accuracy(model, x_train, y_train), "test_accuracy": accuracy(model, x_test, y_test),
               "history": history, "train_seconds": round(time.perf_counter() - t0, 1),
               "parameters": int(sum(p.numel() for p in model.parameters()))}
    atomic_write_text(done, json.dumps(summary, indent=1))
    import shutil

    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return summary


class Split(NamedTuple):
    """A labelled data set as normalised tensors with its fixed train/test split."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    items_train: list
    items_test: list
    source: object
    transform: object


def load_split(spec: str, size: int, test_frac: float = 0.2, limit: int | None = None, sample_seed: int = 1,
               sample: str = "random") -> Split:
    """A labelled image source as normalised tensors at ``size`` px (the eval transform with ImageNet statistics),
    with a fixed stratified train/test split (independent of the training seed)."""
    src = open_source(spec).subset(limit, sample_seed, sample)
    y = src.labels
    if (y < 0).any():
        raise RaptorError(f"--data {spec} has unlabelled images: the study trains classifiers (use class folders, "
                          f"classes:<dir>, or bundled:digits / bundled:lfw)")
    classes = np.unique(y)
    if len(classes) < 2:
        raise RaptorError(f"--data {spec} has a single class")
    tf = EvalTransform.for_size(size, IMAGENET_MEAN, IMAGENET_STD)
    rng = np.random.default_rng(12345)
    test = np.zeros(len(y), dtype=bool)
    for c in classes:
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[: max(1, int(round(test_frac * len(idx))))]] = True
    tensors, kept, bad = load_images(src.items, tf)
    if bad:
        raise RaptorError(f"{len(bad)} images of {spec} could not be read (first: {bad[0]})")
    x = torch.stack(tensors)
    yt = torch.from_numpy(y)
    tr, te = np.flatnonzero(~test), np.flatnonzero(test)
    return Split(x[tr], yt[tr], x[te], yt[te], [src.items[i] for i in tr], [src.items[i] for i in te], src, tf)
