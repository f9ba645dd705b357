"""Exceptions shared by the library, the CLI and the Slicer modules."""

import contextlib
import warnings


class InputError(ValueError):
    """A request the user can fix: the message is one line that says what to change (CLI exit 2)."""


class Cancelled(RuntimeError):
    """The caller's cancel check asked to stop; nothing was written."""


@contextlib.contextmanager
def held_warnings():
    """Hold back the warnings raised inside the block (pydicom's, nibabel's, numpy's): when the block
    raises (a refusal says what is wrong in one line) they are dropped; when it ends normally they
    are shown then, as they would have been."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for warning in caught:
        warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno, warning.file,
                             warning.line)
