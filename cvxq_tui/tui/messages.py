"""Messages that worker threads post to the UI thread (post_message is thread-safe;
Message.__post_init__ makes plain dataclasses valid messages)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from textual.message import Message

from ..events import Allocation


@dataclass
class LayoutReady(Message):
    layout: Any             # state.ModelLayout
    model: Optional[str]    # the model path it was probed for


@dataclass
class WorkFailed(Message):
    """A worker stopped with a user-facing error (str of a CvxqError) or was cancelled."""
    what: str               # layout | preview | allocate | job
    message: str
    cancelled: bool = False
    model: Optional[str] = None   # layout only: the model path it was probed for


@dataclass
class PreviewProgress(Message):
    text: str


@dataclass
class PreviewReady(Message):
    preview: Any            # backend.Preview


@dataclass
class AllocationReady(Message):
    allocation: Allocation
    budget: str


@dataclass
class JobEvent(Message):
    event: Any              # a cvxq_tui.events dataclass


@dataclass
class JobEnded(Message):
    status: str             # finished | cancelled | failed
    message: str = ""
    report: Optional[dict] = None
    out_dir: Optional[str] = None
    preview: Any = None     # backend.Preview the app may keep (the calibration the job used)


@dataclass
class MeasuredPoint(Message):
    """One measured rate-distortion point (see backend.Preview.measure)."""
    point: dict


@dataclass
class MeasureProgress(Message):
    text: str


@dataclass
class MeasureEnded(Message):
    status: str             # finished | cancelled | failed
    message: str = ""
    preview: Any = None     # a preview built for the measurement, for the app to keep
