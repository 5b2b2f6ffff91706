"""Filesystem faults for the fault suite: a real small tmpfs where this machine lets us mount one, otherwise the
same fault injected into the raptor process (its Python-level file writes under one directory fail).

As a script: ``python tests/faultfs.py full|readonly DIR BUDGET_BYTES -- <raptor args>`` runs the raptor CLI with
writes under DIR failing with ENOSPC once BUDGET_BYTES have been written (``full``) or at once with EROFS
(``readonly``, which also refuses creating files and directories there).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path


def try_mount_tmpfs(path: Path, size: str, read_only: bool = False) -> bool:
    """Mount a tmpfs of ``size`` on ``path`` (root with CAP_SYS_ADMIN only). True if mounted."""
    if not shutil.which("mount") or os.geteuid() != 0:
        return False
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---- injected fault (inside the raptor process) ------------------------------------------------------------------


def _install(kind: str, root: str, budget: int) -> None:
    import builtins
    import io

    root = os.path.realpath(root)
    used = [0]
    real_open, real_os_open, real_mkdir = io.open, os.open, os.mkdir

    def under(p) -> bool:
        try:
            p = os.readlink(f"/proc/self/fd/{p}") if isinstance(p, int) else os.path.realpath(os.fspath(p))
        except (TypeError, OSError):
            return False
        return p == root or p.startswith(root + os.sep)

    def fail(code: int, p):
        raise OSError(code, os.strerror(code), str(p))

    class Counting:
        def __init__(self, f, name):
            self._f, self._name = f, name

        def write(self, b):
            used[0] += len(b)
            if used[0] > budget:
                fail(errno.ENOSPC, self._name)
            return self._f.write(b)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def __getattr__(self, name):
            return getattr(self._f, name)

    def fopen(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and under(file):
            if kind == "readonly":
                fail(errno.EROFS, file)
            return Counting(real_open(file, mode, *a, **k), file)
        return real_open(file, mode, *a, **k)

    def fos_open(path, flags, *a, **k):
        if kind == "readonly" and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            fail(errno.EROFS, path)
        return real_os_open(path, flags, *a, **k)

    def fmkdir(path, *a, **k):
        if kind == "readonly" and under(path):
            fail(errno.EROFS, path)
        return real_mkdir(path, *a, **k)

    io.open = builtins.open = fopen
    os.open, os.mkdir = fos_open, fmkdir


def main() -> None:
    kind, root, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    args = sys.argv[sys.argv.index("--") + 1:]
    _install(kind, root, budget)
    from raptor.cli import run

    sys.exit(run(args))


if __name__ == "__main__":
    main()
