"""Errors meant for the user: they name the file or item and what is wrong with it.

Command-line entry points catch :class:`InputError`, print its message and exit non-zero without a traceback.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (a file, a datalist item, a config override); the message says which and why."""


class DatalistError(InputError):
    """A datalist or one of its items is invalid."""


class ImageError(InputError):
    """An image file is missing, unreadable, or of the wrong geometry or content."""


def find_input_error(err: BaseException) -> InputError | None:
    """The :class:`InputError` behind ``err``, if any: MONAI's ``Compose`` and ignite wrap transform exceptions in a
    ``RuntimeError``, so the user-facing error sits somewhere in the ``__cause__`` / ``__context__`` chain."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, InputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
