"""Run screen: the job in a thread worker; its events fill the progress bar, the per-layer
table, the cost sparklines and the log. Cancel stops it at the next work unit and leaves the
output folder resumable."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, RichLog, Sparkline, Static
from textual.worker import get_current_worker

from ...errors import JobCancelled
from ...events import (Allocation, Finished, LayerDone, LayerInfo, Log, StageFinished, StageProgress,
                       StageStarted)
from ...spec import JobSpec
from .. import backend
from ..messages import JobEnded, JobEvent
from .dialogs import ConfirmDialog

# Rough share of a job's time per stage (measured on the default model) so that the overall
# bar and its ETA move at a steady pace across stages.
STAGE_WEIGHTS = {"load": 4, "evaluate": 8, "calibrate": 20, "plan": 8, "allocate": 1, "quantize": 50,
                 "save": 4}


class OverallProgress:
    """Maps stage events to one 0..100 figure over the stages this job will run."""

    def __init__(self, spec: JobSpec):
        self.stages = ["load"] + (["evaluate"] if spec.evaluate else []) + ["calibrate"]
        self.stages += ["plan", "allocate"] if spec.method == "cvxq" else []
        self.stages += ["quantize", "save"] + (["evaluate"] if spec.evaluate else [])
        self.total = sum(STAGE_WEIGHTS[s] for s in self.stages)
        self.index = -1

    def _before(self, i: int) -> float:
        return sum(STAGE_WEIGHTS[s] for s in self.stages[:i])

    def started(self, stage: str) -> float:
        for i in range(self.index + 1, len(self.stages)):
            if self.stages[i] == stage:
                self.index = i
                break
        return self.percent(0.0)

    def percent(self, fraction: float) -> float:
        if self.index < 0:
            return 0.0
        w = STAGE_WEIGHTS[self.stages[self.index]]
        return 100.0 * (self._before(self.index) + w * min(fraction, 1.0)) / self.total


class RunScreen(Screen):
    BINDINGS = [
        Binding("escape,x", "cancel_or_back", "Cancel/back"),
        Binding("r", "resume", "Resume", show=False),
    ]

    def __init__(self, spec: JobSpec):
        super().__init__()
        self.spec = spec
        self.state = "running"              # running | cancelling | cancelled | failed | finished
        self.token = None
        self.cancel_requested = False
        self.allocation: Optional[Allocation] = None
        self.seconds: list[float] = []
        self.bits: list[float] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("starting…", id="stage")
        yield ProgressBar(total=100, show_eta=True, id="overall")
        yield DataTable(id="run-layers", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="cost-row"):
            yield Static("s/layer ", classes="chart-label")
            yield Sparkline([], id="secs-spark")
            yield Static(" bits ", classes="chart-label")
            yield Sparkline([], id="bits-spark")
        yield RichLog(id="log", max_lines=500, wrap=True, markup=False)
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#run-layers", DataTable)
        for key, label in (("layer", "layer"), ("shape", "shape"), ("s", "s"), ("bits", "bits"),
                           ("kb", "KB"), ("dist", "dist"), ("mse", "mse")):
            table.add_column(label, key=key)
        self.start()

    def start(self) -> None:
        self.state, self.cancel_requested, self.token = "running", False, None
        self.progress = OverallProgress(self.spec)
        self.seconds, self.bits = [], []
        self.query_one("#run-layers", DataTable).clear()
        self.query_one("#overall", ProgressBar).update(progress=0)
        self.log_line(f"$ {self.spec.batch_command()}")
        self.run_job(self.spec)

    def log_line(self, text: str) -> None:
        self.query_one("#log", RichLog).write(text)

    def set_stage(self, text: str) -> None:
        self.query_one("#stage", Static).update(text)

    # -- the worker -------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="job")
    def run_job(self, spec: JobSpec) -> None:
        from ..app import user_message

        worker = get_current_worker()
        token = backend.new_cancel_token()
        self.token = token
        if self.cancel_requested or worker.is_cancelled:
            token.set()
        self.app.register_busy(TokenCanceller(token))
        try:
            report, keep = backend.run_job(spec, lambda e: self.post_message(JobEvent(e)), token,
                                           preview=self.app.preview)
        except JobCancelled as e:
            self.post_message(JobEnded("cancelled", str(e)))
        except Exception as e:  # every failure reaches the UI as a message, not a traceback
            self.post_message(JobEnded("failed", user_message(e)))
        else:
            self.post_message(JobEnded("finished", report=report, out_dir=str(Path(spec.out).expanduser()),
                                       preview=keep))
        finally:
            self.app.unregister_busy(TokenCanceller(token))

    # -- events -------------------------------------------------------------------------
    def on_job_event(self, msg: JobEvent) -> None:
        e = msg.event
        bar = self.query_one("#overall", ProgressBar)
        if isinstance(e, StageStarted):
            bar.update(progress=self.progress.started(e.stage))
            if self.state == "running":
                self.set_stage(f"[b]{e.stage}[/b] {e.detail}")
            self.log_line(f"{e.stage} started")
        elif isinstance(e, StageProgress):
            if e.total:
                bar.update(progress=self.progress.percent(e.done / e.total))
            if self.state == "running":
                self.set_stage(f"[b]{e.stage}[/b] {e.done}/{e.total}  {e.detail}")
        elif isinstance(e, StageFinished):
            bar.update(progress=self.progress.percent(1.0))
            self.log_line(f"{e.stage} finished in {e.seconds:.1f} s")
        elif isinstance(e, LayerInfo):
            table = self.query_one("#run-layers", DataTable)
            if e.name not in table.rows:
                table.add_row(e.name, f"{e.shape[0]}x{e.shape[1]}", "", "", "", "", "", key=e.name)
        elif isinstance(e, LayerDone):
            self._layer_done(e)
        elif isinstance(e, Allocation):
            self.allocation = e
            self.log_line(f"allocation solved (log2 λ = {e.log2_lambda:.2f})")
        elif isinstance(e, Log):
            self.log_line(f"[{e.level}] {e.message}")
        elif isinstance(e, Finished):
            self.log_line(f"wrote {e.out_dir}")

    def _layer_done(self, e: LayerDone) -> None:
        table = self.query_one("#run-layers", DataTable)
        values = {"s": f"{e.seconds:.2f}", "bits": f"{e.bits:.2f}", "kb": f"{e.bytes / 1e3:.0f}",
                  "dist": f"{e.distortion:.3g}", "mse": f"{e.mse:.2e}"}
        if e.name in table.rows:
            for key, value in values.items():
                table.update_cell(e.name, key, value, update_width=True)
            table.move_cursor(row=table.get_row_index(e.name))
        self.seconds.append(e.seconds)
        self.bits.append(e.bits)
        self.query_one("#secs-spark", Sparkline).data = list(self.seconds)
        self.query_one("#bits-spark", Sparkline).data = list(self.bits)
        self.app.draft.run_layers[e.name] = e

    def on_job_ended(self, msg: JobEnded) -> None:
        self.state = msg.status
        if msg.status == "finished":
            from .results import ResultsScreen

            if msg.preview is not None:
                self.app.keep_preview(msg.preview)

            self.query_one("#overall", ProgressBar).update(progress=100)
            self.set_stage("[b]finished[/b]")
            self.app.switch_screen(ResultsScreen(self.spec, msg.report, msg.out_dir, self.allocation))
        elif msg.status == "cancelled":
            self.set_stage("[b]cancelled[/b] — finished layers are kept · r resumes · esc goes back")
            self.log_line(msg.message)
            self.app.notify("job cancelled; r resumes it", title="Run")
        else:
            self.set_stage("[b]failed[/b] · esc goes back")
            self.log_line(f"error: {msg.message}")
            self.app.show_error("The job failed", msg.message)

    # -- keys ---------------------------------------------------------------------------
    def action_cancel_or_back(self) -> None:
        if self.state in ("cancelled", "failed", "finished"):
            self.app.pop_screen()
        elif self.state == "running":
            self.app.push_screen(ConfirmDialog("Cancel the job?\nFinished layers are kept; "
                                               "r resumes it later.", yes="Cancel job", no="Keep running"),
                                 self._confirmed_cancel)

    def _confirmed_cancel(self, yes: Optional[bool]) -> None:
        if yes and self.state == "running":
            self.cancel()

    def cancel(self) -> None:
        self.state = "cancelling"
        self.cancel_requested = True
        if self.token is not None:
            self.token.set()
        self.set_stage("[b]cancelling…[/b] (stops after the current work unit)")

    def action_resume(self) -> None:
        if self.state != "cancelled":
            return
        self.spec = dataclasses.replace(self.spec, resume=True, overwrite=False)
        self.start()


@dataclasses.dataclass(frozen=True)
class TokenCanceller:
    """What the app cancels on quit: hashable by token so register/unregister pair up."""
    token: object

    def cancel(self) -> None:
        self.token.set()
