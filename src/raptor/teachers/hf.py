"""HF transformers vision backbones behind the teacher contract.

We wrap the original HF modules (embeddings, encoder layers, final norm) rather than re-implement them, so the
trajectory equals the model's own ``output_hidden_states`` (tested per family).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from raptor.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raptor.errors import RaptorError
from raptor.teachers.base import ClassifierHead, Teacher

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)

# model_type -> (family, default mean, default std)
FAMILIES = {
    "dinov2": ("dinov2", IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_with_registers": ("dinov2_with_registers", IMAGENET_MEAN, IMAGENET_STD),
    "vit": ("vit", HALF, HALF),
    "deit": ("deit", IMAGENET_MEAN, IMAGENET_STD),
    "clip": ("clip", CLIP_MEAN, CLIP_STD),
    "clip_vision_model": ("clip", CLIP_MEAN, CLIP_STD),
    "siglip": ("siglip", HALF, HALF),
    "siglip_vision_model": ("siglip", HALF, HALF),
    "dinov3_vit": ("dinov3", IMAGENET_MEAN, IMAGENET_STD),
}
# family -> the transformers class of its bare model
MODEL_CLASSES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel", "vit": "ViTModel",
                 "deit": "DeiTModel", "clip": "CLIPVisionModel", "siglip": "SiglipVisionModel",
                 "dinov3": "DINOv3ViTModel"}


class HFTeacher(Teacher):
    """A teacher backed by an HF vision model (Dinov2, Dinov2WithRegisters, ViT, DeiT, CLIP vision, SigLIP vision;
    DINOv3 ViT through :class:`DINOv3Teacher`)."""

    def __init__(self, model: nn.Module, family: str, *, spec: str = "", name: str = "",
                 image_mean=None, image_std=None, head: ClassifierHead | None = None):
        family_key = family
        if family_key not in {v[0] for v in FAMILIES.values()}:
            raise RaptorError(f"unsupported HF family {family!r}")
        cfg = model.config
        if family in ("clip", "siglip"):
            core = model.vision_model if hasattr(model, "vision_model") else model
            final_norm = core.post_layernorm
            n_cls = 1 if family == "clip" else 0
        else:
            core = model
            final_norm = core.norm if family == "dinov3" else core.layernorm
            n_cls = 2 if family == "deit" else 1
        blocks = _find_blocks(core)
        with_registers = family in ("dinov2_with_registers", "dinov3")
        n_reg = int(getattr(cfg, "num_register_tokens", 0) or 0) if with_registers else 0
        patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        img = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        dmean, dstd = next((m, s) for f, m, s in FAMILIES.values() if f == family)
        # DINOv2 checkpoints carry 518 px position embeddings but are used at 224 px.
        default_size = 224 if family.startswith("dinov2") and img > 224 else img
        super().__init__(blocks=list(blocks), final_norm=final_norm, n_cls=n_cls, n_registers=n_reg,
                         patch_size=patch, dim=cfg.hidden_size, image_mean=image_mean or dmean,
                         image_std=image_std or dstd, default_image_size=default_size, head=head)
        self.model = model  # keeps the original modules (blocks are shared references)
        self.core = core
        self.family = family
        self.spec = spec
        self.display_name = name or spec
        self._config_image_size = img
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.core.embeddings
        if self.family in ("dinov2", "dinov2_with_registers", "dinov3"):
            return emb(images)
        interp = tuple(images.shape[-2:]) != (self._config_image_size, self._config_image_size)
        x = emb(images, interpolate_pos_encoding=interp)
        if self.family == "clip":
            x = self.core.pre_layrnorm(x)
        return x

    def hf_hidden_states(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The model's own ``output_hidden_states`` (used by parity tests)."""
        kwargs = {"output_hidden_states": True}
        if self.family not in ("dinov2", "dinov2_with_registers", "dinov3"):
            kwargs["interpolate_pos_encoding"] = tuple(images.shape[-2:]) != (self._config_image_size,) * 2
        out = self.model(pixel_values=images, **kwargs)
        return out.hidden_states


