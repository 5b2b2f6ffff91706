"""Evaluation of a fitted surrogate against its teacher on held-out images, with the baselines that give the
numbers meaning.

Layer fit (:func:`validate`), every score on whole held-out images:

- ``autoregressive``: the full surrogate rolled out from the teacher's layer 0 (the paper's AR setting);
- ``per_block_from_teacher``: each block rolled over each run of its layers (its whole phase when the phases are
  contiguous) from the teacher's layer before the run;
- baselines (``baselines``): ``identity`` (layer l predicted by the teacher's layer l-1: teacher forced),
  ``position_mean`` (each token by its training-set mean at that layer and position), ``copy_layer0`` (every
  layer predicted by layer 0: the autoregressive "do nothing"), ``ridge_teacher_forced`` (a per-layer ridge
  regression l-1 -> l on tokens, fitted on the training set) and ``ridge_autoregressive`` (those maps chained from
  layer 0);
- ``image_level``: R^2 across images of the pooled [cls || mean patch] features after the final norm at layer L,
  and the share of the teacher's between-image variance the prediction keeps.

Probes (:func:`probe_evaluation`), for the teacher, the full surrogate and each splice (teacher 0..i, surrogate
i..j, teacher j..L): a **fresh** logistic-regression probe fitted on each backbone's own [cls || mean patch]
features of labelled training images (the paper's Table-1 protocol: every backbone gets its own probe), accuracy on
held-out images and "% of teacher"; beside it the **teacher probe** (fitted on the teacher's features) applied to
each backbone: its accuracy and top-1 agreement with the teacher (harsher: the features must line up exactly).
"""

from __future__ import annotations

import numpy as np
import torch

from raptor.progress import progress_bar
from raptor.surrogate.metrics import LayerFitAccumulator, image_r2
from raptor.surrogate.stats import ridge_predict
from raptor.teachers.base import ClassifierHead, pool_tokens


def _pool(teacher, tokens: torch.Tensor, layout) -> torch.Tensor:
    """[cls || mean patch] (mean patch for cls-less teachers) after the teacher's final norm."""
    return pool_tokens(teacher.final_norm(tokens), layout, ClassifierHead.default_pooling(layout))


@torch.no_grad()
def validate(model, teacher, val_traj: torch.Tensor, layout, stats=None, baselines: bool = True,
             batch: int = 8, progress: bool = False, groups=None) -> dict:
    """Per-layer fit on held-out trajectories ``val_traj`` (images, 0..L, T, D); see the module doc. ``groups``:
    the photo of each row when the rows are several views of fewer photos (CIs resample photos)."""
    with progress_bar(len(val_traj), "validation (held-out R²)", "img", enabled=progress) as bar:
        return _validate(model, teacher, val_traj, layout, stats, baselines, batch, bar, groups)


def _validate(model, teacher, val_traj, layout, stats, baselines: bool, batch: int, bar, groups=None) -> dict:
    L, D = model.depth, val_traj.shape[-1]
    accs = {"autoregressive": LayerFitAccumulator(L, D, layout, groups),
            "per_block_from_teacher": LayerFitAccumulator(L, D, layout, groups)}
    if baselines:
        names = ["identity", "copy_layer0"]
        if stats is not None:
            names.append("position_mean")
            if stats.ridge is not None:
                names += ["ridge_teacher_forced", "ridge_autoregressive"]
        base = {n: LayerFitAccumulator(L, D, layout, groups) for n in names}
    pooled = {"teacher": [], "autoregressive": [], "identity": [], "ridge_autoregressive": []}
    # the image-blind reference of the image-specific R^2: each token's training-set mean at its layer and position
    blind = stats.position_mean[1:].unsqueeze(0) if stats is not None else None
    for s in range(0, len(val_traj), batch):
        tr = val_traj[s:s + batch]
        target = tr[:, 1:]
        pred = torch.stack(model(tr[:, 0], 0, L), dim=1)
        accs["autoregressive"].update(pred, target, blind)
        seg = torch.cat([torch.stack(model(tr[:, a], a, b), dim=1) for a, b, _ in model.cfg.runs], dim=1)
        accs["per_block_from_teacher"].update(seg, target, blind)
        pooled["teacher"].append(_pool(teacher, tr[:, L], layout))
        pooled["autoregressive"].append(_pool(teacher, pred[:, -1], layout))
        if not baselines:
            bar.advance(len(tr))
            continue
        base["identity"].update(tr[:, :-1], target, blind)
        base["copy_layer0"].update(tr[:, :1].expand_as(target), target, blind)
        pooled["identity"].append(_pool(teacher, tr[:, L - 1], layout))
        if stats is not None:
            base["position_mean"].update(blind.expand_as(target), target, blind)
            if stats.ridge is not None:
                base["ridge_teacher_forced"].update(
                    torch.stack([ridge_predict(stats.ridge, tr[:, i - 1], i) for i in range(1, L + 1)], 1), target,
                    blind)
                x, outs = tr[:, 0], []
                for i in range(1, L + 1):
                    x = ridge_predict(stats.ridge, x, i)
                    outs.append(x)
                base["ridge_autoregressive"].update(torch.stack(outs, 1), target, blind)
                pooled["ridge_autoregressive"].append(_pool(teacher, outs[-1], layout))
        bar.advance(len(tr))
    out = {"layers": list(range(1, L + 1)), "n_images": len(val_traj)}
    out.update({k: a.result() for k, a in accs.items()})
    t_pool = torch.cat(pooled["teacher"])
    out["image_level"] = {"features": "[cls || mean patch] after the final norm, layer %d" % L,
                          "autoregressive": image_r2(torch.cat(pooled["autoregressive"]), t_pool)}
    if baselines:
        out["baselines"] = {k: a.result() for k, a in base.items()}
        for k in ("identity", "ridge_autoregressive"):
            if pooled[k]:
                out["image_level"][k] = image_r2(torch.cat(pooled[k]), t_pool)
    return out


