"""Sharing trained surrogates: a folder (or a Hugging Face Hub model repo) that any raptor reads like a fit run.

A shared surrogate holds exactly what a finished fit run's readers need: ``surrogate.json`` (phases, block
configuration, the teacher spec), ``model.safetensors``, and, when the model came from a fit, its ``metrics.json``;
plus a ``README.md`` model card written from those metrics (teacher, phases, held-out data, the discriminating R²
measures beside the baselines a model without the property scores). So ``FitRun(folder)``, ``raptor probe
--backbone hf-raptor:<folder or repo>`` and ``raptor dynamics --surrogate hf-raptor:...`` take it like a run.

Weights are safetensors only (nothing is ever unpickled) and load strictly: a file that does not fit its
configuration is one error, never a silently half-loaded model. Hub transfers use ``huggingface_hub`` (already a
dependency of transformers); under ``HF_HUB_OFFLINE=1`` a repo id that is not cached is one clear error.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from raptor import __version__
from raptor.config import atomic_write_text
from raptor.errors import RaptorError
from raptor.surrogate.checkpoint import save_tensors

FILES = ("surrogate.json", "model.safetensors")
PAPER = "https://arxiv.org/abs/2512.19941"


def save_pretrained(model, directory: str | Path) -> Path:
    """Write ``model`` (a RaptorModel with ``teacher_spec`` set) as a shared surrogate in ``directory``."""
    spec = getattr(model, "teacher_spec", None)
    if not spec:
        raise RaptorError("this surrogate does not know its teacher (model.teacher_spec); models from raptor.fit, "
                          "FitRun(...).model() and from_pretrained do")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(model.state_dict(), out / "model.safetensors")
    metrics = getattr(model, "fit_metrics", None)
    if metrics:
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, default=_jsonable))
    else:  # an earlier model's metrics must not be read as this one's
        (out / "metrics.json").unlink(missing_ok=True)
    atomic_write_text(out / "README.md", model_card(model))
    atomic_write_text(out / "surrogate.json", json.dumps({"surrogate": model.cfg.to_dict(), "teacher": spec,
                                                          "raptor_version": __version__}, indent=1))
    return out


def from_pretrained(name: str | Path, *, revision: str | None = None, token: str | bool | None = None):
    """A shared surrogate from a local folder (a ``save_pretrained`` folder or a finished fit run) or a Hub repo
    id (``user/name``), in eval mode with ``teacher_spec`` (and ``fit_metrics`` when shipped) set."""
    from raptor.surrogate.run_dir import FitRun

    run = FitRun(resolve(name, revision=revision, token=token))
    run.require_weights(str(name))
    model = run.model()
    model.teacher_spec = run.teacher_spec
    metrics_file = run.path / "metrics.json"
    model.fit_metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
    return model


def resolve(name: str | Path, *, revision: str | None = None, token: str | bool | None = None) -> Path:
    """The local folder of ``name``: itself if it is a directory, else the Hub repo's snapshot (downloaded once into
    the Hugging Face cache; only the files a surrogate needs)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    text = str(name)
    if p.exists() or text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise RaptorError(f"{text} is neither a folder nor a Hub repo id (user/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    try:
        return Path(snapshot_download(text, revision=revision, token=token,
                                      allow_patterns=[*FILES, "metrics.json", "README.md"]))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise RaptorError(f"cannot fetch {text} from the Hugging Face Hub"
                          + (" (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline else
                             f" ({type(e).__name__})")) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise RaptorError(f"cannot fetch {text} from the Hugging Face Hub ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None


def push_to_hub(model, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                commit_message: str = "Upload a Raptor surrogate") -> str:
    """Upload ``model`` as a shared surrogate to the Hub model repo ``repo_id`` (created if needed); returns the
    commit URL."""
    import tempfile

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="raptor-push-") as tmp:
        save_pretrained(model, tmp)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
        except (OfflineModeIsEnabled, HfHubHTTPError, OSError, ValueError) as e:
            raise RaptorError(f"cannot push to {repo_id} on the Hugging Face Hub ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    return str(getattr(info, "commit_url", info))


PREFIX = "hf-raptor:"


def surrogate_folder(text: str) -> Path:
    """The folder a ``--surrogate``/``--backbone`` names: ``hf-raptor:<folder or Hub repo id>`` (a shared
    surrogate) or a fit run directory as it is."""
    if text.startswith(PREFIX):
        target = text[len(PREFIX):]
        if not target:
            raise RaptorError(f"bad {text!r}: hf-raptor:<folder or user/name>")
        return resolve(target)
    return Path(text).expanduser()


def _jsonable(x):
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def _num(x, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def model_card(model) -> str:
    """A Hub model card: YAML metadata, what the surrogate is, and (from its fit's metrics) the discriminating
    measures on the held-out images beside what the image-blind and linear baselines score."""
    from raptor.phases import format_phases

    cfg, spec = model.cfg, getattr(model, "teacher_spec", "?")
    m = getattr(model, "fit_metrics", None) or {}
    teacher = m.get("teacher", {})
    lines = ["---", "library_name: raptor", "tags:", "- raptor", "- block-recurrent", "- vision-transformer",
             "- interpretability", "---", "",
             f"# Raptor surrogate of {teacher.get('name') or spec}", "",
             f"{len(cfg.phases)} tied, depth-conditioned blocks applied recurrently over the phases "
             f"{format_phases(cfg.phases)} of the teacher `{spec}` (depth {cfg.depth}, width {cfg.block.dim}): a "
             f"test of the Block-Recurrent Hypothesis ([paper]({PAPER})). Made with raptor {__version__}.", "",
             "```python", "import raptor", "", "model = raptor.RaptorModel.from_pretrained(\"<this folder or repo>\")",
             f"teacher = raptor.load_teacher({spec!r})",
             "tokens = model.splice(teacher, images, 0, model.depth)  # the surrogate in place of every block",
             "```", ""]
    val = m.get("validation") or {}
    ar = val.get("autoregressive") or {}
    if not ar:
        lines += ["No fit metrics were shipped with this surrogate.", ""]
        return "\n".join(lines)
    hold = (m.get("data_sample") or {}).get("holdout") or {}
    c = m.get("config") or {}
    lines += ["## Fit", "",
              f"- data: `{c.get('data') or c.get('store')}`; held out: "
              + (f"{hold.get('n_val_photos')} whole photos of `{hold.get('val_data')}` ({val.get('n_images')} views)"
                 if hold.get("by") == "photo" else f"{val.get('n_images')} images of the same data"),
              f"- recipe `{c.get('recipe')}`: {c.get('steps1')} stage-1 steps per block, {c.get('steps2')} stage-2 "
              f"steps, batch {c.get('batch_size')}, image size {c.get('image_size')}, seed {c.get('seed')}", "",
              "## Fidelity on the held-out images", "",
              "Image-specific R² = 1 − SSE / SSE of the image-blind per-position training mean (which scores 0); the "
              "image-level R² compares pooled [cls ‖ mean patch] features after the final norm.", "",
              "| model | image-specific R² [95 % CI] | last layer | image-level R² |", "|---|---|---|---|"]
    ci = ar.get("r2_image_specific_ci95") or [None, None]
    spec_l = ar.get("r2_image_specific") or [None]
    il = (val.get("image_level") or {})
    lines.append(f"| this surrogate (autoregressive from layer 0) | **{_num(ar.get('r2_image_specific_mean'))}** "
                 f"[{_num(ci[0])}, {_num(ci[1])}] | {_num(spec_l[-1])} | "
                 f"{_num((il.get('autoregressive') or {}).get('r2'))} |")
    for name, label in (("ridge_autoregressive", "chained ridge (a linear map per layer)"),
                        ("identity", "identity (each layer = the one before)"),
                        ("position_mean", "image-blind per-position mean")):
        b = (val.get("baselines") or {}).get(name) or {}
        bci = b.get("r2_image_specific_ci95") or [None, None]
        last = (b.get("r2_image_specific") or [None])[-1]
        lines.append(f"| {label} | {_num(b.get('r2_image_specific_mean'))} [{_num(bci[0])}, {_num(bci[1])}] | "
                     f"{_num(last)} | {_num((il.get(name) or {}).get('r2'))} |")
    blind = ((val.get("baselines") or {}).get("position_mean") or {}).get("r2_official_all_layers")
    lines += ["", f"Under the paper's R² (pooled over layers) this surrogate scores "
              f"{_num(ar.get('r2_official_all_layers'))} and the image-blind position mean {_num(blind)}. Every "
              "number comes from this folder's `metrics.json`.", ""]
    return "\n".join(lines)
