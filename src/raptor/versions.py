"""The dependency versions raptor is tested with, and one clear error for an older one.

``pyproject.toml`` declares these floors and CI installs exactly them (``constraints-floor.txt``, ``make
test-floor``). A few packages changed in ways that would give wrong results rather than an error (transformers 4.x
names its attention weights and returns per-layer tuples differently from 5.x; zarr 3.0 writes chunks in place,
not atomically, and 3.1.0 warns on every read of the store's string ids), so the code that uses them checks the
installed version first.
"""

from __future__ import annotations

import importlib.metadata as md

from raptor.errors import RaptorError

# the floors checked at run time (pyproject.toml declares these and the others)
MIN_VERSIONS = {"transformers": "5.0.0", "zarr": "3.1.1"}


def _release(version: str) -> tuple[int, ...]:
    """(5, 0, 0) from '5.0.0', '5.0.0rc1' or '5.0.0.dev0+local' (the leading numeric release only)."""
    out = []
    for part in version.split("+")[0].split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        out.append(int(digits))
        if digits != part:
            break
    return tuple(out)


def installed(package: str) -> str | None:
    try:
        return md.version(package)
    except md.PackageNotFoundError:
        return None


def require(package: str, version: str | None = None) -> None:
    """Refuse, with one line naming the fix, an installed ``package`` older than raptor's floor. ``version``: the
    installed version (default: read from the package metadata)."""
    have = version if version is not None else installed(package)
    need = MIN_VERSIONS[package]
    if have is None:
        raise RaptorError(f"{package} is not installed: raptor needs {package}>={need} "
                          f"(pip install '{package}>={need}')")
    if _release(have) < _release(need):
        raise RaptorError(f"{package} {have} is not supported: raptor needs {package}>={need} "
                          f"(pip install -U '{package}>={need}'); older versions would load or store data wrongly")
