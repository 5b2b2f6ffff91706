"""Any ViT as a teacher: one's own embedding, blocks and final norm behind the teacher contract.

``Teacher.from_modules(embed, blocks, final_norm, n_cls=..., n_registers=..., patch_size=...)`` wraps a model that
is not one of the loadable kinds. ``embed`` maps normalised images (B, 3, H, W) to tokens (B, T, D) ordered
[cls..., registers..., patches...]; each block maps (B, T, D) to (B, T, D) (a tuple output counts by its first
element); ``final_norm`` is the norm the model applies after its last block. The token count is checked against
the layout at every embedding, so a wrong ``n_cls``, ``n_registers`` or ``patch_size`` fails on the first image.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raptor.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raptor.errors import RaptorError
from raptor.teachers.base import ClassifierHead, Teacher


def _count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RaptorError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class ModuleTeacher(Teacher):
    """A teacher made of modules one passes in (see :meth:`Teacher.from_modules`).

    An ``embed`` that is an ``nn.Module`` is registered (``.to(device)`` moves it); a plain callable (a lambda, a
    bound method) is called as is, so its parameters move only with the model it belongs to.
    """

    family = "module"

    def __init__(self, embed: Callable[[torch.Tensor], torch.Tensor], blocks: Sequence[nn.Module],
                 final_norm: nn.Module, *, n_cls: int, n_registers: int, patch_size: int, dim: int | None = None,
                 image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                 default_image_size: int = 224, head: ClassifierHead | None = None, name: str = "custom"):
        if not callable(embed):
            raise RaptorError(f"embed must be a module or a callable images -> tokens, got {type(embed).__name__}")
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise RaptorError("blocks must be a sequence of modules (a list, nn.ModuleList or nn.Sequential), "
                              f"got one {type(blocks).__name__}")
        blocks = list(blocks)
        if not blocks:
            raise RaptorError("blocks is empty: a ViT teacher needs at least one block")
        for i, blk in enumerate(blocks):
            if not isinstance(blk, nn.Module):
                raise RaptorError(f"block {i} is a {type(blk).__name__}, not a torch.nn.Module")
        if not isinstance(final_norm, nn.Module):
            raise RaptorError(f"final_norm must be a torch.nn.Module (nn.Identity() for none), got "
                              f"{type(final_norm).__name__}")
        if head is not None and not isinstance(head, ClassifierHead):
            raise RaptorError("head must be a raptor.teachers.base.ClassifierHead (a Linear and its pooling)")
        _count("n_cls", n_cls, 0)
        _count("n_registers", n_registers, 0)
        _count("patch_size", patch_size, 1)
        _count("default_image_size", default_image_size, 1)
        for label, v in (("image_mean", image_mean), ("image_std", image_std)):
            if len(tuple(v)) != 3:
                raise RaptorError(f"{label} needs 3 values (one per RGB channel), got {tuple(v)}")
        if dim is None:
            shape = getattr(final_norm, "normalized_shape", None)
            dim = int(shape[-1]) if shape else None
        super().__init__(blocks=blocks, final_norm=final_norm, n_cls=n_cls, n_registers=n_registers,
                         patch_size=patch_size, dim=dim or 0, image_mean=image_mean, image_std=image_std,
                         default_image_size=default_image_size, head=head)
        self.image_size(default_image_size)  # a multiple of the patch size
        if isinstance(embed, nn.Module):
            self.embedding = embed
        self._embed = embed
        self.spec = f"module:{name}"
        self.display_name = name
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        if dim is None:  # nothing says the width: one embedding of a blank image does
            with torch.no_grad():
                size = self.default_image_size
                probe = self.embed(torch.zeros(1, 3, size, size, device=self._device()), check_dim=False)
            self.dim = int(probe.shape[-1])
        else:
            self.dim = _count("dim", dim, 1)

    def _device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def embed(self, images: torch.Tensor, check_dim: bool = True) -> torch.Tensor:
        x = self._embed(images)
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise RaptorError(f"embed must return tokens of shape (batch, tokens, dim), got {got}")
        lay = self.layout(tuple(images.shape[-2:]))
        if x.shape[0] != images.shape[0] or x.shape[1] != lay.n_tokens:
            raise RaptorError(
                f"embed returned {x.shape[1]} tokens for {images.shape[0]} image(s) of {images.shape[-2]}x"
                f"{images.shape[-1]} px, but the layout expects {lay.n_tokens} (n_cls {self.n_cls} + n_registers "
                f"{self.n_registers} + {lay.grid[0]}x{lay.grid[1]} patches of {self.patch_size} px): check n_cls, "
                "n_registers and patch_size")
        if check_dim and x.shape[2] != self.dim:
            raise RaptorError(f"embed returned tokens of width {x.shape[2]}, but dim is {self.dim}")
        return x


def resample_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], n_prefix: int,
                       *, antialias: bool) -> torch.Tensor:
    """(1, n_prefix + old rows*cols, D) position embeddings at another patch grid: the prefix rows (cls, ...) kept,
    the grid resampled bicubically in float32 (as timm's ``resample_abs_pos_embed``, antialiased, and open_clip's /
    HF CLIP's resize without antialiasing)."""
    old_grid, new_grid = tuple(int(v) for v in old_grid), tuple(int(v) for v in new_grid)
    if pos.shape[1] != n_prefix + old_grid[0] * old_grid[1]:
        raise RaptorError(f"{pos.shape[1]} position embeddings do not cover {n_prefix} prefix tokens and a "
                          f"{old_grid[0]}x{old_grid[1]} patch grid")
    if old_grid == new_grid:
        return pos
    prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
    d = grid.shape[-1]
    g = grid.float().reshape(1, old_grid[0], old_grid[1], d).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=new_grid, mode="bicubic", antialias=antialias, align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, -1, d).to(pos.dtype)
    return torch.cat([prefix, g], dim=1)


def square_grid(n: int, what: str) -> tuple[int, int]:
    side = int(round(n ** 0.5))
    if side * side != n:
        raise RaptorError(f"{what}: {n} patch position embeddings are not a square grid")
    return side, side
