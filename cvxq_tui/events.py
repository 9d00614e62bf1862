"""Events the pipeline emits; front ends (batch, TUI) render them. Plain dataclasses, no
dependencies, so both front ends and the tests can use them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class StageStarted:
    stage: str            # load | calibrate | allocate | quantize | evaluate | save
    total: int = 0        # work units in the stage (0 = unknown)
    detail: str = ""


@dataclass
class StageProgress:
    stage: str
    done: int
    total: int
    detail: str = ""      # e.g. the current layer


@dataclass
class StageFinished:
    stage: str
    seconds: float


@dataclass
class LayerInfo:
    """A quantizable layer, announced before the work starts."""
    name: str
    shape: tuple[int, int]
    params: int


@dataclass
class LayerDone:
    name: str
    shape: tuple[int, int]
    bits: float           # all-in bits per weight of this layer
    bytes: int            # bytes on disk of this layer (payload + side information)
    seconds: float
    distortion: float     # predicted output distortion (allocation model)
    mse: float            # mean squared weight error


@dataclass
class Allocation:
    """The solved allocation: per-layer average depth, the multiplier and the RD curve."""
    layer_bits: dict[str, float]
    log2_lambda: float
    rd_curve: list[tuple[float, float]] = field(default_factory=list)  # (bits/weight, distortion)


@dataclass
class Log:
    message: str
    level: str = "info"   # info | warning


@dataclass
class Finished:
    report: dict[str, Any]
    out_dir: Optional[str] = None


Event = Any
