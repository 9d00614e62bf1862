"""Start screen: the job's options, each validated as it is typed, and the resulting model
size shown live."""

from __future__ import annotations

from typing import Optional

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, Select, Static

from ...errors import CvxqError
from ...spec import METHODS
from ..state import budget_text, check_model_path, check_out_path, check_text_path, parse_budget

EXISTING = [("stop if it holds a job", "refuse"), ("resume its job", "resume"),
            ("overwrite it", "overwrite")]
PROBE_DELAY_S = 0.8  # wait for the user to stop typing before loading a model


class StartScreen(Screen):
    BINDINGS = [
        Binding("f2", "layers", "Layers"),
        Binding("f5,ctrl+r", "run", "Run"),
    ]

    def __init__(self):
        super().__init__()
        self.problems: dict[str, str] = {}   # field id -> why it is not usable
        self._probe_timer = None

    def compose(self) -> ComposeResult:
        spec = self.app.draft.spec
        yield Header()
        with Vertical(id="start-form"):
            yield self._field("Model", Input(spec.model or "", id="model", compact=True,
                                             placeholder="empty: built-in SmolLM2-135M"))
            yield self._field("Calib text", Input(spec.text or "", id="text", compact=True,
                                                  placeholder="empty: built-in Python docs"))
            yield self._field("Eval text", Input(spec.eval_text or "", id="eval-text", compact=True,
                                                 placeholder="empty: built-in (disjoint)"))
            yield self._field("Method", Select([(m, m) for m in METHODS], value=spec.method,
                                               allow_blank=False, id="method", compact=True))
            yield self._field("Budget", Input(budget_text(spec.bits, spec.size), id="budget",
                                              compact=True, placeholder="3.25 (bits/weight) or 60MB"))
            yield self._field("Output", Input(spec.out, id="out", compact=True))
            existing = "resume" if spec.resume else "overwrite" if spec.overwrite else "refuse"
            yield self._field("If it exists", Select(EXISTING, value=existing, allow_blank=False,
                                                     id="existing", compact=True))
        yield Static(id="estimate")
        yield Static(id="model-status")
        yield Static("F2 layers · F5 run · F1 help · ctrl+q quit", id="start-hint")
        yield Footer()

    @staticmethod
    def _field(label: str, widget) -> Horizontal:
        return Horizontal(Label(label, classes="field-label"), widget,
                          Static("", id=f"{widget.id}-note", classes="field-note"), classes="field")

    def on_mount(self) -> None:
        for field_id in ("model", "text", "eval-text", "budget", "out"):
            self._validate(field_id, self.query_one(f"#{field_id}", Input).value, initial=True)
        self.query_one("#model", Input).focus()
        self.sync()

    def on_screen_resume(self) -> None:
        # The layers screen edits the budget with +/-: show what the draft holds now.
        spec = self.app.draft.spec
        budget = self.query_one("#budget", Input)
        if "budget" not in self.problems and budget.value != budget_text(spec.bits, spec.size):
            budget.value = budget_text(spec.bits, spec.size)
        self.sync()

    # -- validation --------------------------------------------------------------------
    def _note(self, field_id: str, ok: bool, note: str) -> None:
        widget = self.query_one(f"#{field_id}-note", Static)
        widget.update(("✓ " if ok else "✗ ") + note)
        widget.set_class(not ok, "bad")
        if ok:
            self.problems.pop(field_id, None)
        else:
            self.problems[field_id] = note

    def _validate(self, field_id: str, value: str, initial: bool = False) -> None:
        draft = self.app.draft
        spec = draft.spec
        value_or_none = value.strip() or None
        if field_id == "model":
            ok, note = check_model_path(value)
            self._note("model", ok, note)
            if ok and value_or_none != spec.model:
                spec.model = value_or_none
                self._schedule_probe()
        elif field_id in ("text", "eval-text"):
            ok, note = check_text_path(value)
            self._note(field_id, ok, note)
            if ok and not initial:
                setattr(spec, "text" if field_id == "text" else "eval_text", value_or_none)
                if field_id == "text":
                    draft.allocation_stale = draft.allocation is not None  # other calibration
        elif field_id == "budget":
            try:
                bits, size = parse_budget(value)
            except CvxqError as e:
                self._note("budget", False, "e.g. 3.25 or 60MB")
                self.problems["budget"] = str(e)
                return
            self._note("budget", True, "bits/weight" if bits is not None else "model size")
            if (bits, size) != (spec.bits, spec.size):
                spec.bits, spec.size = bits, size
                self.app.budget_changed()
        elif field_id == "out":
            ok, note = check_out_path(value)
            self._note("out", ok, note)
            if ok:
                spec.out = value.strip()

    def _schedule_probe(self) -> None:
        if self._probe_timer is not None:
            self._probe_timer.stop()
        self._probe_timer = self.set_timer(PROBE_DELAY_S, self.app.model_changed)

    def on_input_changed(self, event: Input.Changed) -> None:
        self._validate(event.input.id, event.value)
        self.sync()

    def on_select_changed(self, event: Select.Changed) -> None:
        spec = self.app.draft.spec
        if event.select.id == "method":
            spec.method = str(event.value)
        elif event.select.id == "existing":
            spec.resume, spec.overwrite = event.value == "resume", event.value == "overwrite"
        self.sync()

    # -- rendering ---------------------------------------------------------------------
    def sync(self) -> None:
        app = self.app
        est = app.draft.estimate()
        self.query_one("#estimate", Static).update(f"[b]Result[/b]  {est.line()}")
        self.query_one("#model-status", Static).update(app.layout_status)

    # -- actions -----------------------------------------------------------------------
    def action_layers(self) -> None:
        from .layers import LayersScreen

        self.app.push_screen(LayersScreen())

    def action_run(self) -> None:
        start_run(self.app, self.problems)


def start_run(app, problems: Optional[dict[str, str]] = None) -> None:
    """Open the run screen on the draft, or say what stops it."""
    from .run import RunScreen

    if problems:
        app.show_error("Cannot run yet", "\n".join(f"{k}: {v}" for k, v in problems.items()))
        return
    try:
        spec = app.draft.to_spec()
    except CvxqError as e:
        app.show_error("Cannot run yet", str(e))
        return
    app.push_screen(RunScreen(spec))
