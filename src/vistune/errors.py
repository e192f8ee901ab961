"""Errors a user can cause. The CLI prints these as one line on stderr and exits 2.

Anything else that escapes is a bug and keeps its traceback.
"""


class VistuneError(Exception):
    """A problem with the user's input, files or environment (not a bug in vistune)."""


class ImageError(VistuneError):
    """An image file is missing, unreadable, not an image or too large."""


class ImageTooLargeError(ImageError):
    """An image's header says it has more pixels than the limit (it is never decoded)."""


class ModelDirError(VistuneError):
    """A model directory is missing files or they do not match each other."""


class DataError(VistuneError):
    """A data file (JSON, JSONL, COCO annotations) is malformed."""


class TemplateMismatchError(VistuneError):
    """Supervised tokens do not decode to the assistant answers (never masked silently)."""


class EndpointError(VistuneError):
    """A teacher or judge endpoint kept failing after all retries."""
