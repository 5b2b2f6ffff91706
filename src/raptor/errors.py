"""One exception type for user-facing problems: the CLI prints its message on one line and exits 2."""


class RaptorError(Exception):
    """A problem with the user's input (spec, file, option) that deserves one clear line, not a traceback."""


def check_positive(**values: int | float | None) -> None:
    """Refuse zero or negative counts/sizes; ``None`` means "unset" (zero never does)."""
    for name, v in values.items():
        if v is not None and not v >= 1:
            raise RaptorError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
