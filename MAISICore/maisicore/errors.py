"""Exceptions shared by the library, the CLI and the Slicer modules."""


class InputError(ValueError):
    """A request the user can fix: the message is one line that says what to change (CLI exit 2)."""


class Cancelled(RuntimeError):
    """The caller's cancel check asked to stop; nothing was written."""
