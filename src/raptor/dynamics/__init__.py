"""Dynamical interpretability (docs/method.md §9): depth as discrete time, token directions on the unit sphere.

Calling this package, ``raptor.dynamics(teacher, ...)``, is :func:`raptor.api.dynamics` (see :mod:`raptor._callable`).
"""

from raptor._callable import make_callable

make_callable(__name__, "dynamics")