class DINOv3Teacher(HFTeacher):
    """transformers' DINOv3 ViT: [cls, registers ("storage" tokens), patches], no position embedding added to the
    tokens; every layer gets the rotary position embeddings (cos, sin) of the patch grid instead.

    The grid follows from the token count: the grid of the images this teacher last embedded with that many patches,
    else the square grid. So :meth:`run_blocks` resumes stored trajectories (square crops) with no images at hand;
    tokens of a non-square grid need an ``embed`` of such images first."""

    def __init__(self, model: nn.Module, family: str = "dinov3", **kw):
        super().__init__(model, family, **kw)
        self._grids: dict[int, tuple[int, int]] = {}  # n patches -> the grid last embedded with that many
        self._rope: dict = {}  # (rows, cols, device) -> (cos, sin)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        self._grids[h * w] = (h, w)
        return self.core.embeddings(images)

    def patch_grid(self, n_patches: int) -> tuple[int, int]:
        if n_patches in self._grids:
            return self._grids[n_patches]
        side = int(round(n_patches ** 0.5))
        if side * side != n_patches or n_patches <= 0:
            raise RaptorError(f"cannot tell the patch grid of {n_patches} patch tokens (not a square; embed images "
                              f"of that size with this teacher first)")
        return side, side

    def block_kwargs(self, tokens: torch.Tensor) -> dict:
        h, w = self.patch_grid(tokens.shape[1] - self.n_cls - self.n_registers)
        key = (h, w, tokens.device)
        if key not in self._rope:
            if len(self._rope) >= 16:
                self._rope.clear()
            # the RoPE module reads only the shape, device and dtype of its input: an empty (1, 0, H, W) tensor
            weight = self.core.embeddings.patch_embeddings.weight
            probe = torch.empty((1, 0, h * self.patch_size, w * self.patch_size), dtype=weight.dtype,
                                device=tokens.device)
            self._rope[key] = self.core.rope_embeddings(probe)
        return {"position_embeddings": self._rope[key]}


def make_hf_teacher(model: nn.Module, family: str, **kw) -> HFTeacher:
    """The teacher class of ``family`` around an HF model."""
    return (DINOv3Teacher if family == "dinov3" else HFTeacher)(model, family, **kw)


def _find_blocks(core: nn.Module) -> nn.ModuleList:
    """The ordered transformer layers, wherever this transformers version keeps them."""
    for path in ("encoder.layer", "encoder.layers", "model.layer", "layers", "layer"):
        obj = core
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if isinstance(obj, nn.ModuleList):
            return obj
    raise RaptorError(f"cannot find the transformer layers of {type(core).__name__}")


def _read_processor_config(path: Path) -> dict | None:
    """The model's ``preprocessor_config.json`` as a dict (None where there is none or it is unreadable)."""
    f = path / "preprocessor_config.json"
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


def _hub_processor_config(target: str, offline: bool) -> dict | None:
    """A hub model's processor config from the hub cache (fetched unless offline); None where there is none."""
    try:
        from transformers.utils import cached_file

        f = cached_file(target, "preprocessor_config.json", local_files_only=offline,
                        _raise_exceptions_for_missing_entries=False)
    except Exception:  # noqa: BLE001 - no processor config: --transform model falls back to the paper's
        return None
    return _read_processor_config(Path(f).parent) if f else None


