"""The one exception type the CLI turns into a single clear line and a non-zero exit."""


class CputaxError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
