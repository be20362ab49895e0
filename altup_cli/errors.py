"""The one exception type that means "the user asked for something impossible".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a clear one-line message, no traceback, exit code 2."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for
    turning a library's error into a one-line UserError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
