"""Exceptions shared by every stage.

A ``FeaturepipeError`` carries a one-line message that names the bad value and the fix; the CLIs
print it on stderr and exit with code 2.
"""


class FeaturepipeError(Exception):
    """Base class: an error the user can fix (bad argument, bad file)."""


class UsageError(FeaturepipeError):
    """A wrong argument or option value."""


class DataError(FeaturepipeError):
    """Input data that cannot be used (no images, not a featurepipe file, ...)."""


class ImageError(FeaturepipeError):
    """One image that cannot be decoded; the reason is the message."""
