"""``raptor fit``: train a Raptor surrogate end to end and validate it against the teacher.

Outputs in OUT: ``config.yaml``, ``checkpoints/`` (resumable), ``model.safetensors`` + ``surrogate.json`` (final
weights and phases), ``metrics.json`` (per-layer R^2 both ways, cosine per token group, splice agreement, loss
curves, timings) and plots ``r2_per_layer.png``, ``loss_curves.png``. ``metrics.json`` is written last.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from raptor.config import atomic_write_text, save_config, to_dict
from raptor.errors import RaptorError
from raptor.surrogate.metrics import LayerFitAccumulator
from raptor.surrogate.train import FitConfig, OnlineBatches, StoreBatches, build_model, train


def split_items(items, every_nth: int):
    """Hold out every n-th image (whole images) for validation."""
    if every_nth < 2:
        raise RaptorError("--val-every-nth must be >= 2")
    val = [it for i, it in enumerate(items) if i % every_nth == every_nth - 1]
    tr = [it for i, it in enumerate(items) if i % every_nth != every_nth - 1]
    if not val or not tr:
        raise RaptorError(f"{len(items)} images are too few to hold out every {every_nth}-th for validation")
    return tr, val


def fit_probe(teacher, source_spec: str, limit: int, size: int, seed: int = 0):
    """A linear probe on the teacher's [cls || mean patch] after the final norm (the DINOv2 linear-head format),
    fitted on half of a labelled set; returns (ClassifierHead, held-out images, labels, probe accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from torch import nn

    from raptor.data import load_images, open_source
    from raptor.teachers.base import ClassifierHead

    src = open_source(source_spec)
    if (src.labels < 0).all():
        raise RaptorError(f"probe data {source_spec} has no labels")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(src))[:limit]
    tensors, kept, _ = load_images([src.items[i] for i in order], teacher.eval_transform(size))
    x = torch.stack(tensors)
    y = src.labels[order[kept]]
    layout = teacher.layout(size)
    head = ClassifierHead(nn.Linear(1, 1), ClassifierHead.default_pooling(layout))  # linear replaced below
    feats = []
    for s in range(0, len(x), 32):
        last = teacher.trajectory(x[s:s + 32], [teacher.depth])[:, 0]
        feats.append(head.pool(teacher.final_norm(last), layout))
    f = torch.cat(feats).numpy()
    half = len(f) // 2
    clf = LogisticRegression(max_iter=3000, C=1.0).fit(f[:half], y[:half])
    lin = nn.Linear(f.shape[1], len(clf.classes_))
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(clf.coef_).float())
        lin.bias.copy_(torch.from_numpy(clf.intercept_).float())
    head.linear = lin
    acc = float((clf.predict(f[half:]) == y[half:]).mean())
    labels = torch.as_tensor(np.searchsorted(clf.classes_, y[half:]))
    return head, x[half:], labels, acc


@torch.no_grad()
def validate(model, teacher, val_traj: torch.Tensor, layout, head=None, probe_x=None, probe_y=None) -> dict:
    """Per-layer fit of the full autoregressive surrogate (from teacher layer 0) and of each block alone
    (from its segment's teacher start), plus splice agreement under a classifier."""
    L = model.depth
    acc_full = LayerFitAccumulator(L, val_traj.shape[-1], layout)
    acc_seg = LayerFitAccumulator(L, val_traj.shape[-1], layout)
    for s in range(0, len(val_traj), 8):
        tr = val_traj[s:s + 8]
        pred = torch.stack(model(tr[:, 0], 0, L), dim=1)
        acc_full.update(pred, tr[:, 1:])
        seg_pred = torch.cat([torch.stack(model(tr[:, a], a, b), dim=1) for a, b in model.cfg.segments], dim=1)
        acc_seg.update(seg_pred, tr[:, 1:])
    out = {"layers": list(range(1, L + 1)), "autoregressive": acc_full.result(), "per_block_from_teacher":
           acc_seg.result()}
    if head is not None and probe_x is not None:
        out["splice"] = splice_agreement(model, teacher, head, probe_x, probe_y)
    return out


@torch.no_grad()
def splice_agreement(model, teacher, head, x: torch.Tensor, y: torch.Tensor | None) -> dict:
    layout = teacher.layout(x.shape[-1])
    t_logits, variants = [], {"full (0-%d)" % model.depth: (0, model.depth)}
    for b, (s, e) in enumerate(model.cfg.segments):
        variants[f"block{b} ({s}-{e})"] = (s, e)
    logits = {k: [] for k in variants}
    for s in range(0, len(x), 16):
        xb = x[s:s + 16]
        t_logits.append(head(teacher.final_norm(teacher.trajectory(xb, [teacher.depth])[:, 0]), layout))
        for k, (i, j) in variants.items():
            logits[k].append(head(teacher.final_norm(model.splice(teacher, xb, i, j)), layout))
    tl = torch.cat(t_logits)
    res = {"n_images": len(x), "teacher_accuracy": float((tl.argmax(1) == y).float().mean()) if y is not None else None}
    for k, v in logits.items():
        sl = torch.cat(v)
        res[k] = {"agreement": float((sl.argmax(1) == tl.argmax(1)).float().mean()),
                  "accuracy": float((sl.argmax(1) == y).float().mean()) if y is not None else None}
    return res


