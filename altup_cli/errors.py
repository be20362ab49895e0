"""The one exception type that means "the user asked for something impossible", and the
one way to raise it from a check.

The CLI turns a UserError into a single line on stderr and exit code 2; anything else is a
bug and keeps its traceback. Plain Python, so every layer (models included) may import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class UserError(Exception):
    """Bad input: a clear one-line message, no traceback, exit code 2."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for
    turning a library's error into a one-line UserError."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def require(condition: bool, message: str, error: type[Exception] = UserError) -> None:
    """Raise `error(message)` unless `condition` holds. Plain-PyTorch layers pass
    `error=ValueError` so their callers can add where the value came from."""
    if not condition:
        raise error(message)


def choices_text(choices: Sequence[str], one_of: bool = False) -> str:
    """`a or b`, `a, b or c`; with `one_of`, `one of a, b, c` (for long lists)."""
    names = [str(c) for c in choices]
    if one_of:
        return f"one of {', '.join(names)}"
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_choice(
    value: Any,
    choices: Sequence[str],
    key: str,
    one_of: bool = False,
    error: type[Exception] = UserError,
) -> None:
    """Refuse a `value` of `key` that is not one of `choices`:
    "KEY must be a, b or c, got 'x'"."""
    message = f"{key} must be {choices_text(choices, one_of)}, got {value!r}"
    require(value in choices, message, error)
