"""The one exception type that means "the user asked for something wrong"."""


class ErasekitError(Exception):
    """A user-facing error. The CLI prints its message on one line and exits with status 2."""
