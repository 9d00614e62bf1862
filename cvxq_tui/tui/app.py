"""The workstation app: owns the draft job (options + layer choices) and the background work
that outlives a screen (probing the model's layers, the CVXQ preview and its re-solves).
The job itself runs in the run screen's worker."""

from __future__ import annotations

import threading
from typing import Optional

from textual import work
from textual.app import App
from textual.binding import Binding
from textual.worker import WorkerState, get_current_worker

from ..errors import CvxqError, JobCancelled
from ..events import StageProgress, StageStarted
from ..spec import JobSpec
from . import backend
from .messages import AllocationReady, LayoutReady, PreviewProgress, PreviewReady, WorkFailed
from .screens.dialogs import ConfirmDialog, ErrorDialog
from .screens.help import HelpScreen
from .screens.start import StartScreen
from .state import Draft, ModelLayout, budget_text


def user_message(e: BaseException) -> str:
    """What the user sees for an error: a CvxqError's own message; anything else by type
    and text only (no traceback in the UI)."""
    if isinstance(e, CvxqError):
        return str(e)
    return f"unexpected error ({type(e).__name__}): {e}"


class CvxqApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "cvxq-tui"
    SUB_TITLE = "CVXQ quantization workstation"
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("f1", "help", "Help"),
        Binding("question_mark", "help", "Help", show=False),
    ]

    def __init__(self, spec: Optional[JobSpec] = None, layout: Optional[ModelLayout] = None):
        super().__init__()
        self.draft = Draft((spec or JobSpec()).validate())
        self._given_layout = layout      # tests and callers that already probed the model
        self.layout_status = "loading the model's layer list…"
        self.preview: Optional[backend.Preview] = None
        self.preview_status = ""
        self._busy: set = set()         # previews and jobs to cancel on quit
        self._alloc_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------
    def on_mount(self) -> None:
        if self._given_layout is not None:
            self._use_layout(self._given_layout)
        else:
            self.probe_layout(self.draft.spec)
        self.push_screen(StartScreen())

    def sync_screen(self) -> None:
        """Screens render from the draft; tell the visible one that it changed (others
        re-sync when they are shown again)."""
        sync = getattr(self.screen, "sync", None)
        if sync is not None and self.screen.is_mounted:  # a pushed screen composes later
            sync()

    def show_error(self, title: str, message: str) -> None:
        self.push_screen(ErrorDialog(title, message))

    def register_busy(self, thing) -> None:
        self._busy.add(thing)

    def unregister_busy(self, thing) -> None:
        self._busy.discard(thing)

    def job_running(self) -> bool:
        return any(w.group == "job" and w.state in (WorkerState.PENDING, WorkerState.RUNNING)
                   for w in self.workers)

    async def action_quit(self) -> None:
        if self.job_running():
            def answer(yes: Optional[bool]) -> None:
                if yes:
                    self._cancel_and_exit()
            self.push_screen(ConfirmDialog("A job is running. Cancel it and quit?\n"
                                           "Finished layers are kept; the job can resume.",
                                           yes="Quit", no="Keep running"), answer)
        else:
            self._cancel_and_exit()

    def _cancel_and_exit(self) -> None:
        # Worker threads cannot be killed: ask the pipeline to stop at its next work unit so
        # the process can exit promptly.
        for thing in list(self._busy):
            thing.cancel()
        self.exit()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    # -- the model's layers ---------------------------------------------------------------
    def model_changed(self) -> None:
        """The model path changed (and looks usable): forget the old layers and probe."""
        self.draft.layout = None
        self.preview, self.draft.allocation = None, None
        self.layout_status = "loading the model's layer list…"
        self.sync_screen()
        self.probe_layout(self.draft.spec)

    @work(thread=True, exclusive=True, group="layout")
    def probe_layout(self, spec: JobSpec) -> None:
        worker = get_current_worker()
        try:
            layout = backend.probe_model(spec)
        except Exception as e:  # shown in the UI; the worker must not die with a traceback
            if not worker.is_cancelled:
                self.post_message(WorkFailed("layout", user_message(e), model=spec.model))
            return
        if not worker.is_cancelled:
            self.post_message(LayoutReady(layout, spec.model))

    def on_layout_ready(self, msg: LayoutReady) -> None:
        if msg.model != self.draft.spec.model:
            return  # the user typed another path meanwhile
        self._use_layout(msg.layout)

    def _use_layout(self, layout: ModelLayout) -> None:
        try:
            self.draft.set_layout(layout)
        except CvxqError as e:  # the spec's globs do not fit this model: start from all layers
            self.draft.spec.include, self.draft.spec.exclude, self.draft.spec.pin = [], [], []
            self.draft.set_layout(layout)
            self.show_error("Layer choices reset", str(e))
        n = len(layout.layers)
        self.layout_status = f"{layout.model_name}: {n} quantizable layers"
        self.sync_screen()

    # -- the CVXQ preview ---------------------------------------------------------------
    def start_preview(self) -> None:
        d = self.draft
        if d.spec.method != "cvxq":
            self.notify("the allocation preview is CVXQ's (rtn/gptq use one fixed depth)", severity="warning")
            return
        try:
            spec = d.to_spec()
        except CvxqError as e:
            self.show_error("Cannot plan", str(e))
            return
        if self.preview is not None:
            self.preview.cancel()
        self.preview = None
        self.preview_status = "calibrating…"
        self.sync_screen()
        self.build_preview(spec)

    @work(thread=True, exclusive=True, group="preview")
    def build_preview(self, spec: JobSpec) -> None:
        worker = get_current_worker()

        def on_event(e) -> None:
            if isinstance(e, StageStarted):
                self.post_message(PreviewProgress(f"{e.stage}…"))
            elif isinstance(e, StageProgress):
                self.post_message(PreviewProgress(f"{e.stage} {e.done}/{e.total}"))

        preview = None
        try:
            preview = backend.Preview(spec, on_event, None)
            self.register_busy(preview)
            preview.build()
        except Exception as e:
            if not worker.is_cancelled:
                self.post_message(WorkFailed("preview", user_message(e), isinstance(e, JobCancelled)))
            return
        finally:
            if preview is not None:
                self.unregister_busy(preview)
        if not worker.is_cancelled:
            self.post_message(PreviewReady(preview))

    def keep_preview(self, preview: backend.Preview) -> None:
        """A calibration computed by a run or a measurement becomes the preview (one model
        in memory, not two), unless the user is building another one meanwhile."""
        if preview is self.preview or any(w.group == "preview" and w.state in (WorkerState.PENDING, WorkerState.RUNNING)
                                          for w in self.workers):
            return
        self.preview = preview
        self.draft.allocation_stale = False
        self.preview_status = "planned (calibration of the last job)"

    def on_preview_progress(self, msg: PreviewProgress) -> None:
        self.preview_status = msg.text
        sync_status = getattr(self.screen, "sync_status", None)
        if sync_status is not None and self.screen.is_mounted:
            sync_status()  # rows do not change while calibrating
        else:
            self.sync_screen()

    def on_preview_ready(self, msg: PreviewReady) -> None:
        self.preview = msg.preview
        self.draft.allocation_stale = False
        self.preview_status = "planned; solving the budget…"
        self.sync_screen()
        self.reallocate()

    def budget_changed(self) -> None:
        """Budget or pins changed: the estimate follows at once, a planned preview re-solves."""
        self.sync_screen()
        if self.preview is not None and self.draft.spec.method == "cvxq":
            self.reallocate()

    def reallocate(self) -> None:
        d = self.draft
        pins = [(n, b) for n, b in d.pins.items()]
        self.solve_budget(self.preview, d.spec.bits, d.spec.size, pins)

    @work(thread=True, exclusive=True, group="allocate")
    def solve_budget(self, preview, bits, size, pins) -> None:
        worker = get_current_worker()
        with self._alloc_lock:  # one solve at a time; a newer request cancels this one
            if worker.is_cancelled:
                return
            try:
                alloc = preview.allocate(bits, size, pins)
            except Exception as e:
                if not worker.is_cancelled:
                    self.post_message(WorkFailed("allocate", user_message(e)))
                return
        if not worker.is_cancelled:
            self.post_message(AllocationReady(alloc, budget_text(bits, size)))

    def on_allocation_ready(self, msg: AllocationReady) -> None:
        if msg.budget != budget_text(self.draft.spec.bits, self.draft.spec.size):
            return  # an older budget; the newer solve follows
        self.draft.allocation = msg.allocation
        self.preview_status = f"allocation for {msg.budget} bits/weight" if self.draft.spec.bits is not None \
            else f"allocation for {msg.budget}"
        self.sync_screen()

    # -- failures -----------------------------------------------------------------------
    def on_work_failed(self, msg: WorkFailed) -> None:
        if msg.what == "layout":
            if msg.model != self.draft.spec.model:
                return
            self.layout_status = f"cannot load the model: {msg.message}"
            self.notify(msg.message, title="Model", severity="error", timeout=8)
        elif msg.what == "preview":
            self.preview_status = "preview cancelled" if msg.cancelled else "preview failed"
            if not msg.cancelled:
                self.show_error("Preview failed", msg.message)
        elif msg.what == "allocate":
            # A budget out of reach while typing: say so where the budget is shown.
            self.draft.allocation = None
            self.preview_status = msg.message
            self.notify(msg.message, title="Budget", severity="warning", timeout=6)
        self.sync_screen()


def run_app(spec: Optional[JobSpec] = None) -> None:
    """Open the workstation on `spec` (from the command line options)."""
    CvxqApp(spec).run()
