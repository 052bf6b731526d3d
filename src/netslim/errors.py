"""The one exception type netslim raises for bad input.

Everything a user can get wrong (a path, a ratio, a checkpoint, a dataset) raises
:class:`NetslimError` with a message that says what is wrong and how to fix it.
The CLI prints that message and exits with status 2 instead of a stack trace.
"""


class NetslimError(Exception):
    """A user-facing error: the message is meant to be read, not debugged."""
