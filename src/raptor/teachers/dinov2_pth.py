"""Official DINOv2 torch.hub checkpoints (``dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth``) -> HF models.

Registers are detected from the keys (``register_tokens``), SwiGLU (ViT-g) from ``mlp.w12``. The official
linear heads (``*_linear_head.pth``: a Linear over [cls || mean patch] after the final norm) load as the
teacher's classifier. Files are read with ``torch.load(weights_only=True)`` or safetensors: never unpickled.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from raptor.errors import RaptorError
from raptor.teachers.base import ClassifierHead
from raptor.teachers.hf import HFTeacher
from raptor.teachers.names import to_model_names

_BLOCK = re.compile(r"^blocks\.(?:\d+\.)?(\d+)\.(.+)$")  # also block-chunked checkpoints: blocks.{chunk}.{i}.
_BLOCK_MAP = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "attn.proj.weight": "attention.o_proj.weight", "attn.proj.bias": "attention.o_proj.bias",
    "ls1.gamma": "layer_scale1.lambda1", "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight", "mlp.fc2.bias": "mlp.fc2.bias",
    "mlp.w3.weight": "mlp.down_proj.weight", "mlp.w3.bias": "mlp.down_proj.bias",
    "ls2.gamma": "layer_scale2.lambda1",
}
_TOP_MAP = {
    "cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens", "mask_token": "embeddings.mask_token",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias",
}


EXPECTED = "expected a tensors-only state dict saved with torch.save (.pth/.pt) or a .safetensors file"


def describe_file(path: Path) -> str:
    """What a file looks like from its first bytes (for error messages)."""
    head = path.read_bytes()[:64] if path.stat().st_size else b""
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (torch.save format)"
    if head[:1] == b"\x80":
        return "a raw Python pickle"
    if len(head) > 8 and head[8:9] == b"{":
        return "a safetensors file"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "an unrecognised binary file"


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A tensor dict from ``.safetensors`` or a ``.pth`` state dict (``weights_only=True``, never a pickle)."""
    import pickle
    import warnings

    path = Path(path).expanduser()
    if not path.is_file():
        raise RaptorError(f"file not found: {path}")
    kind = describe_file(path)
    if kind in ("an empty file", "a text file", "an unrecognised binary file"):
        raise RaptorError(f"{path} is {kind}, not a weights file: {EXPECTED}")
    try:
        if path.suffix == ".safetensors" or kind == "a safetensors file":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols: not the user's concern
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise RaptorError(f"{path} holds Python objects besides tensors; raptor refuses to unpickle them (that "
                              f"can run arbitrary code): {EXPECTED}") from None
        raise RaptorError(f"{path} is {kind} that does not unpickle as tensors: {EXPECTED}") from None
    except Exception as e:  # noqa: BLE001 - torch/safetensors raise many kinds on a damaged file
        raise RaptorError(f"cannot read weights from {path} ({kind}, damaged: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:120] if str(e) else ''}): {EXPECTED}") from None
    for key in ("model", "state_dict"):  # training checkpoints wrap the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise RaptorError(f"{path} is not a state dict of tensors: {EXPECTED}")
    return sd


