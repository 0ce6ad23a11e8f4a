class AdaptError(Exception):
    """A problem with the user's input: the CLI prints its message on one line and exits non-zero."""


def first_line(e: BaseException) -> str:
    """An exception as one line of an AdaptError: library messages often run to many lines (hints, tracebacks of
    remote errors), and some are empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