def load_hf_teacher(target: str, spec: str) -> HFTeacher:
    """Load ``hf:<hub id or local dir>``. A local dir always works; hub ids need network (not offline)."""
    import transformers

    path = Path(target).expanduser()
    local = path.is_dir()
    if not local and (path.exists() or target.startswith(("/", ".", "~")) or target.count("/") > 1):
        raise RaptorError(f"HF model directory not found: {target} (need a local dir with config.json, or a hub id)")
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        cfg = transformers.AutoConfig.from_pretrained(str(path) if local else target,
                                                      local_files_only=local or offline)
    except Exception as e:  # noqa: BLE001 - turned into one clear line
        where = f"local dir {path}" if local else f"hub id {target!r}" + (
            " (HF_HUB_OFFLINE=1: pass a local dir)" if offline else "")
        raise RaptorError(f"cannot load HF config from {where}: {str(e).splitlines()[0][:200]}") from None
    mtype = cfg.model_type
    if mtype not in FAMILIES:
        raise RaptorError(f"unsupported HF model_type {mtype!r} (supported: {sorted(FAMILIES)})")
    family = FAMILIES[mtype][0]
    archs = getattr(cfg, "architectures", None) or []
    cls_name = MODEL_CLASSES[family]
    with_head = any(a.endswith("ForImageClassification") for a in archs) and family in ("dinov2", "vit", "deit")
    if with_head:
        cls_name = {"dinov2": "Dinov2ForImageClassification", "vit": "ViTForImageClassification",
                    "deit": "DeiTForImageClassification"}[family]
    try:
        model = getattr(transformers, cls_name).from_pretrained(str(path) if local else target,
                                                                local_files_only=local or offline)
    except Exception as e:  # noqa: BLE001
        raise RaptorError(f"cannot load {cls_name} from {target}: {str(e).splitlines()[0][:200]}") from None
    head = None
    if with_head:
        clf = model.classifier
        backbone = getattr(model, {"dinov2": "dinov2", "vit": "vit", "deit": "deit"}[family])
        pooling = "cls+meanpatch" if family == "dinov2" else "cls"
        head = ClassifierHead(clf, pooling)
        model = backbone
    processor = _read_processor_config(path) if local else _hub_processor_config(target, offline)
    mean, std = (tuple(processor[k]) if (processor or {}).get(k) else None for k in ("image_mean", "image_std"))
    t = make_hf_teacher(model.float().eval(), family, spec=spec, name=target, image_mean=mean, image_std=std,
                        head=head)
    t.processor_config = processor
    return t


# ---- tiny random teachers (tests, benchmarks, smoke runs) --------------------------------------------------------

def tiny_config(family: str, *, dim: int = 32, depth: int = 3, heads: int = 2, image_size: int = 28,
                patch_size: int = 14, registers: int = 2):
    import transformers as T

    common = dict(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, image_size=image_size,
                  patch_size=patch_size)
    if family == "dinov2":
        return T.Dinov2Config(**common, mlp_ratio=2, layerscale_value=0.5)
    if family == "dinov2_with_registers":
        return T.Dinov2WithRegistersConfig(**common, mlp_ratio=2, num_register_tokens=registers, layerscale_value=0.5)
    if family in ("vit", "deit"):
        cfg_cls = T.ViTConfig if family == "vit" else T.DeiTConfig
        return cfg_cls(**common, intermediate_size=2 * dim)
    if family == "clip":
        return T.CLIPVisionConfig(**common, intermediate_size=2 * dim)
    if family == "siglip":
        return T.SiglipVisionConfig(**common, intermediate_size=2 * dim)
    if family == "dinov3":
        return T.DINOv3ViTConfig(**common, intermediate_size=2 * dim, num_register_tokens=registers,
                                 layerscale_value=0.5)
    raise RaptorError(f"unknown tiny family {family!r} ({', '.join(MODEL_CLASSES)})")


def build_tiny_teacher(family: str, seed: int = 0, **kw) -> HFTeacher:
    """A small randomly initialised HF model of the given family (deterministic for a seed)."""
    import transformers as T

    cfg = tiny_config(family, **kw)
    cls = getattr(T, MODEL_CLASSES[family])
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = cls(cfg)
    return make_hf_teacher(model.eval(), family, spec=f"tiny:{family}", name=f"tiny random {family}")
