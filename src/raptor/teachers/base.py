"""The one teacher contract everything downstream speaks.

A teacher exposes ``embed(images) -> tokens`` (layer 0), its ordered ``blocks``, a ``final_norm``, an optional
classification ``head`` and a ``TokenLayout``; ``trajectory(images, layers=...)`` returns (batch, layers, tokens,
dim). No consumer hard-codes a width, a depth or token indices: they ask the layout.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from raptor.data import EvalTransform
from raptor.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raptor.errors import RaptorError, check_positive


def _takes_mask(block) -> bool:
    """Whether ``block``'s forward takes a second positional argument (an attention mask: CLIP / SigLIP layers
    require one, later transformers 5.x DINOv2 layers accept one, 5.0's take the hidden states alone)."""
    import inspect

    kind = type(block)
    if kind not in _MASK_ARG:
        params = list(inspect.signature(block.forward).parameters.values())[1:]
        _MASK_ARG[kind] = bool(params) and params[0].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                              inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                              inspect.Parameter.VAR_POSITIONAL)
    return _MASK_ARG[kind]


_MASK_ARG: dict[type, bool] = {}


@dataclass(frozen=True)
class TokenLayout:
    """Where each token group lives in a sequence: [cls..., registers..., patches...]."""

    n_cls: int
    n_registers: int
    grid: tuple[int, int]  # patch grid (rows, cols)

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.n_cls + self.n_registers + self.n_patches

    @property
    def cls(self) -> slice:
        return slice(0, self.n_cls)

    @property
    def registers(self) -> slice:
        return slice(self.n_cls, self.n_cls + self.n_registers)

    @property
    def patches(self) -> slice:
        return slice(self.n_cls + self.n_registers, self.n_tokens)

    def group(self, name: str) -> slice:
        """Token slice of a named group: ``cls``, ``registers``, ``patches`` or ``all``."""
        if name == "all":
            return slice(0, self.n_tokens)
        if name in ("cls", "registers", "patches"):
            return getattr(self, name)
        raise RaptorError(f"unknown token group {name!r} (use cls, registers, patches or all)")

    def to_dict(self) -> dict:
        return {"n_cls": self.n_cls, "n_registers": self.n_registers, "n_patches": self.n_patches,
                "grid": list(self.grid), "n_tokens": self.n_tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(int(d["n_cls"]), int(d["n_registers"]), (int(d["grid"][0]), int(d["grid"][1])))


@dataclass(frozen=True)
class Trajectory:
    """What :meth:`Teacher.trace` returns: the residual stream of a batch of images through depth.

    ``tensor`` is (images, len(layers), tokens, dim) float32; ``layers`` are layer numbers (0 = the embedding, l =
    the output of block l); ``layout`` says where each token group sits along the token axis. Group views:
    ``traj.cls``, ``traj.registers``, ``traj.patches`` or ``traj.group(name)``; one layer: ``traj.layer(l)``."""

    tensor: torch.Tensor
    layers: tuple[int, ...]
    layout: TokenLayout
    teacher: str = ""

    def __post_init__(self):
        t = self.tensor
        if t.ndim != 4 or t.shape[1] != len(self.layers) or t.shape[2] != self.layout.n_tokens:
            raise RaptorError(f"trajectory tensor {tuple(t.shape)} does not match {len(self.layers)} layers x "
                              f"{self.layout.n_tokens} tokens")

    def __len__(self) -> int:
        return self.tensor.shape[0]

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def group(self, name: str) -> torch.Tensor:
        """(images, layers, tokens of the group, dim): a view."""
        return self.tensor[:, :, self.layout.group(name)]

    @property
    def cls(self) -> torch.Tensor:
        return self.group("cls")

    @property
    def registers(self) -> torch.Tensor:
        return self.group("registers")

    @property
    def patches(self) -> torch.Tensor:
        return self.group("patches")

    def layer(self, layer: int) -> torch.Tensor:
        """(images, tokens, dim) at layer number ``layer``."""
        if layer not in self.layers:
            raise RaptorError(f"layer {layer} was not traced (traced: {list(self.layers)})")
        return self.tensor[:, self.layers.index(layer)]

    def select(self, layers) -> "Trajectory":
        """The same images at a subset of the traced layers (layer numbers)."""
        layers = tuple(int(x) for x in layers)
        missing = [x for x in layers if x not in self.layers]
        if missing:
            raise RaptorError(f"layers {missing} were not traced (traced: {list(self.layers)})")
        idx = [self.layers.index(x) for x in layers]
        return Trajectory(self.tensor[:, idx], layers, self.layout, self.teacher)

    def __repr__(self) -> str:
        lay = self.layout
        return (f"Trajectory({self.teacher or 'teacher'}: {len(self)} images x layers {list(self.layers)} x "
                f"{lay.n_tokens} tokens ({lay.n_cls} cls, {lay.n_registers} registers, {lay.n_patches} patches) x "
                f"dim {self.tensor.shape[-1]})")


def pool_tokens(normed: torch.Tensor, layout: TokenLayout, pooling: str = "cls+meanpatch") -> torch.Tensor:
    """(batch, T, D) final-normed tokens -> (batch, features): ``cls``, ``meanpatch`` or ``cls+meanpatch``
    (concat of cls and the mean of patch tokens, registers excluded)."""
    mean_patch = normed[:, layout.patches].mean(dim=1)
    if pooling == "meanpatch":
        return mean_patch
    if pooling == "cls":
        return normed[:, 0]
    return torch.cat([normed[:, 0], mean_patch], dim=-1)


class ClassifierHead(nn.Module):
    """A linear classifier over pooled, final-normed tokens.

    ``pooling``: ``cls`` (first cls token), ``cls+meanpatch`` (concat of cls and the mean of patch tokens,
    registers excluded: the official DINOv2 linear head and HF ``Dinov2ForImageClassification``) or ``meanpatch``
    (teachers without a cls token, e.g. SigLIP).
    """

    POOLINGS = ("cls", "cls+meanpatch", "meanpatch")

    def __init__(self, linear: nn.Linear, pooling: str = "cls+meanpatch"):
        super().__init__()
        if pooling not in self.POOLINGS:
            raise RaptorError(f"unknown head pooling {pooling!r}")
        self.linear = linear
        self.pooling = pooling

    @classmethod
    def default_pooling(cls, layout: TokenLayout) -> str:
        return "cls+meanpatch" if layout.n_cls else "meanpatch"

    def pool(self, normed: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return pool_tokens(normed, layout, self.pooling)

    def forward(self, normed: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        return self.linear(self.pool(normed, layout))


_CPU_SPEED: dict = {}  # dtype -> measured slowdown vs fp32
_WARNED: set = set()


def cpu_half_slowdown(dtype: torch.dtype) -> float:
    """How many times slower a bf16/fp16 matmul is than fp32 on this CPU (measured once, ~0.1 s). CPUs without
    native support (no avx512_bf16 / AMX, e.g. many AMD EPYC) emulate it: 22x slower at 512x512, 600x at 2048."""
    if dtype not in _CPU_SPEED:
        import time

        a = torch.randn(512, 512)  # small matmuls can hide the emulation (192: bf16 faster; 512: 22x slower)
        times = {}
        for dt in (torch.float32, dtype):
            x = a.to(dt)
            x @ x
            t0 = time.perf_counter()
            for _ in range(3):
                x @ x
            times[dt] = time.perf_counter() - t0
        _CPU_SPEED[dtype] = times[dtype] / max(times[torch.float32], 1e-9)
    return _CPU_SPEED[dtype]


AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                   "fp16": torch.float16}


def check_autocast(dtype: str | None) -> None:
    """Refuse an unknown ``--autocast`` value up front (before any teacher, data or output is touched)."""
    if dtype not in (None, "float32", "fp32") and dtype not in AUTOCAST_DTYPES:
        raise RaptorError(f"unknown --autocast {dtype!r} (use float32, bfloat16 or float16)")


def autocast_context(dtype: str | None, device: torch.device | str = "cpu"):
    """bf16/fp16 autocast for extraction and training, or a no-op for ``None``/``float32``.

    On a CPU whose half-precision matmul is emulated (> 3x slower than fp32) it warns once and runs float32:
    autocast there only costs time. ``RAPTOR_FORCE_AUTOCAST=1`` insists on autocast anyway."""
    import os
    import warnings

    check_autocast(dtype)
    if dtype in (None, "float32", "fp32"):
        return contextlib.nullcontext()
    table = AUTOCAST_DTYPES
    dev = torch.device(device).type
    if dev == "cpu" and os.environ.get("RAPTOR_FORCE_AUTOCAST") != "1":
        slow = cpu_half_slowdown(table[dtype])
        if slow > 3:
            if dtype not in _WARNED:
                warnings.warn(f"this CPU has no native {dtype} matmul ({slow:.0f}x slower than float32 here): "
                              f"running float32 instead of {dtype} autocast (RAPTOR_FORCE_AUTOCAST=1 to insist)",
                              UserWarning, stacklevel=2)
                _WARNED.add(dtype)
            return contextlib.nullcontext()
    return torch.autocast(device_type=dev, dtype=table[dtype])


class Teacher(nn.Module):
    """A frozen pretrained ViT seen as embed -> blocks -> final norm (-> head).

    Subclasses set ``embeddings``-related behaviour by implementing :meth:`embed` and :meth:`run_block`.
    """

    spec: str = ""
    family: str = ""
    display_name: str = ""

    def __init__(self, *, blocks: Sequence[nn.Module], final_norm: nn.Module, n_cls: int, n_registers: int,
                 patch_size: int, dim: int, image_mean: Sequence[float], image_std: Sequence[float],
                 default_image_size: int, head: ClassifierHead | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.head = head
        self.n_cls = n_cls
        self.n_registers = n_registers
        self.patch_size = patch_size
        self.dim = dim
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.default_image_size = int(default_image_size)

    # ---- contract -------------------------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def n_layers(self) -> int:
        """Number of trajectory layers: embedding (0) plus one per block."""
        return len(self.blocks) + 1

    def layout(self, image_hw: tuple[int, int] | int) -> TokenLayout:
        h, w = (image_hw, image_hw) if isinstance(image_hw, int) else image_hw
        return TokenLayout(self.n_cls, self.n_registers, (h // self.patch_size, w // self.patch_size))

    def image_size(self, size: int | None = None) -> int:
        """The crop size to use (default: the teacher's own), checked against the patch size."""
        size = self.default_image_size if size is None else size
        if size <= 0 or size % self.patch_size:
            raise RaptorError(f"image size {size} is not a positive multiple of the patch size {self.patch_size}")
        return size

    processor_config: dict | None = None  # the HF processor config the teacher came with (``--transform model``)

    def eval_transform(self, size: int | None = None, kind: str = "paper"):
        """The eval transform every command runs images through (``--transform``): ``paper`` (the paper's, at this
        teacher's crop size, mean and std) or ``model`` (the teacher's own processor config, scaled to ``size``
        when one is given; the paper's where the teacher came without one). Its ``size`` is the output side."""
        from raptor.data.transforms import ModelTransform, check_transform

        check_transform(kind)
        if kind == "model" and self.processor_config is not None:
            tf = ModelTransform.from_processor(self.processor_config, self.image_mean, self.image_std)
            tf = tf.at_size(self.image_size(size if size is not None else tf.size))
            return tf
        return EvalTransform.for_size(self.image_size(size), self.image_mean, self.image_std)

    def embed(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def block_kwargs(self, tokens: torch.Tensor) -> dict:
        """Per-forward context the blocks need beside the tokens, as keyword arguments of every block call.

        It must follow from ``tokens`` (and the layout) alone: :meth:`run_blocks` resumes stored trajectories with
        no images at hand. None by default; DINOv3 gives the rotary position embeddings of the patch grid."""
        return {}

    def run_block(self, index: int, tokens: torch.Tensor) -> torch.Tensor:
        """Apply block ``index`` (0-based; its output is layer ``index + 1``)."""
        blk = self.blocks[index]
        kw = self.block_kwargs(tokens)
        # DINOv2 layers of transformers 5.0 take no mask
        out = blk(tokens, None, **kw) if _takes_mask(blk) else blk(tokens, **kw)
        return out[0] if isinstance(out, tuple) else out

    def run_blocks(self, tokens: torch.Tensor, start_layer: int, end_layer: int | None = None) -> torch.Tensor:
        """Advance tokens that are at layer ``start_layer`` to layer ``end_layer`` (default: last)."""
        end = self.depth if end_layer is None else end_layer
        if not 0 <= start_layer <= end <= self.depth:
            raise RaptorError(f"bad layer range {start_layer}..{end} for a depth-{self.depth} teacher")
        for i in range(start_layer, end):
            tokens = self.run_block(i, tokens)
        return tokens

    def classify(self, last_tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Final norm + head on layer-L tokens."""
        if self.head is None:
            raise RaptorError(f"teacher {self.spec} has no classification head (pass --head for DINOv2 .pth)")
        return self.head(self.final_norm(last_tokens), layout)

    def resolve_layers(self, layers: Iterable[int] | None) -> list[int]:
        if layers is None:
            return list(range(self.n_layers))
        out = sorted(set(int(x) for x in layers))
        if not out or out[0] < 0 or out[-1] > self.depth:
            raise RaptorError(f"layers must lie in 0..{self.depth} for this teacher, got {list(layers)}")
        return out

    @torch.no_grad()  # not inference_mode: trajectories feed surrogate training as targets
    def trajectory(self, images: torch.Tensor, layers: Iterable[int] | None = None,
                   autocast: str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """(batch, len(layers), tokens, dim) for the requested layers (default 0..L), in float32.

        Blocks past the deepest requested layer are not run. Each layer is copied into one preallocated output
        (pass ``out`` to reuse a buffer across calls): holding per-layer tensors and stacking them costs ~8 % of
        the forward time on CPU through allocator churn.
        """
        want = self.resolve_layers(layers)
        pos = {layer: k for k, layer in enumerate(want)}
        with autocast_context(autocast, images.device):
            x = self.embed(images)
            shape = (x.shape[0], len(want), x.shape[1], x.shape[2])
            if out is None or tuple(out.shape) != shape:
                out = torch.empty(shape, dtype=torch.float32, device=x.device)
            if 0 in pos:
                out[:, pos[0]].copy_(x)
            for i in range(want[-1]):
                x = self.run_block(i, x)
                if i + 1 in pos:
                    out[:, pos[i + 1]].copy_(x)
        return out

    def trace(self, images, layers="all", groups=("cls", "registers", "patches"), *, image_size: int | None = None,
              batch_size: int = 32, autocast: str | None = None) -> Trajectory:
        """The trajectory of ``images`` through this teacher, for a notebook.

        ``images``: PIL images, image file paths, or a float tensor (B, 3, H, W) (or one (3, H, W)) already
        normalised; images and paths get the paper's eval transform at ``image_size`` (default: the teacher's).
        ``layers``: ``"all"`` (0..L) or layer numbers. ``groups``: the token groups kept, in layout order. Runs on
        the teacher's device in batches of ``batch_size``; the result is float32 on that device."""
        if isinstance(layers, str) and layers != "all":
            raise RaptorError(f"layers must be 'all' or layer numbers, got {layers!r}")
        check_positive(batch_size=batch_size)
        want = self.resolve_layers(None if isinstance(layers, str) else [layers] if isinstance(layers, int) else layers)
        x = self._as_tensor(images, image_size)
        layout = self.layout(tuple(x.shape[-2:]))
        groups = (groups,) if isinstance(groups, str) else tuple(groups)
        for g in groups:
            if g not in ("cls", "registers", "patches"):
                raise RaptorError(f"unknown token group {g!r} (use cls, registers, patches)")
        keep = [g for g in ("cls", "registers", "patches") if g in groups]
        index = torch.cat([torch.arange(layout.n_tokens)[layout.group(g)] for g in keep]) if keep else None
        if index is None:
            raise RaptorError("groups must name at least one of cls, registers, patches")
        param = next(self.parameters(), torch.empty(0))  # the teacher's device and (floating) dtype
        parts = []
        for i in range(0, x.shape[0], batch_size):
            t = self.trajectory(x[i:i + batch_size].to(param.device, param.dtype), want, autocast=autocast)
            parts.append(t if len(index) == layout.n_tokens else t[:, :, index.to(t.device)])
        kept = TokenLayout(layout.n_cls if "cls" in keep else 0, layout.n_registers if "registers" in keep else 0,
                           layout.grid if "patches" in keep else (0, 0))
        return Trajectory(torch.cat(parts), tuple(want), kept, self.spec or self.display_name)

    def _as_tensor(self, images, image_size: int | None) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            x = images.unsqueeze(0) if images.ndim == 3 else images
            if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
                raise RaptorError(f"image tensors must be float (B, 3, H, W) or (3, H, W), got {tuple(images.shape)} "
                                  f"{images.dtype}")
            for side in x.shape[-2:]:
                if side % self.patch_size:
                    raise RaptorError(f"image side {side} is not a multiple of the patch size {self.patch_size}")
            return x.float()
        from PIL import Image

        items = [images] if isinstance(images, (str, Path, Image.Image)) else list(images)
        if not items:
            raise RaptorError("no images given")
        tf = self.eval_transform(image_size)
        out = []
        for it in items:
            if isinstance(it, Image.Image):
                out.append(tf(it))
                continue
            if not isinstance(it, (str, Path)):
                raise RaptorError(f"images must be PIL images, paths or one tensor, got {type(it).__name__}")
            try:
                with Image.open(it) as im:
                    out.append(tf(im))
            except (OSError, ValueError) as e:
                raise RaptorError(f"cannot read image {it}: {type(e).__name__}: {str(e)[:120]}") from None
        return torch.stack(out)

    def describe(self) -> dict:
        return {"spec": self.spec, "family": self.family, "name": self.display_name, "depth": self.depth,
                "dim": self.dim, "patch_size": self.patch_size, "n_cls": self.n_cls,
                "n_registers": self.n_registers, "has_head": self.head is not None,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "default_image_size": self.default_image_size}

    @classmethod
    def from_modules(cls, embed, blocks: Sequence[nn.Module], final_norm: nn.Module, *, n_cls: int,
                     n_registers: int, patch_size: int, dim: int | None = None,
                     image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                     default_image_size: int = 224, head: ClassifierHead | None = None,
                     name: str = "custom") -> "Teacher":
        """One's own ViT as a teacher: ``embed`` (normalised images (B, 3, H, W) -> tokens (B, T, D) ordered
        [cls..., registers..., patches...]), its ``blocks`` ((B, T, D) -> (B, T, D)) and ``final_norm``; ``dim``
        defaults to ``final_norm.normalized_shape`` or the width of one embedding, mean/std to ImageNet's. Returns
        a :class:`raptor.teachers.modules.ModuleTeacher`."""
        from raptor.teachers.modules import ModuleTeacher

        return ModuleTeacher(embed, blocks, final_norm, n_cls=n_cls, n_registers=n_registers, patch_size=patch_size,
                             dim=dim, image_mean=image_mean, image_std=image_std,
                             default_image_size=default_image_size, head=head, name=name)
