"""One stage-1 block, short budget: held-out AR R^2 over its segment for a choice of LayerScale init, learning rate
and loss normalisation. Used in docs/surrogate.md (recipe ablation). Needs the 112-px digits store:

    raptor extract --data bundled:digits --image-size 112 --out runs/digits112.zarr
    python scripts/ablation_block.py runs/digits112.zarr START END INIT LR NORM [STEPS]
"""
import sys
import time

import numpy as np
import torch

from raptor.store import TrajectoryStore
from raptor.surrogate.batches import StoreBatches, holdout_split
from raptor.surrogate.config import FitConfig, lr_at
from raptor.surrogate.metrics import LayerFitAccumulator
from raptor.surrogate.stats import ridge_predict
from raptor.surrogate.train import build_model, compute_stats, item_loss, plan

torch.set_num_threads(1)
store, start, end, init, lr, norm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), \
    float(sys.argv[5]), sys.argv[6]
steps = int(sys.argv[7]) if len(sys.argv) > 7 else 60
st = TrajectoryStore(store)
rows = st.valid_indices[:800]
tr, va = holdout_split(len(rows), 128)
data = StoreBatches(st, rows[tr], 0)
stats = compute_stats(data, st.layout, 128, progress=False)
val = st.read(np.sort(rows[va]), layers=(start, end))
depth = int(st.meta["teacher"]["depth"])
phases = [p for p in ([list(range(1, start + 1))] if start else []) + [list(range(start + 1, end + 1))] +
          ([list(range(end + 1, depth + 1))] if end < depth else [])]
cfg = FitConfig(store="x", phases=phases, batch_size=8, lr=lr, steps1=steps, loss_norm=norm)
model = build_model(cfg, st.meta["teacher"])
b = 1 if start else 0
if init != 1e-5:
    with torch.no_grad():
        model.blocks[b].ls1.fill_(init)
        model.blocks[b].ls2.fill_(init)
item = plan(cfg, model)[b]
if b == len(phases) - 1:
    item.weights = cfg.stage1_last_weights
blk = model.blocks[b]
opt = torch.optim.AdamW(blk.parameters(), lr=lr, weight_decay=1e-4)
t0 = time.time()
for step in range(steps):
    for g in opt.param_groups:
        g["lr"] = lr_at(step, steps, cfg)
    traj = data.get(item.name, step, 8, start, end)
    loss = item_loss(model, item, traj, step, cfg, st.layout, torch.Generator(), stats)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(blk.parameters(), 1.0)
    opt.step()
acc = LayerFitAccumulator(end - start, val.shape[-1], st.layout)
with torch.no_grad():
    acc.update(torch.stack(model(val[:, 0], start, end), 1), val[:, 1:])
r = acc.result()
base = {"identity": LayerFitAccumulator(end - start, val.shape[-1], st.layout),
        "ridge chained": LayerFitAccumulator(end - start, val.shape[-1], st.layout)}
base["identity"].update(val[:, :-1], val[:, 1:])
x, outs = val[:, 0], []
for layer in range(start + 1, end + 1):
    x = ridge_predict(stats.ridge, x, layer)
    outs.append(x)
base["ridge chained"].update(torch.stack(outs, 1), val[:, 1:])
print("baselines on the same held-out images, mean R2 over the segment: " +
      ", ".join(f"{k} {np.mean(a.result()['r2']):.3f}" for k, a in base.items()))
print(f"segment {start}->{end} init {init} lr {lr} norm {norm} steps {steps}: AR R2 mean {np.mean(r['r2']):.3f} "
      f"per layer {[round(x, 2) for x in r['r2']]} cls {[round(x, 2) for x in r['r2_groups']['cls']]} "
      f"({time.time() - t0:.0f} s)")
