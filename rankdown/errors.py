"""The one exception type for user mistakes: the CLI prints its message and exits non-zero."""


class RankdownError(Exception):
    """A user-facing error: one line naming the file (or stage) and the problem."""

    exit_code = 2


class ParityError(RankdownError):
    """An exported artifact that does not compute what its PyTorch model computes within the export's
    self-check bounds: that bundle is refused, and a caller choosing among several (``rankdown fit``)
    may go on to the next. ``reason``: what failed, without the bundle's path or advice."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = message if reason is None else reason
