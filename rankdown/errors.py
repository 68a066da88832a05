"""The one exception type for user mistakes: the CLI prints its message and exits non-zero."""


class RankdownError(Exception):
    """A user-facing error: one line naming the file (or stage) and the problem."""

    exit_code = 2
