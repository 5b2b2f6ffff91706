"""Probe harness cost: with cached features, 3 seeds x a 10-learning-rate grid must cost <= 1.3x one
backbone pass over the data.

Side by side in one process, on the bundled DINOv2-S and the real `bundled:digits` classification split (1,797
images at 112 px): (a) one backbone pass over every split (the feature pass, decode + transform + forward +
cache write), (b) 3 seeds x the default 10-lr grid trained on the cached features (the data set's recipe: 30 epochs,
batch 128), (c) for scale, one seed of one lr for one epoch run the way the official trainers do (backbone
re-run on every batch), extrapolated to 3 seeds x 10 lrs x 30 epochs.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import save

DATA = "bundled:digits"


def main() -> dict:
    from raptor.probes.backbones import Backbone, parse_backbone
    from raptor.probes.data import open_probe_data
    from raptor.probes.features import split_features, transform_for
    from raptor.probes.run import ProbeConfig
    from raptor.probes.train import train_probe

    data = open_probe_data(DATA, "cls")
    bb = Backbone.load(parse_backbone("bundled:dinov2-s"))
    tf = transform_for("cls", data, bb.teacher, None)
    recipe = ProbeConfig("cls", "bundled:dinov2-s", DATA, "x").make_recipe(data.recipe)
    n = sum(len(v) for v in data.splits.values())
    cache = Path(tempfile.mkdtemp(prefix="bench_probe_"))
    try:
        t0 = time.perf_counter()
        arrays = {s: split_features(bb, data, "cls", s, tf, cache, 32, progress=False) for s in data.splits}
        feature_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = [train_probe("cls", arrays, recipe, seed, n_classes=data.n_classes) for seed in (0, 1, 2)]
        probes_s = time.perf_counter() - t0
        # official style: backbone on every batch of every epoch, one lr, one seed (one epoch measured)
        from raptor.data import ImageItem, load_images

        items = [ImageItem(s.id, s.image) for s in data.splits["train"]]
        t0 = time.perf_counter()
        head = torch.nn.Linear(2 * bb.teacher.dim, 10)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
        for s in range(0, len(items), recipe.batch_size):
            x, _, _ = load_images(items[s:s + recipe.batch_size], tf)
            with torch.no_grad():
                feats = bb.features(bb.final_tokens(torch.stack(x)), bb.teacher.layout(tf.crop), "cls")["pooled"]
            loss = head(torch.from_numpy(feats)).logsumexp(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        epoch_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    runs = 3 * len(recipe.lrs)
    official_s = epoch_s * recipe.epochs * runs
    out = {"data": DATA, "images": n, "train_images": len(data.splits["train"]), "lrs": list(recipe.lrs),
           "epochs": recipe.epochs, "batch_size": recipe.batch_size, "seeds": 3,
           "feature_pass_s": round(feature_s, 2), "probes_3_seeds_x_grid_s": round(probes_s, 2),
           "ratio_total_over_one_pass": round((feature_s + probes_s) / feature_s, 3),
           "official_style_one_epoch_one_lr_s": round(epoch_s, 2),
           "official_style_extrapolated_s": round(official_s, 1),
           "speedup_vs_official_style": round(official_s / (feature_s + probes_s), 1),
           "test_top1_per_seed": [r.best["test"] for r in res]}
    print(f"feature pass {feature_s:.1f} s ({n} images); 3 seeds x {len(recipe.lrs)} lrs x {recipe.epochs} epochs on "
          f"cached features {probes_s:.1f} s; total / one pass = {out['ratio_total_over_one_pass']:.3f} (goal <= 1.3)")
    print(f"official style (backbone every batch): {epoch_s:.1f} s per epoch per lr per seed -> {official_s:.0f} s "
          f"for the same grid ({out['speedup_vs_official_style']}x slower)")
    save("probe", out)
    return out


if __name__ == "__main__":
    main()
