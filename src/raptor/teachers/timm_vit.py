"""timm ``VisionTransformer``-shaped models behind the teacher contract (``timm:<model name or dir>``).

The adapter reads the module's own parts (``patch_embed``, ``cls_token``, ``reg_token``, ``pos_embed``,
``no_embed_class``, ``pos_drop``, ``patch_drop``, ``norm_pre``, ``blocks``, ``norm``) and embeds as timm's
``_pos_embed`` does: prefix tokens [cls, registers] are concatenated before the position embedding is added when it
covers them, after when ``no_embed_class`` (the embedding covers patches only). Layer 0 is the output of
``norm_pre``, layer l the output of block l: ``forward_intermediates(norm=False)``. Other image sizes resample the
patch-grid position embeddings bicubically (antialiased, as timm's ``resample_abs_pos_embed``).

:class:`TimmTeacher` takes a built module (tests build a timm-shaped clone without timm); only
:func:`load_timm_teacher` imports timm.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from raptor.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raptor.errors import RaptorError
from raptor.teachers.base import ClassifierHead, Teacher
from raptor.teachers.modules import resample_pos_embed, square_grid

_NEEDS = ("patch_embed", "blocks", "norm")


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class TimmTeacher(Teacher):
    """A teacher backed by a timm ``VisionTransformer`` (or any module with its attribute structure)."""

    family = "timm"

    def __init__(self, model: nn.Module, *, spec: str = "", name: str = "", image_mean=None, image_std=None):
        missing = [a for a in _NEEDS if not hasattr(model, a)]
        if missing:
            raise RaptorError(f"{type(model).__name__} is not a timm VisionTransformer-shaped model (no "
                              f"{', '.join(missing)}): the timm: kind takes plain ViTs (patch_embed, blocks, norm)")
        if getattr(model, "dist_token", None) is not None:
            raise RaptorError("timm distilled ViTs (a dist_token) are not supported; use hf: for DeiT")
        pe = model.patch_embed
        if not hasattr(pe, "patch_size"):
            raise RaptorError("the timm model's patch_embed has no patch_size")
        ph, pw = _pair(pe.patch_size)
        if ph != pw:
            raise RaptorError(f"non-square patches ({ph}x{pw}) are not supported")
        cls_tok, reg_tok = getattr(model, "cls_token", None), getattr(model, "reg_token", None)
        n_cls = 0 if cls_tok is None else int(cls_tok.shape[1])
        n_reg = 0 if reg_tok is None else int(reg_tok.shape[1])
        dim = getattr(model, "embed_dim", None)
        if not dim and getattr(model.norm, "normalized_shape", None):
            dim = int(model.norm.normalized_shape[-1])
        if not dim:
            raise RaptorError("cannot tell the width of the timm model (no embed_dim)")
        cfg = getattr(model, "pretrained_cfg", None) or {}
        img = getattr(pe, "img_size", None)
        size = _pair(img)[0] if img is not None else int((cfg.get("input_size") or (3, 224, 224))[-1])
        blocks = list(model.blocks)
        if not blocks:
            raise RaptorError("the timm model has no blocks")
        self._grid = tuple(int(v) for v in pe.grid_size) if getattr(pe, "grid_size", None) else None
        super().__init__(blocks=blocks, final_norm=model.norm, n_cls=n_cls, n_registers=n_reg, patch_size=ph,
                         dim=int(dim), image_mean=image_mean or cfg.get("mean") or IMAGENET_MEAN,
                         image_std=image_std or cfg.get("std") or IMAGENET_STD, default_image_size=size,
                         head=None)
        self.model = model
        self.head = _timm_head(model, n_cls)
        self.spec = spec
        self.display_name = name or spec or type(model).__name__
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    # ---- embedding: timm's patch_embed -> _pos_embed -> patch_drop -> norm_pre ---------------------------------
    def _patchify(self, images: torch.Tensor) -> torch.Tensor:
        pe = self.model.patch_embed
        img = getattr(pe, "img_size", None)
        if img is None or not getattr(pe, "strict_img_size", False) or _pair(img) == tuple(images.shape[-2:]):
            return pe(images)
        # the module only takes its own size: the same patchify (proj, flatten, norm) at this size
        proj = getattr(pe, "proj", None)
        if not isinstance(proj, nn.Conv2d) or not getattr(pe, "flatten", True):
            raise RaptorError(f"this timm model takes {_pair(img)[0]} px images only (--image-size "
                              f"{_pair(img)[0]})")
        x = proj(images).flatten(2).transpose(1, 2)
        norm = getattr(pe, "norm", None)
        return norm(x) if norm is not None else x

    def _pos(self, grid: tuple[int, int], n_prefix: int) -> torch.Tensor:
        pos = self.model.pos_embed
        old = self._grid or square_grid(pos.shape[1] - n_prefix, "timm pos_embed")
        return resample_pos_embed(pos, old, grid, n_prefix, antialias=True)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = self._patchify(images)
        if x.ndim == 4:  # dynamic_img_size models give NHWC patches
            grid = (int(x.shape[1]), int(x.shape[2]))
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        else:
            grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        prefix = [t.expand(x.shape[0], -1, -1).to(x.dtype) for t in (getattr(m, "cls_token", None),
                                                                      getattr(m, "reg_token", None)) if t is not None]
        if getattr(m, "pos_embed", None) is None:
            x = torch.cat(prefix + [x], dim=1)
        elif getattr(m, "no_embed_class", False):  # the embedding covers the patches only: add, then prefix
            x = torch.cat(prefix + [x + self._pos(grid, 0)], dim=1)
        else:  # the embedding covers the prefix tokens too: prefix, then add
            x = torch.cat(prefix + [x], dim=1) + self._pos(grid, self.n_cls + self.n_registers)
        for part in ("pos_drop", "patch_drop", "norm_pre"):
            mod = getattr(m, part, None)
            if mod is not None:
                x = mod(x)
        return x


def _timm_head(model: nn.Module, n_cls: int) -> ClassifierHead | None:
    """timm's classifier as a teacher head when it is a Linear on the final-normed tokens, pooled by the cls token
    (``global_pool='token'``) or the mean of patch tokens (``'avg'``, prefix tokens excluded); else none."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Linear) or getattr(model, "attn_pool", None) is not None:
        return None
    if not isinstance(getattr(model, "fc_norm", nn.Identity()), nn.Identity):
        return None
    pooling = {"token": "cls", "avg": "meanpatch"}.get(getattr(model, "global_pool", None))
    if pooling is None or (pooling == "cls" and not n_cls) or getattr(model, "pool_include_prefix", False):
        return None
    return ClassifierHead(head, pooling)


def load_timm_teacher(target: str, spec: str) -> TimmTeacher:
    """``timm:<model name>`` (timm's pretrained weights: online or from the HF cache) or ``timm:<dir>`` (a local
    folder as the HF hub holds one: config.json and model.safetensors)."""
    try:
        import timm
    except Exception as e:  # noqa: BLE001 - an absent or broken install reads the same: one line
        why = str(e).splitlines()[0][:160] if str(e) else ""
        raise RaptorError(f"timm is not importable here: {type(e).__name__}: {why} (pip install timm)") from None
    path = Path(target).expanduser()
    name = f"local-dir:{path}" if path.is_dir() else target
    if not path.is_dir() and (path.exists() or target.startswith(("/", ".", "~"))):
        raise RaptorError(f"timm model folder not found: {target} (need a folder with config.json, or a model name)")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as e:  # noqa: BLE001
        raise RaptorError(f"cannot build timm model {target!r}: {str(e).splitlines()[0][:200] if str(e) else e!r}") \
            from None
    return TimmTeacher(model.float().eval(), spec=spec, name=target)
