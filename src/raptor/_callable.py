"""Two names of the notebook API are also module names: ``raptor.similarity`` (the metrics module) and
``raptor.dynamics`` (the package). Importing a submodule binds its name on the ``raptor`` package, so a plain function
of that name could not survive the first import. Instead those two modules are callable: ``raptor.similarity(...)``
is :func:`raptor.api.similarity` and ``raptor.dynamics(...)`` is :func:`raptor.api.dynamics`, whichever was imported
first, while ``from raptor.similarity import SimilarityAccumulator`` keeps working."""

from __future__ import annotations

import sys
import types


def make_callable(module_name: str, api_name: str) -> None:
    """Calling module ``module_name`` calls ``raptor.api.<api_name>`` (imported on the first call)."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            from raptor import api

            return getattr(api, api_name)(*args, **kwargs)

    CallableModule.__call__.__doc__ = f"raptor.api.{api_name}: see its documentation."
    sys.modules[module_name].__class__ = CallableModule
