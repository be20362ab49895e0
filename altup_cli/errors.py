"""The one exception type that means "the user asked for something impossible".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a clear one-line message, no traceback, exit code 2."""
