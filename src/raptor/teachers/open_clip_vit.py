"""open_clip ViT image towers behind the teacher contract (``open_clip:<arch>[:<weights>]``).

The adapter reads open_clip's ``VisionTransformer`` parts: ``conv1`` (patchify), ``class_embedding`` (D,),
``positional_embedding`` (1 + N, D), ``patch_dropout``, ``ln_pre``, ``transformer.resblocks`` and ``ln_post``
(the final norm; ``proj``, the CLIP projection, is not part of the trajectory). Layer 0 is the output of
``ln_pre``, layer l the output of residual block l. Blocks whose attention is not batch-first (``nn.MultiheadAttention``
with ``batch_first=False``, older open_clip and OpenAI CLIP) get (tokens, batch, dim) inputs, as open_clip's own
``Transformer`` gives them. Other image sizes resample the patch-grid position embeddings bicubically (as open_clip's
``resize_pos_embed``). Towers built on a timm trunk (``visual.trunk``) are read by the timm adapter.

:class:`OpenClipTeacher` takes a built module (tests build an open_clip-shaped clone); only
:func:`load_open_clip_teacher` imports open_clip.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from raptor.errors import RaptorError
from raptor.teachers.base import Teacher
from raptor.teachers.dinov2_pth import load_state_file
from raptor.teachers.hf import CLIP_MEAN, CLIP_STD
from raptor.teachers.modules import resample_pos_embed, square_grid

_NEEDS = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post")


def _batch_first(block: nn.Module, transformer: nn.Module) -> bool:
    attn = getattr(block, "attn", None)
    if attn is not None and hasattr(attn, "batch_first"):
        return bool(attn.batch_first)
    return bool(getattr(transformer, "batch_first", True))


class OpenClipTeacher(Teacher):
    """A teacher backed by an open_clip ``VisionTransformer`` (``model.visual``)."""

    family = "open_clip"

    def __init__(self, visual: nn.Module, *, spec: str = "", name: str = "", image_mean=None, image_std=None):
        missing = [a for a in _NEEDS if not hasattr(visual, a)]
        if missing or not hasattr(visual.transformer, "resblocks"):
            raise RaptorError(f"{type(visual).__name__} is not an open_clip VisionTransformer (no "
                              f"{', '.join(missing) or 'transformer.resblocks'})")
        if getattr(visual, "attn_pool", None) is not None:
            raise RaptorError("open_clip towers with attentional pooling (CoCa) are not supported: their ln_post "
                              "normalises the pooled queries, not the tokens")
        conv = visual.conv1
        kh, kw = conv.kernel_size
        if kh != kw or tuple(conv.stride) != (kh, kw):
            raise RaptorError(f"open_clip conv1 is not a square patchify ({kh}x{kw}, stride {tuple(conv.stride)})")
        n_pos = int(visual.positional_embedding.shape[-2])
        grid = getattr(visual, "grid_size", None)
        self._grid = tuple(int(v) for v in grid) if grid else square_grid(n_pos - 1, "open_clip positional_embedding")
        if self._grid[0] * self._grid[1] + 1 != n_pos:
            raise RaptorError(f"open_clip positional_embedding has {n_pos} rows for a {self._grid} grid + cls")
        blocks = list(visual.transformer.resblocks)
        if not blocks:
            raise RaptorError("the open_clip tower has no residual blocks")
        super().__init__(blocks=blocks, final_norm=visual.ln_post, n_cls=1, n_registers=0, patch_size=kh,
                         dim=int(conv.out_channels),
                         image_mean=image_mean or getattr(visual, "image_mean", None) or CLIP_MEAN,
                         image_std=image_std or getattr(visual, "image_std", None) or CLIP_STD,
                         default_image_size=self._grid[0] * kh)
        self.visual = visual
        self._batch_first = [_batch_first(b, visual.transformer) for b in blocks]
        self.spec = spec
        self.display_name = name or spec or "open_clip ViT"
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images)  # (B, D, rows, cols)
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls_tok = v.class_embedding.reshape(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        pos = resample_pos_embed(v.positional_embedding.reshape(1, -1, x.shape[-1]), self._grid, grid, 1,
                                 antialias=False)
        x = torch.cat([cls_tok, x], dim=1) + pos.to(x.dtype)
        drop = getattr(v, "patch_dropout", None)
        if drop is not None:
            x = drop(x)
        return v.ln_pre(x)

    def run_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        if self._batch_first[index]:
            return self.blocks[index](tokens)
        return self.blocks[index](tokens.transpose(0, 1).contiguous()).transpose(0, 1)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors (:func:`load_state_file`: safetensors, or torch.load with weights_only=True), without
    a DataParallel ``module.`` prefix."""
    sd = load_state_file(path)
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_open_clip_teacher(target: str, spec: str) -> Teacher:
    """``open_clip:<arch>`` (random weights, warned), ``open_clip:<arch>:<weights file>`` (safetensors, or a torch
    checkpoint read with weights_only=True; a whole CLIP or its visual tower) or ``open_clip:<arch>:<pretrained
    tag>`` (open_clip's own download)."""
    arch, _, weights = target.partition(":")
    try:
        import open_clip
    except Exception as e:  # noqa: BLE001
        why = str(e).splitlines()[0][:160] if str(e) else ""
        raise RaptorError(f"open_clip is not importable here: {type(e).__name__}: {why} (pip install open_clip_torch)"
                          ) from None
    path = Path(weights).expanduser() if weights else None
    is_file = path is not None and (path.is_file() or "/" in weights or path.suffix in (".safetensors", ".bin", ".pt",
                                                                                         ".pth"))
    if is_file and not path.is_file():
        raise RaptorError(f"open_clip weights file not found: {weights}")
    try:
        model = open_clip.create_model(arch, pretrained=None if is_file or not weights else weights)
    except Exception as e:  # noqa: BLE001
        raise RaptorError(f"cannot build open_clip model {target!r}: "
                          f"{str(e).splitlines()[0][:200] if str(e) else e!r}") from None
    visual = model.visual
    if is_file:
        sd = _read_state_dict(path)
        if any(k.startswith("visual.") for k in sd):
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        try:
            visual.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise RaptorError(f"{path} does not fit open_clip {arch}'s image tower: "
                              f"{str(e).splitlines()[1][:200] if len(str(e).splitlines()) > 1 else e}") from None
    elif not weights:
        warnings.warn(f"open_clip:{arch} without weights is randomly initialised (give open_clip:{arch}:<weights>)",
                      UserWarning, stacklevel=2)
    visual = visual.float().eval()
    if hasattr(visual, "trunk"):  # a timm trunk (ViT-*-SigLIP, ...): the timm adapter reads it
        from raptor.teachers.timm_vit import TimmTeacher

        return TimmTeacher(visual.trunk, spec=spec, name=target, image_mean=getattr(visual, "image_mean", None),
                           image_std=getattr(visual, "image_std", None))
    return OpenClipTeacher(visual, spec=spec, name=target)
