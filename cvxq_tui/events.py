"""Events the pipeline emits; front ends (batch, TUI) render them. Plain dataclasses, no
dependencies, so both front ends and the tests can use them."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

# Model loads that a cancel left running in their threads (pipeline._cancellable: loading
# has no cancel points); the CLI looks at them when it exits (cli._exit).
abandoned_loads: list = []


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


class LazyList(Sequence):
    """A read-only list computed on first use (the RD curve costs a dozen solves; most
    allocations are never asked for it)."""

    def __init__(self, compute: Callable[[], list]):
        self._compute: Optional[Callable[[], list]] = compute
        self._items: Optional[list] = None
        self._lock = threading.Lock()

    def _get(self) -> list:
        with self._lock:
            if self._items is None:
                self._items = list(self._compute())
                self._compute = None  # drop what the computation held
            return self._items

    def __getitem__(self, i):
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())

    def __eq__(self, other) -> bool:
        return list(self) == list(other)

    def __repr__(self) -> str:
        return repr(self._get()) if self._items is not None else "LazyList(<not computed>)"


@dataclass
class Allocation:
    """The solved allocation: per-layer average depth, the multiplier and the RD curve
    (a list, or a LazyList computed when first read)."""
    layer_bits: dict[str, float]
    log2_lambda: float
    rd_curve: Sequence[tuple[float, float]] = field(default_factory=list)  # (bits/weight, distortion)


@dataclass
class Log:
    message: str
    level: str = "info"   # info | warning


@dataclass
class Finished:
    report: dict[str, Any]
    out_dir: Optional[str] = None


Event = Any
