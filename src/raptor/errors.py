"""One exception type for user-facing problems: the CLI prints its message on one line and exits 2."""


class RaptorError(Exception):
    """A problem with the user's input (spec, file, option) that deserves one clear line, not a traceback."""
