"""Errors that a user can fix. The command prints their message and exits with status 2."""

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str], n: int = 1) -> str:
    """"; did you mean 'a', 'b'?" naming the choices closest to a mistyped `name`, or ""."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=n, cutoff=0.6)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


class UserInputError(ValueError):
    """Bad input from the user: a file, folder, argument or saved object that cannot be used."""


class ImageLoadError(UserInputError):
    """An image file that cannot be read (missing, empty, truncated, not an image, too large)."""


class NoPublishedWeightsError(UserInputError):
    """A model asked for with pretrained weights that has none (e.g. `conv4`): its weights come
    from a checkpoint."""


class FingerprintMismatchError(UserInputError):
    """Stored embeddings were made by a different encoder than the one in use."""
