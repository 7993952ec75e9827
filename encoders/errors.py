"""Errors that a user can fix. The command prints their message and exits with status 2."""


class UserInputError(ValueError):
    """Bad input from the user: a file, folder, argument or saved object that cannot be used."""


class ImageLoadError(UserInputError):
    """An image file that cannot be read (missing, empty, truncated, not an image, too large)."""


class FingerprintMismatchError(UserInputError):
    """Stored embeddings were made by a different encoder than the one in use."""