def run_fit(cfg: FitConfig, resume: bool = False, progress: bool = True, on_step=None) -> dict:
    from raptor import plots
    from raptor.data import load_images, open_source
    from raptor.runtime import tune_malloc
    from raptor.teachers import load_teacher

    tune_malloc()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").unlink(missing_ok=True)
    teacher = load_teacher(cfg.teacher)
    if cfg.store:
        from raptor.store import TrajectoryStore

        st = TrajectoryStore(cfg.store)
        if st.meta["settings"]["teacher"] != teacher.spec:
            raise RaptorError(f"store {cfg.store} was made with {st.meta['settings']['teacher']}, not {teacher.spec}")
        if st.layers != list(range(teacher.depth + 1)):
            raise RaptorError("fit needs a store with every layer 0..L")
        rows = st.valid_indices[: cfg.limit] if cfg.limit else st.valid_indices
        val_rows = rows[cfg.val_every_nth - 1::cfg.val_every_nth]
        tr_rows = np.setdiff1d(rows, val_rows)
        data = StoreBatches(st, tr_rows, cfg.seed)
        layout = st.layout
        size = int(st.meta["settings"]["transform"]["center_crop"])
        val_traj = st.read(np.sort(val_rows[: cfg.val_limit]))
        n_train = len(tr_rows)
    else:
        if not cfg.data:
            raise RaptorError("give --data or --store")
        src = open_source(cfg.data).subset(cfg.limit)
        tr_items, val_items = split_items(src.items, cfg.val_every_nth)
        size = teacher.image_size(cfg.image_size)
        data = OnlineBatches(teacher, tr_items, size, cfg.seed, cfg.crops)
        layout = teacher.layout(size)
        vt, _, _ = load_images(val_items[: cfg.val_limit], teacher.eval_transform(size))
        val_traj = teacher.trajectory(torch.stack(vt))
        n_train = len(tr_items)
    model = build_model(cfg, teacher.describe(), teacher)
    save_config(cfg, out / "config.yaml")
    t0 = time.perf_counter()

    def quick_val(m) -> float:  # mean held-out R^2 of the full autoregressive rollout
        return validate(m, teacher, val_traj, layout)["autoregressive"]["r2_mean"]

    state = train(cfg, model, data, layout, resume=resume, progress=progress, on_step=on_step,
                  validate_fn=quick_val)
    train_s = time.perf_counter() - t0
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    atomic_write_text(out / "surrogate.json", json.dumps({"surrogate": model.cfg.to_dict(), "teacher": teacher.spec},
                                                         indent=1))
    head, px, py, probe_acc = teacher.head, None, None, None
    if head is None and cfg.probe_data:
        head, px, py, probe_acc = fit_probe(teacher, cfg.probe_data, cfg.probe_limit, size, cfg.seed)
    val = validate(model, teacher, val_traj, layout, head, px, py)
    if probe_acc is not None:
        val["splice"]["probe"] = {"data": cfg.probe_data, "teacher_probe_accuracy_heldout": probe_acc}
    params = sum(p.numel() for p in model.parameters())
    metrics = {
        "config": to_dict(cfg), "surrogate": model.cfg.to_dict(), "teacher": teacher.describe(),
        "n_train_images": n_train, "n_val_images": len(val_traj), "parameters": params,
        "teacher_block_parameters": sum(p.numel() for p in teacher.blocks.parameters()),
        "validation": val, "loss_history": state.history, "train_seconds": round(train_s, 1),
        "metric_definitions": {
            "r2": "1 - SSE / sum over features of the target's variance (per-feature mean over validation tokens)",
            "r2_official": "1 - mean((pred-y)^2) / (var(pred) + 1e-6), global scalar mean (PAPER.md 3.5)",
            "autoregressive": "full surrogate rolled out from teacher layer 0",
            "per_block_from_teacher": "each block rolled out over its own segment from the teacher's start layer",
            "splice": "top-1 agreement with the teacher under the classifier (teacher head or a probe)"},
    }
    layers = val["layers"]
    bounds = [p[-1] + 0.5 for p in model.cfg.phases[:-1]]
    ar, sg = val["autoregressive"], val["per_block_from_teacher"]
    plots.line_plot(out / "r2_per_layer.png", layers, {"R² AR (standard)": ar["r2"], "R² AR (official)":
                    ar["r2_official"], "R² per block from teacher": sg["r2"]}, xlabel="layer", ylabel="R²",
                    title=f"Raptor k={len(model.cfg.phases)} vs {teacher.display_name} (held-out)", vlines=bounds)
    series = {name: [h[1] for h in hist] for name, hist in state.history.items()
              if hist and not name.startswith("val/")}
    if series:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, ys in series.items():
            ax.plot(ys, label=name)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "loss_curves.png", dpi=110)
        plt.close(fig)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    return metrics
