"""Layers screen: every quantizable layer with its include/pin choice and, once known, its
bits, bytes and distortion; the budget's effect and (CVXQ) the re-solved allocation."""

from __future__ import annotations

import fnmatch
import os
from typing import Optional

from rich.text import Text
from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Sparkline, Static

from ..state import LayerMeta

COLUMNS = [("inc", "✓"), ("layer", "layer"), ("shape", "shape"), ("params", "params"), ("pin", "pin"),
           ("bits", "bits"), ("kb", "KB"), ("dist", "dist")]
BUDGET_STEP = 0.25
PIN_KEYS = {str(d): d for d in range(9)}
UNPIN_KEYS = {"minus", "backspace", "delete", "u"}


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def matches(name: str, pattern: str) -> bool:
    """A glob when it has wildcards, else a plain substring (quicker to type)."""
    if not pattern:
        return True
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


class LayersScreen(Screen):
    BINDINGS = [
        Binding("space", "toggle", "In/out"),
        Binding("p", "pin", "Pin"),
        Binding("slash", "filter", "Filter"),
        Binding("plus,equals_sign", "budget(1)", "+bits"),
        Binding("minus", "budget(-1)", "-bits"),
        Binding("c", "preview", "Plan"),
        Binding("a", "include_all", "All", show=False),
        Binding("escape", "back", "Back"),
        Binding("f5,ctrl+r", "run", "Run"),
    ]

    def __init__(self):
        super().__init__()
        self.pattern = ""
        self.pin_for: Optional[str] = None   # the layer waiting for its pin digit
        self.prefix = ""                      # shared by every layer name; shown once, in the header
        self._shown: dict[str, list] = {}     # the cells each row shows now

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="budget-line")
        yield Input(placeholder="/ filter: glob (model.layers.1*.mlp.*) or text", id="filter", compact=True)
        yield DataTable(id="layers", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="chart-row"):
            yield Static("bits/layer ", classes="chart-label")
            yield Sparkline([], id="bits-spark")
        yield Static(id="layers-status")
        yield Footer()

    def on_mount(self) -> None:
        self.build_columns()
        self.query_one("#layers", DataTable).focus()
        self.sync()

    def on_screen_resume(self) -> None:
        self.sync()

    # -- table ---------------------------------------------------------------------------
    def _short(self, name: str) -> str:
        return name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name

    def _cells(self, m: LayerMeta) -> list:
        d = self.app.draft
        inc = d.included.get(m.name, True)
        done = d.run_layers.get(m.name)
        bits = kb = dist = ""
        if done is not None:
            bits, kb, dist = f"{done.bits:.2f}", f"{done.bytes / 1e3:.0f}", f"{done.distortion:.3g}"
        elif not inc:
            bits, kb = "fp32", f"{m.dense_bytes / 1e3:.0f}"
        elif d.allocation is not None and m.name in d.allocation.layer_bits:
            b = d.allocation.layer_bits[m.name]
            bits, kb = f"{b:.2f}", f"{b * m.params / 8e3:.0f}"
        pin = d.pins.get(m.name)
        return [Text("✓", style="green") if inc else Text("·", style="red"), self._short(m.name),
                f"{m.shape[0]}x{m.shape[1]}", fmt_params(m.params), "" if pin is None else str(pin),
                bits, kb, dist]

    def build_columns(self) -> None:
        """Columns once the layout is known: 80 columns cannot spare the shared prefix
        (model.layers.) in every row."""
        table = self.query_one("#layers", DataTable)
        layout = self.app.draft.layout
        if layout is None or table.columns:
            return
        names = layout.names
        prefix = os.path.commonprefix(names)
        self.prefix = prefix[: prefix.rfind(".") + 1]
        for key, label in COLUMNS:
            table.add_column(f"layer ({self.prefix}…)" if key == "layer" and self.prefix else label, key=key)
        self.fill_table()

    def fill_table(self) -> None:
        table = self.query_one("#layers", DataTable)
        layout = self.app.draft.layout
        current = self._cursor_name()
        table.clear()
        if layout is None:
            return
        self._shown = {}
        for m in layout.layers:
            if matches(m.name, self.pattern):
                cells = self._cells(m)
                table.add_row(*cells, key=m.name)
                self._shown[m.name] = cells
        if current is not None and current in table.rows:
            table.move_cursor(row=table.get_row_index(current))

    def refresh_rows(self) -> None:
        table = self.query_one("#layers", DataTable)
        layout = self.app.draft.layout
        if layout is None:
            return
        if not table.columns:
            self.build_columns()  # the layout arrived after the screen opened
            return
        if len(table.rows) == 0 and any(matches(m.name, self.pattern) for m in layout.layers):
            self.fill_table()  # the layout arrived after the screen opened
            return
        for m in layout.layers:
            if m.name in table.rows:
                cells = self._cells(m)
                if self._shown.get(m.name) == cells:
                    continue  # one keypress changes a row or two, not 210 x 8 cells
                old = self._shown.get(m.name) or [None] * len(cells)
                for (key, _), value, before in zip(COLUMNS, cells, old):
                    if value != before:
                        table.update_cell(m.name, key, value, update_width=True)
                self._shown[m.name] = cells

    def _cursor_name(self) -> Optional[str]:
        table = self.query_one("#layers", DataTable)
        if table.row_count == 0:
            return None
        return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value

    # -- rendering -----------------------------------------------------------------------
    def sync(self) -> None:
        self.query_one("#budget-line", Static).update(
            f"[b]{self.app.draft.spec.method}[/b]  {self.app.draft.estimate().line()}")
        self.refresh_rows()
        self.sync_status()

    def sync_status(self) -> None:
        """The status line and the sparkline only: preview progress comes many times a
        second and must not rewrite every row of a 200-layer table."""
        app, d = self.app, self.app.draft
        series = self._bits_series()
        self.query_one("#bits-spark", Sparkline).data = series
        if self.pin_for is not None:
            status = f"pin {self.pin_for}: press 0-8, - to unpin, esc to cancel"
        elif d.layout is None:
            status = app.layout_status
        elif d.allocation_stale:
            status = "the selection changed since the plan: c re-plans"
        elif app.preview_status:
            status = app.preview_status
        else:
            status = "c: calibrate + plan to see CVXQ's allocation" if d.spec.method == "cvxq" else \
                f"{d.spec.method}: one depth for every layer"
        if series:
            status += f"  ·  bits min {min(series):.2f} max {max(series):.2f}"
        self.query_one("#layers-status", Static).update(status)

    def _bits_series(self) -> list[float]:
        d = self.app.draft
        if d.layout is None:
            return []
        if d.run_layers:
            return [d.run_layers[m.name].bits for m in d.layout.layers if m.name in d.run_layers]
        if d.allocation is not None:
            return [d.allocation.layer_bits[m.name] for m in d.layout.layers
                    if m.name in d.allocation.layer_bits]
        return []

    # -- keys ----------------------------------------------------------------------------
    def action_toggle(self) -> None:
        name = self._cursor_name()
        if name is None:
            return
        self.app.draft.toggle(name)
        self.sync()

    def action_include_all(self) -> None:
        d = self.app.draft
        for name in d.included:
            if not d.included[name]:
                d.toggle(name)
        self.sync()

    def action_pin(self) -> None:
        self.pin_for = self._cursor_name()
        self.sync()

    def on_key(self, event: events.Key) -> None:
        # The key after p picks the pin; it must not reach the bindings (- is also -bits).
        if self.pin_for is None:
            return
        name, self.pin_for = self.pin_for, None
        event.stop()
        event.prevent_default()
        if event.key in PIN_KEYS:
            self.app.draft.pin(name, PIN_KEYS[event.key])
        elif event.key in UNPIN_KEYS:
            self.app.draft.pin(name, None)
        else:
            self.sync()
            return
        self.app.budget_changed()  # pins re-solve the allocation, like a new budget

    def action_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        self.pattern = event.value.strip()
        self.fill_table()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.query_one("#layers", DataTable).focus()

    def action_budget(self, direction: int) -> None:
        d = self.app.draft
        est = d.estimate()
        current = d.spec.bits if d.spec.bits is not None else (est.bits or 3.0)
        # Snap to the step grid so that + then - returns to the same budget.
        new = round(current / BUDGET_STEP + direction) * BUDGET_STEP
        d.spec.bits, d.spec.size = min(max(new, BUDGET_STEP), 16.0), None
        self.app.budget_changed()

    def action_preview(self) -> None:
        self.app.start_preview()

    def action_back(self) -> None:
        if self.query_one("#filter", Input).has_focus:
            self.query_one("#layers", DataTable).focus()
        else:
            self.app.pop_screen()

    def action_run(self) -> None:
        from .start import StartScreen, start_run

        starts = [s for s in self.app.screen_stack if isinstance(s, StartScreen)]
        start_run(self.app, starts[0].problems if starts else None)
