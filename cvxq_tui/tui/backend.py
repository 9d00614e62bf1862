"""The pipeline calls the workstation makes from worker threads. Screens call these
functions (never torch or the core); the pipeline is imported lazily here so the UI appears
before torch has finished importing."""

from __future__ import annotations

import contextlib
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


class ModelBusy(Exception):
    """The preview's model is in use by a run or a measurement."""


class Preview:
    """A CVXQ job taken as far as its plans (calibration + distortion curves), so that a new
    budget or new pins only re-solve the allocation (about a second), a run with the same
    calibration settings skips load/calibrate/plan, and budgets can be measured."""

    def __init__(self, spec: JobSpec, on_event: Callable, cancel, job=None):
        from ..pipeline import Job

        # The preview never writes anything; it evaluates nothing.
        self.job = job if job is not None else Job(dataclasses.replace(spec, evaluate=False), on_event, cancel)
        self.layer_names: frozenset[str] = frozenset(n for n, _ in getattr(self.job, "layers", []))
        # allocate() is not re-entrant on one job; budget edits come faster than solves.
        self._lock = threading.Lock()
        # Runs and measurements that borrow the model change its weights while they work.
        self._model_lock = threading.Lock()

    @classmethod
    def from_job(cls, job) -> "Preview":
        """A finished job kept for what it computed (the model goes back to its original
        weights)."""
        job.restore()
        job.emit = job.stages.emit = lambda e: None  # its run screen is gone
        return cls(job.spec, job.emit, None, job=job)

    def build(self) -> None:
        self.job.load()
        self.layer_names = frozenset(n for n, _ in self.job.layers)
        self.job.calibrate()
        self.job.plan()

    def matches(self, spec: JobSpec) -> bool:
        """Whether a job of `spec` can reuse this calibration and these plans."""
        from ..pipeline import calibration_key

        return spec.method == "cvxq" and bool(self.job.plans) and \
            calibration_key(spec) == calibration_key(self.job.spec)

    def allocate(self, bits: Optional[float], size: Optional[int],
                 pins: list[tuple[str, int]]) -> Allocation:
        with self._lock:
            # Pins only change the solve, never the plans: swap them into the job's spec.
            self.job.spec = dataclasses.replace(self.job.spec, pin=list(pins))
            return self.job.allocate(bits=bits, size=size)

    @contextlib.contextmanager
    def borrow_model(self):
        if not self._model_lock.acquire(blocking=False):
            raise ModelBusy("the model is busy with another run or measurement")
        try:
            yield
        finally:
            self._model_lock.release()

    def measure(self, spec: JobSpec, budgets: list[float], on_event: Callable, cancel,
                on_point: Callable[[dict], None] = lambda p: None,
                float_ppl: Optional[dict] = None) -> list[dict]:
        """Measured rate-distortion: for each budget, allocate, quantize in memory and
        evaluate `spec`'s evaluation texts. Each point goes to on_point as it is measured,
        first the float model's (bits None; measured unless given as float_ppl)."""
        from ..pipeline import Job

        spec = dataclasses.replace(spec, evaluate=True, resume=False, overwrite=False)
        with self.borrow_model():
            job = Job(spec, on_event, cancel)
            job.adopt(self.job)
            try:
                job.evals = job.eval_windows()
                if float_ppl is None:
                    float_ppl = job.perplexities("float")
                on_point({"target_bits": None, "bits": None, "distortion": 0.0, "perplexity": float_ppl})
                points = []
                for bits in budgets:
                    point = job.measure_budget(bits)
                    points.append(point)
                    on_point(point)
                return points
            finally:
                job.restore()

    def cancel(self) -> None:
        self.job.cancel.set()


def rd_budgets(bits: float, offsets=(-1.0, -0.5, 0.5, 1.0), lo: float = 1.5, hi: float = 8.0) -> list[float]:
    """The budgets measured around a job's own: a few steps either side, inside [lo, hi]."""
    return [round(bits + d, 2) for d in offsets if lo <= bits + d <= hi]


def new_cancel_token():
    from ..pipeline import CancelToken

    return CancelToken()


def run_job(spec: JobSpec, on_event: Callable, cancel, preview: Optional[Preview] = None):
    """The whole job, exactly as `cvxq-tui --batch` runs it. With a preview calibrated for
    the same settings (and not busy) the job starts from its calibration and plans instead
    of loading a second copy of the model. Returns (report, what to keep as the preview:
    the one used, or the finished CVXQ job's own calibration)."""
    from ..pipeline import Job

    job = Job(spec, on_event, cancel)
    if preview is not None and preview.matches(spec):
        try:
            with preview.borrow_model():
                job.adopt(preview.job)
                try:
                    return job.run(), preview
                finally:
                    job.restore()
        except ModelBusy:
            job = Job(spec, on_event, cancel)
    report = job.run()
    keep = Preview.from_job(job) if spec.method == "cvxq" and spec.rounds == 1 else None
    return report, keep
