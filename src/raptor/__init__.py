"""Raptor: a toolkit for the Block-Recurrent Hypothesis of Vision Transformers.

Layer convention everywhere: layer 0 is the embedding output (tokens entering block 1), layer l is the
output of block l, so a depth-L teacher has L+1 layers. A *trajectory* is a tensor (batch, layers, tokens, dim).

The notebook API (:mod:`raptor.api`) is re-exported here and imported on first use, so that ``import raptor``
stays light (the command line reads its help without importing torch):

    teacher = raptor.load_teacher("bundled:dinov2-s"); traj = teacher.trace(images)
    sim = raptor.similarity(traj); sim.phases(2); sim.null_test(2)
    model = raptor.fit(teacher, data="bundled:natural", phases="1-7/8-12")
"""

from raptor.errors import RaptorError

__version__ = "0.1.0"

_API = ("load_teacher", "fit", "probe", "Similarity", "ProbeResult", "DynamicsResult")
_CALLABLE_MODULES = ("similarity", "dynamics")  # modules that are also the API's functions (raptor._callable)
_TYPES = {"Teacher": "raptor.teachers.base", "Trajectory": "raptor.teachers.base",
          "TokenLayout": "raptor.teachers.base", "RaptorModel": "raptor.surrogate.model", "PhaseSpec": "raptor.phases"}
__all__ = ["RaptorError", "__version__", *_API, *_CALLABLE_MODULES, *_TYPES]


def __getattr__(name: str):
    import importlib

    if name in _CALLABLE_MODULES:
        return importlib.import_module(f"raptor.{name}")
    if name in _API:
        return getattr(importlib.import_module("raptor.api"), name)
    if name in _TYPES:
        return getattr(importlib.import_module(_TYPES[name]), name)
    raise AttributeError(f"module 'raptor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
