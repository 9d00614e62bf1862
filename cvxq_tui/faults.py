"""Fault injection for the crash-safety tests; inert unless its environment variables are set.

CVXQ_TEST_KILL_AT=POINT[:N][=SIG][,...] makes the process send itself SIGKILL (or SIG: INT,
TERM...) the N-th time (default 1) it passes POINT. SIGKILL gives no chance to clean up,
exactly like a power cut or the OOM killer; INT/TERM test the clean stop. Points the
pipeline passes:
    calibrate            after each calibration step (windows of a forward/backward pass)
    calibrated           calibration finished, before its checkpoint is written
    plan                 a layer planned, before its checkpoint is written
    allocate             the budget solved
    quantize             a layer quantized, before its checkpoint is written
    write:FILE           a temporary file written, before it is renamed into place as FILE
                         (FILE is the final name: model.safetensors, report.json, ...)
    saved                the packed model written, before evaluation and the report

CVXQ_TEST_FAIL_WRITE=ERRNO[:FILE] makes writing FILE (any file without it) fail with that
errno (ENOSPC, EACCES, EROFS, EDQUOT...), as a full or read-only disk would.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import Optional

KILL_ENV = "CVXQ_TEST_KILL_AT"
FAIL_WRITE_ENV = "CVXQ_TEST_FAIL_WRITE"

_passes: dict[str, int] = {}


def _targets(value: str) -> dict[str, tuple[int, int]]:
    """POINT -> (pass number, signal)."""
    out = {}
    for item in filter(None, (s.strip() for s in value.split(","))):
        item, _, sig = item.partition("=")
        signum = getattr(signal, "SIG" + sig.upper().removeprefix("SIG")) if sig else signal.SIGKILL
        head, sep, tail = item.rpartition(":")
        if sep and tail.isdigit():
            out[head] = (int(tail), signum)
        else:
            out[item] = (1, signum)
    return out


def point(name: str) -> None:
    """Marks a place where a crash test may kill the process."""
    value = os.environ.get(KILL_ENV)
    if not value:
        return
    _passes[name] = _passes.get(name, 0) + 1
    target = _targets(value).get(name)
    if target is not None and target[0] == _passes[name]:
        os.kill(os.getpid(), target[1])


def injected_write_error(filename: str) -> Optional[OSError]:
    """The OSError a test asked writing `filename` to fail with, if any."""
    value = os.environ.get(FAIL_WRITE_ENV)
    if not value:
        return None
    code, _, target = value.partition(":")
    if target and target != filename:
        return None
    num = getattr(errno, code, errno.EIO)
    return OSError(num, os.strerror(num), filename)
