"""Project exceptions: errors a user can cause, with messages that say what to do."""

from __future__ import annotations


def reason(exc: BaseException, default: str = "unknown reason") -> str:
    """The last line of an exception's message: ITK's and ANTs' errors end with the reason after a trace of
    where it was raised."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else default


class IrisError(Exception):
    """Base class of every error a user can cause; the CLI prints it without a traceback. The message says what
    went wrong in the library's words; ``inputs`` names the API arguments concerned ('references', 'library',
    'structures', 'hermes_modality', 'classes', 'model', 'target', 'output'), which each front end words for its
    users: the CLI as its options (``--reference IMAGE LABELS``), the Slicer module as its controls."""

    exit_code = 2

    def __init__(self, message: str = "", *, inputs: tuple[str, ...] = ()):
        super().__init__(message)
        self.inputs = tuple(inputs)


class InputError(IrisError):
    """An input image, label map or argument is unusable (missing, wrong shape, NaN, ...)."""


class ConfigError(InputError, ValueError):
    """A configuration value (preset, architecture or training setting) is unknown or of the wrong type (an input
    of its own kind: a file or option the user gave)."""


class CheckpointError(IrisError):
    """A model file is missing, truncated, foreign, unsafe or does not fit the architecture."""


class ResourceError(IrisError):
    """The requested device is absent or the job would not fit in the available memory."""

    exit_code = 3


class CancelledError(IrisError):
    """The caller cancelled a running job."""

    exit_code = 130