def official_to_hf(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Convert official DINOv2 keys to HF 5.x keys; also returns the inferred architecture."""
    if "cls_token" not in sd or "pos_embed" not in sd:
        raise RaptorError("not an official DINOv2 checkpoint (no cls_token/pos_embed keys)")
    out: dict[str, torch.Tensor] = {}
    depth = 0
    swiglu = False
    for k, v in sd.items():
        if k in _TOP_MAP:
            v = v.reshape(1, -1) if k == "mask_token" else v
            out[_TOP_MAP[k]] = v
            continue
        m = _BLOCK.match(k)
        if not m:
            raise RaptorError(f"unexpected key in DINOv2 checkpoint: {k}")
        i, rest = int(m.group(1)), m.group(2)
        depth = max(depth, i + 1)
        pre = f"encoder.layer.{i}."
        if rest in ("attn.qkv.weight", "attn.qkv.bias"):
            q, kk, vv = v.chunk(3, dim=0)
            kind = rest.rsplit(".", 1)[1]
            out[pre + f"attention.q_proj.{kind}"] = q
            out[pre + f"attention.k_proj.{kind}"] = kk
            out[pre + f"attention.v_proj.{kind}"] = vv
        elif rest in ("mlp.w12.weight", "mlp.w12.bias"):
            swiglu = True
            kind = rest.rsplit(".", 1)[1]
            gate, up = v.chunk(2, dim=0)
            out[pre + f"mlp.gate_proj.{kind}"] = gate
            out[pre + f"mlp.up_proj.{kind}"] = up
        elif rest in _BLOCK_MAP:
            out[pre + _BLOCK_MAP[rest]] = v
        else:
            raise RaptorError(f"unexpected block key in DINOv2 checkpoint: {k}")
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    n_pos = sd["pos_embed"].shape[1] - 1
    arch = {"dim": dim, "depth": depth, "heads": dim // 64, "patch_size": patch,
            "image_size": int(round(n_pos ** 0.5)) * patch, "swiglu": swiglu,
            "registers": int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0}
    return out, arch


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_to_hf` (HF 5.x Dinov2 keys -> official keys); used to test the round trip."""
    inv_top = {v: k for k, v in _TOP_MAP.items()}
    inv_block = {v: k for k, v in _BLOCK_MAP.items()}
    out: dict[str, torch.Tensor] = {}
    pending: dict[tuple[int, str, str], torch.Tensor] = {}
    for k, v in sd.items():
        if k in inv_top:
            out[inv_top[k]] = v.reshape(1, -1) if k == "embeddings.mask_token" else v
            continue
        m = re.match(r"^encoder\.layer\.(\d+)\.(.+)$", k)
        if not m:
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest in inv_block:
            out[f"blocks.{i}.{inv_block[rest]}"] = v
        else:
            pending[(i,) + tuple(rest.rsplit(".", 1))] = v
    for (i, name, kind), v in list(pending.items()):
        if name == "attention.q_proj":
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [v, pending[(i, "attention.k_proj", kind)], pending[(i, "attention.v_proj", kind)]], dim=0)
        elif name == "mlp.gate_proj":
            out[f"blocks.{i}.mlp.w12.{kind}"] = torch.cat([v, pending[(i, "mlp.up_proj", kind)]], dim=0)
    return out


def build_hf_dinov2(arch: dict) -> nn.Module:
    import transformers as T

    common = dict(hidden_size=arch["dim"], num_hidden_layers=arch["depth"], num_attention_heads=arch["heads"],
                  patch_size=arch["patch_size"], image_size=arch["image_size"], mlp_ratio=4,
                  use_swiglu_ffn=arch["swiglu"], layer_norm_eps=1e-6)
    if arch["registers"]:
        return T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(**common, num_register_tokens=arch["registers"]))
    return T.Dinov2Model(T.Dinov2Config(**common))


def load_linear_head(path: str | Path, dim: int) -> ClassifierHead:
    """Official DINOv2 ``*_linear_head.pth``: Linear(2*dim -> classes) over [cls || mean patch] after the norm."""
    sd = load_state_file(path)
    w = sd.get("weight", sd.get("linear.weight"))
    b = sd.get("bias", sd.get("linear.bias"))
    if w is None or w.ndim != 2:
        raise RaptorError(f"{path} is not a linear head (expected keys weight/bias)")
    if w.shape[1] != 2 * dim:
        raise RaptorError(f"head {path} expects {w.shape[1]} input features; this teacher gives 2*{dim}="
                          f"{2 * dim} ([cls || mean patch]); the 4-layer heads (linear4) are not supported")
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
    return ClassifierHead(lin, "cls+meanpatch")


def load_dinov2_pth_teacher(path: str, spec: str, head: str | None = None) -> HFTeacher:
    sd, arch = official_to_hf(load_state_file(path))
    model = build_hf_dinov2(arch)
    if "embeddings.mask_token" not in sd:
        sd["embeddings.mask_token"] = model.embeddings.mask_token.detach().clone()

    missing, unexpected = model.load_state_dict(to_model_names(sd, model), strict=False)
    if missing or unexpected:
        raise RaptorError(f"DINOv2 checkpoint {path} does not fit the inferred architecture {arch}: "
                          f"missing={missing[:5]} unexpected={unexpected[:5]}")
    family = "dinov2_with_registers" if arch["registers"] else "dinov2"
    t = HFTeacher(model.eval(), family, spec=spec, name=Path(path).name)
    if head:
        t.head = load_linear_head(head, arch["dim"])
    return t
