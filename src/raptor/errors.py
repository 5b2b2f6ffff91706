"""One exception type for user-facing problems: the CLI prints its message on one line and exits 2.

Messages are written once, naming options as the command line spells them (``--val-data``). The same error raised
from a Python call reads with the keyword instead (``val_data``): :class:`RaptorError` renders its message for
whoever called, and only :func:`cli_messages` (the ``raptor`` command) keeps the flags.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
# flags of other programs that messages quote verbatim (pip, torchrun)
_FOREIGN = frozenset({"no-deps", "upgrade", "index-url", "extra-index-url", "nproc-per-node", "nnodes", "standalone"})
_cli_depth = 0


# flags whose Python keyword is not the flag's own name
_KEYWORD = {"stage1-weights": "stage1_last_weights", "stage2-weights": "stage2_weights", "random": "random_partitions"}
# a command line quoted in a message ("run raptor probe --out X first") keeps its flags
_COMMAND_LINE = re.compile(r"raptor [a-z][a-z-]* --[^();]*")


def python_spelling(message: str) -> str:
    """``message`` with each raptor option written as its Python keyword: ``--val-data`` -> ``val_data`` (a quoted
    ``raptor <command> ...`` line is left as it is)."""
    def keyword(m: re.Match) -> str:
        flag = m.group(1)
        return m.group(0) if flag in _FOREIGN else _KEYWORD.get(flag, flag.replace("-", "_"))

    out, last = [], 0
    for cmd in _COMMAND_LINE.finditer(message):
        out += [_FLAG.sub(keyword, message[last:cmd.start()]), cmd.group(0)]
        last = cmd.end()
    return "".join(out) + _FLAG.sub(keyword, message[last:])


@contextmanager
def cli_messages() -> Iterator[None]:
    """Within this block :class:`RaptorError` messages name options as command-line flags (the CLI's own run)."""
    global _cli_depth
    _cli_depth += 1
    try:
        yield
    finally:
        _cli_depth -= 1


class RaptorError(Exception):
    """A problem with the user's input (spec, file, option) that deserves one clear line, not a traceback."""

    def __str__(self) -> str:
        message = super().__str__()
        return message if _cli_depth else python_spelling(message)


def check_positive(**values: int | float | None) -> None:
    """Refuse zero or negative counts/sizes; ``None`` means "unset" (zero never does)."""
    for name, v in values.items():
        if v is not None and not v >= 1:
            raise RaptorError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