@torch.no_grad()
def backbone_features(model, teacher, x0: torch.Tensor, layout, variants: dict, batch: int = 32,
                      progress: bool = True) -> dict:
    """Pooled features of each backbone variant {name: (i, j)} from layer-0 tokens x0 (teacher: (0, 0))."""
    feats = {k: [] for k in variants}
    with progress_bar(len(x0) * len(variants), "probe features", "img", enabled=progress) as bar:
        for s in range(0, len(x0), batch):
            xb = x0[s:s + batch]
            for k, (i, j) in variants.items():
                feats[k].append(_pool(teacher, model.splice(teacher, xb, i, j, from_images=False), layout))
                bar.advance(len(xb))
    return {k: torch.cat(v).numpy() for k, v in feats.items()}


def splice_variants(model) -> dict:
    v = {"teacher": (0, 0), f"full (0-{model.depth})": (0, model.depth)}
    for s, e, b in model.cfg.runs:  # one splice per run: per block when the phases are contiguous
        v[f"block{b} ({s}-{e})"] = (s, e)
    return v


def _logreg(f_tr, y_tr, seed: int = 0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0, random_state=seed)).fit(f_tr,
                                                                                                            y_tr)


def probe_evaluation(model, teacher, layout, x0_train: torch.Tensor, y_train: np.ndarray, x0_test: torch.Tensor,
                     y_test: np.ndarray, data: str, progress: bool = True) -> dict:
    """Fresh probe per backbone + the teacher's probe applied to every backbone (module doc)."""
    variants = splice_variants(model)
    f_tr = backbone_features(model, teacher, x0_train, layout, variants, progress=progress)
    f_te = backbone_features(model, teacher, x0_test, layout, variants, progress=progress)

    with progress_bar(len(variants) + 1, "probe fits", "probe", enabled=progress) as bar:
        teacher_probe = _logreg(f_tr["teacher"], y_train)
        bar.advance(1)
        t_pred = teacher_probe.predict(f_te["teacher"])
        res = {"data": data, "n_train": int(len(y_train)), "n_test": int(len(y_test)),
               "classifier": "logistic regression (C=1, standardised [cls || mean patch] after the final norm)",
               "backbones": {}}
        t_acc = None
        for k, (i, j) in variants.items():
            fresh = _logreg(f_tr[k], y_train).predict(f_te[k])
            bar.advance(1)
            acc = float((fresh == y_test).mean())
            if k == "teacher":
                t_acc = acc
            tp = teacher_probe.predict(f_te[k])
            res["backbones"][k] = {"surrogate_layers": [i, j], "fresh_probe_accuracy": acc,
                                   "pct_of_teacher": 100 * acc / t_acc if t_acc else None,
                                   "teacher_probe_accuracy": float((tp == y_test).mean()),
                                   "teacher_probe_agreement": float((tp == t_pred).mean())}
    res["teacher_accuracy"] = t_acc
    return res


@torch.no_grad()
def head_agreement(model, teacher, x0: torch.Tensor, layout, y: torch.Tensor | None = None) -> dict:
    """Top-1 agreement with the teacher under the teacher's own classification head, per splice."""
    variants = splice_variants(model)
    logits = {k: [] for k in variants}
    for s in range(0, len(x0), 16):
        for k, (i, j) in variants.items():
            logits[k].append(teacher.classify(model.splice(teacher, x0[s:s + 16], i, j, from_images=False), layout))
    t = torch.cat(logits["teacher"]).argmax(1)
    res = {"n_images": len(x0)}
    for k, v in logits.items():
        p = torch.cat(v).argmax(1)
        res[k] = {"agreement": float((p == t).float().mean()),
                  "accuracy": float((p == y).float().mean()) if y is not None else None}
    return res
