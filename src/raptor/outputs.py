"""Output directories: one writer at a time, and a failed run leaves nothing behind that it created.

``claim_output(path)`` is the one door every command (extract, analyze, fit) goes through before it writes:

- **Lock.** ``OUT/.raptor.lock`` is held with ``fcntl.flock`` for the whole run. A second process aiming at the same
  directory is refused with one line naming the holder's pid. The kernel drops a ``flock`` when its process dies
  however it dies (SIGKILL included), so a crash never leaves the directory stuck; the file itself is removed on a
  clean exit and its leftover after a crash is harmless (it is re-locked, not trusted).
- **Cleanup.** If this run created the directory and fails before it made *durable progress* (``has_progress``:
  a finished store chunk, a training checkpoint), the directory is removed again: no empty or config-only output
  directory survives a refused or failed run. Directories that existed before are never removed.
- **Errors.** Creating the directory on a read-only or full filesystem is one :class:`RaptorError` line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

from raptor.errors import RaptorError

LOCK_NAME = ".raptor.lock"

try:  # POSIX; elsewhere runs proceed unlocked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def safe_name(text: str, limit: int | None = None, repl: str = "_") -> str:
    """``text`` as a file name: letters, digits and ``-_.`` kept, anything else replaced by ``repl``."""
    return "".join(c if c.isalnum() or c in "-_." else repl for c in text)[:limit]


def os_error_message(e: OSError, action: str = "cannot write") -> str:
    """'cannot write /x/y: No space left on device' plus what to do about the common cases."""
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    hint = {errno.ENOSPC: " (free some space, then re-run the same command: finished parts are kept)",
            errno.EDQUOT: " (disk quota exceeded; free some space, then re-run the same command)",
            errno.EROFS: " (the filesystem is read-only: choose another --out)",
            errno.EACCES: " (no permission: choose another --out)",
            errno.EPERM: " (no permission: choose another --out)"}.get(e.errno or -1, "")
    return f"{action}{where}: {e.strerror or e}{hint}"


def _first_missing_ancestor(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (what mkdir(parents=True) would create)."""
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing

_HELD: set[int] = set()  # descriptors of the locks this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker): close the inherited lock descriptors. A flock belongs to the open
    file, which the parent keeps open, so the parent's lock stands; but a child outliving a killed parent no longer
    keeps the directory locked."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


class OutputLock:
    """An exclusive, crash-safe lock on a directory (see module docstring)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        if fcntl is None:
            return self
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise RaptorError(os_error_message(e, "cannot lock")) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_pid(fd)
                os.close(fd)
                who = f" (pid {holder})" if holder else ""
                raise RaptorError(f"another raptor process{who} is writing to {self.path.parent}; wait for it to "
                                  f"finish or stop it, or choose another --out") from None
            # the holder may have removed the file between our open and our flock: then we locked a dead inode
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        _HELD.discard(self.fd)
        os.close(self.fd)  # closing drops the flock
        self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return int(os.read(fd, 32).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def only_lock_inside(path: Path) -> bool:
    return all(p.name == LOCK_NAME for p in path.iterdir())


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, has_progress: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Create (if needed) and lock ``path`` for one run; undo the creation if the run fails without progress."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RaptorError(f"--out {path} exists and is not a directory")
    created = _first_missing_ancestor(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RaptorError(os_error_message(e, "cannot create")) from None
    lock = OutputLock(path)
    try:
        lock.acquire()
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    ok = False
    try:
        yield path
        ok = True
    except OSError as e:
        if not getattr(e, "filename", None):  # e.g. zarr's writes: at least name the output directory
            e.filename = str(path)
        raise
    finally:
        lock.release()
        if not ok and created is not None and path.exists():
            progressed = False
            with contextlib.suppress(Exception):
                progressed = bool(has_progress and has_progress(path))
            if not progressed:
                shutil.rmtree(created, ignore_errors=True)



@contextlib.contextmanager
def staged(out: Path, last: str) -> Iterator[Path]:
    """A staging directory inside ``out`` for a run's result files; on success they move into ``out`` with
    ``last`` (the file that marks the run complete) moved last; on failure the staging directory is removed and
    the files of an earlier run in ``out`` stay as they were (an earlier ``last`` is removed only just before
    the new files move in, so a crash in that moment never pairs it with new files)."""
    stage = out / f".staging-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        if last in names:
            (out / last).unlink(missing_ok=True)
            names.remove(last)
            names.append(last)
        for name in names:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
