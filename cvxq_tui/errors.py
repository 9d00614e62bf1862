"""User-facing errors. Each message names the problem and the fix; front ends print the
message (never a traceback) and exit with the code in ``ExitCode``."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2
    INTERRUPTED = 130


class CvxqError(Exception):
    """Base of every error a user can cause or fix. ``str(e)`` is the whole message."""

    exit_code: ExitCode = ExitCode.FAILURE


class InputError(CvxqError):
    """A bad argument or option (budget, glob, method...)."""

    exit_code = ExitCode.USAGE


class ModelError(CvxqError):
    """A model path that cannot be loaded or quantized."""


class TextError(CvxqError):
    """Calibration or evaluation text that is missing, empty or too short."""


class BudgetError(InputError):
    """A size budget outside the reachable range."""


class OutputError(CvxqError):
    """An output folder that cannot be written or already holds another job."""


class ResourceError(CvxqError):
    """Not enough memory (or another machine resource) for the requested settings."""


class FormatError(CvxqError):
    """A packed model on disk that is corrupt, truncated or of another format version."""


class JobCancelled(CvxqError):
    """The user stopped the job; what was finished is kept and the job can resume."""

    exit_code = ExitCode.INTERRUPTED
