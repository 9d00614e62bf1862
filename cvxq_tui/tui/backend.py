"""The pipeline calls the workstation makes from worker threads. Screens call these
functions (never torch or the core); the pipeline is imported lazily here so the UI appears
before torch has finished importing."""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Optional

from ..events import Allocation
from ..spec import JobSpec
from .state import LayerMeta, ModelLayout


def probe_model(spec: JobSpec) -> ModelLayout:
    """Load the model once to list every quantizable layer. The layer choices are cleared
    (the table shows all layers) and the smallest calibration set is tokenized, since the
    probe only needs the model."""
    from ..pipeline import Job

    probe = dataclasses.replace(spec, include=[], exclude=[], pin=[], text=None, evaluate=False,
                                calib_samples=1, seq_len=16, resume=False, overwrite=False)
    job = Job(probe)
    job.load()
    layers = []
    for name, mod in job.layers:
        dense = mod.weight.numel() * mod.weight.element_size()
        if mod.bias is not None:
            dense += mod.bias.numel() * mod.bias.element_size()
        layers.append(LayerMeta(name, (mod.out_features, mod.in_features), mod.weight.numel(), dense))
    return ModelLayout(job.loaded.info.name, tuple(layers), job.rest_bytes)


class Preview:
    """A CVXQ job taken as far as its plans (calibration + distortion curves), so that a new
    budget or new pins only re-solve the allocation (about a second)."""

    def __init__(self, spec: JobSpec, on_event: Callable, cancel):
        from ..pipeline import Job

        # The preview never writes anything; it evaluates nothing.
        self.job = Job(dataclasses.replace(spec, evaluate=False), on_event, cancel)
        self.layer_names: frozenset[str] = frozenset()
        # allocate() is not re-entrant on one job; budget edits come faster than solves.
        self._lock = threading.Lock()

    def build(self) -> None:
        self.job.load()
        self.layer_names = frozenset(n for n, _ in self.job.layers)
        self.job.calibrate()
        self.job.plan()

    def allocate(self, bits: Optional[float], size: Optional[int],
                 pins: list[tuple[str, int]]) -> Allocation:
        with self._lock:
            # Pins only change the solve, never the plans: swap them into the job's spec.
            self.job.spec = dataclasses.replace(self.job.spec, pin=list(pins))
            return self.job.allocate(bits=bits, size=size)

    def cancel(self) -> None:
        self.job.cancel.set()


def new_cancel_token():
    from ..pipeline import CancelToken

    return CancelToken()


def run_job(spec: JobSpec, on_event: Callable, cancel) -> dict:
    """The whole job, exactly as `cvxq-tui --batch` runs it."""
    from ..pipeline import Job

    return Job(spec, on_event, cancel).run()
