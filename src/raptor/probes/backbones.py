"""What a probe reads features from: a teacher (at its last layer or at ``--layer l``), a Raptor surrogate from a
``raptor fit`` run directory, or a splice of the two (teacher 0..i, surrogate i..j, teacher j..L). Every backbone
ends in the teacher's final norm."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from raptor.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from raptor.errors import RaptorError
from raptor.outputs import safe_name
from raptor.surrogate.hub import surrogate_folder
from raptor.surrogate.run_dir import FitRun
from raptor.teachers import KINDS as TEACHER_KINDS
from raptor.teachers import SPEC_HELP, load_teacher
from raptor.teachers.base import ClassifierHead, Teacher, TokenLayout, pool_tokens

BACKBONE_HELP = f"a teacher spec ({SPEC_HELP.replace(' | ', ', ')}), a raptor " \
                "fit run directory (holding surrogate.json and model.safetensors), hf-raptor:<folder or user/name> " \
                "(a shared surrogate: RaptorModel.save_pretrained) or pixels:<patch> (the raw-pixel baseline)"


def parse_splice(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    a, sep, b = text.partition(":")
    try:
        i, j = int(a), int(b)
    except ValueError:
        raise RaptorError(f"bad --splice {text!r}: use i:j, e.g. 0:7 (teacher 0..i, surrogate i..j, teacher j..L)") \
            from None
    if not sep or not 0 <= i < j:
        raise RaptorError(f"bad --splice {text!r}: need 0 <= i < j")
    return i, j


@dataclass(frozen=True)
class BackboneSpec:
    """Parsed, checked before anything heavy loads: ``kind`` is ``teacher`` or ``raptor``."""

    kind: str
    teacher: str
    run: str | None = None
    layer: int | None = None
    splice: tuple[int, int] | None = None
    phases: tuple = ()

    @property
    def label(self) -> str:
        if self.kind == "pixels":
            return f"baseline: raw pixels ({self.teacher.partition(':')[2]} px patches)"
        if self.kind == "teacher":
            return self.teacher + ("" if self.layer is None else f" @ layer {self.layer}")
        name = f"raptor k={len(self.phases)} ({Path(self.run).name})"
        return name + ("" if self.splice is None else f" splice {self.splice[0]}:{self.splice[1]}")


def parse_backbone(text: str, layer: int | None = None, splice: str | None = None) -> BackboneSpec:
    """A teacher spec or a run directory; refuses ``--splice`` on a teacher and ``--layer`` on a run."""
    sp = parse_splice(splice)
    p = surrogate_folder(text)  # hf-raptor:<folder or repo>: a shared surrogate, read like a fit run
    if p.is_dir():
        run = FitRun(p)
        if not run.has_weights:
            raise RaptorError(f"unknown backbone {text!r}: a directory but not a finished raptor fit run (needs "
                              f"surrogate.json and model.safetensors)")
        phases = tuple(tuple(x) for x in run.surrogate_config.phases)
        teacher = run.teacher_spec
        if layer is not None:
            raise RaptorError("--layer reads a teacher at an inner layer; for a surrogate run use --splice i:j")
        depth = max(p[-1] for p in phases)
        if sp is not None and sp[1] > depth:
            raise RaptorError(f"--splice {splice}: the surrogate covers layers 0..{depth}")
        return BackboneSpec("raptor", teacher, str(p.resolve()), None, sp, phases)
    kind, sep, target = text.partition(":")
    if kind == "pixels":
        if not target.isdigit() or int(target) < 1:
            raise RaptorError(f"bad backbone {text!r}: pixels:<patch size>, e.g. pixels:14")
        if sp is not None or layer is not None:
            raise RaptorError("--splice and --layer do not apply to the pixels baseline")
        return BackboneSpec("pixels", text)
    if not sep or not target or kind not in TEACHER_KINDS:
        raise RaptorError(f"unknown backbone {text!r}: expected {BACKBONE_HELP}")
    if sp is not None:
        raise RaptorError("--splice needs a raptor fit run directory as --backbone")
    if layer is not None and layer < 0:
        raise RaptorError(f"--layer must be >= 0, got {layer}")
    return BackboneSpec("teacher", text, None, layer, None)


class Backbone:
    """A loaded backbone: ``final_tokens(images)`` -> last-layer tokens (before the final norm) and
    ``features(tokens, layout, task)`` -> the arrays a probe of ``task`` reads."""

    def __init__(self, spec: BackboneSpec, teacher, model=None):
        self.spec, self.teacher, self.model = spec, teacher, model
        self.label = spec.label
        self.device = torch.device("cpu")
        self._identity: dict | None = None
        if spec.layer is not None and spec.layer > teacher.depth:
            raise RaptorError(f"--layer {spec.layer}: the teacher has layers 0..{teacher.depth}")

    @classmethod
    def load(cls, spec: BackboneSpec) -> "Backbone":
        teacher = PixelTeacher(int(spec.teacher.partition(":")[2])) if spec.kind == "pixels" \
            else load_teacher(spec.teacher)
        model = FitRun(spec.run).model(teacher) if spec.kind == "raptor" else None
        return cls(spec, teacher, model)

    def identity(self) -> dict:
        """What makes two feature passes the same (the cache key): spec, and the surrogate weights' hash (read once
        per loaded backbone)."""
        if self._identity is None:
            self._identity = self._compute_identity()
        return dict(self._identity)

    def _compute_identity(self) -> dict:
        d = {"kind": self.spec.kind, "teacher": self.spec.teacher, "layer": self.spec.layer,
             "splice": list(self.spec.splice) if self.spec.splice else None}
        if self.spec.kind == "pixels":
            d["tokens"] = "thumbnail cls + patch pixels"
        if self.spec.run:
            h = hashlib.sha256()
            with open(Path(self.spec.run) / "model.safetensors", "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            d["weights_sha256"] = h.hexdigest()
        name = safe_name(self.label, 60)
        d["id"] = f"{name}-{hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]}"
        return d

    def to(self, device: torch.device) -> "Backbone":
        """Run the feature passes on ``device`` (the features come back to the CPU)."""
        self.device = torch.device(device)
        if isinstance(self.teacher, torch.nn.Module):
            self.teacher.to(self.device)
        if self.model is not None:
            self.model.to(self.device)
        return self

    @torch.no_grad()
    def final_tokens(self, images: torch.Tensor) -> torch.Tensor:
        t = self.teacher
        images = images.to(self.device, non_blocking=True)
        if self.model is None:
            end = t.depth if self.spec.layer is None else self.spec.layer
            return t.run_blocks(t.embed(images), 0, end)
        i, j = self.spec.splice or (0, self.model.depth)
        return self.model.splice(t, images, i, j)

    @torch.no_grad()
    def features(self, tokens: torch.Tensor, layout, task: str) -> dict:
        normed = self.teacher.final_norm(tokens)
        if task == "cls":
            return {"pooled": pool_tokens(normed, layout, ClassifierHead.default_pooling(layout)).float().cpu().numpy()}
        patches = normed[:, layout.patches].reshape(len(normed), *layout.grid, normed.shape[-1])
        cls = normed[:, 0] if layout.n_cls else normed[:, layout.patches].mean(1)
        return {"patches": patches.to(torch.float16).cpu().numpy(), "cls": cls.to(torch.float16).cpu().numpy()}


class PixelTeacher:
    """The raw-pixel baseline seen through the teacher contract: its tokens are the normalised pixels of each
    ``patch`` x ``patch`` patch (3 p^2 values) after a "cls" token that is the whole image area-averaged to
    ``patch`` x ``patch`` pixels (a thumbnail, the same width); no blocks, identity norm. A probe on it says how much
    of a score the image itself gives a linear map, before any network: [thumbnail || mean patch] for
    classification, each patch's own pixels for segmentation, [patch || thumbnail] for depth."""

    def __init__(self, patch: int, default_image_size: int = 224):
        self.patch_size, self.default_image_size = patch, default_image_size
        self.dim, self.depth, self.n_cls, self.n_registers = 3 * patch * patch, 0, 1, 0
        self.image_mean, self.image_std = IMAGENET_MEAN, IMAGENET_STD
        self.spec, self.head, self.display_name = f"pixels:{patch}", None, f"raw pixels, {patch} px patches"
        self.final_norm = torch.nn.Identity()

    def image_size(self, size: int | None = None) -> int:
        return Teacher.image_size(self, size)

    def layout(self, hw):
        h, w = (hw, hw) if isinstance(hw, int) else hw
        return TokenLayout(1, 0, (h // self.patch_size, w // self.patch_size))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        p = torch.nn.functional.unfold(images, self.patch_size, stride=self.patch_size).transpose(1, 2)
        thumb = torch.nn.functional.adaptive_avg_pool2d(images, self.patch_size).flatten(1)[:, None]
        return torch.cat([thumb, p], dim=1)

    def run_blocks(self, tokens: torch.Tensor, start: int, end: int | None = None) -> torch.Tensor:
        return tokens
