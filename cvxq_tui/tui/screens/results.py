"""Results screen: what the job produced (size, bits/weight, perplexities), how the bits were
spread, the predicted rate-distortion curve, where the output is and how to reproduce it."""

from __future__ import annotations

from typing import Optional

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from ...events import Allocation
from ...spec import JobSpec
from ..charts import bar_rows, bits_histogram
from ..state import FP32_BYTES


def summary_table(report: dict) -> Table:
    t = report["totals"]
    tab = Table(show_header=False, box=None, padding=(0, 1))
    tab.add_column(style="bold")
    tab.add_column(justify="right")
    tab.add_row("bits/weight (all-in)", f"{t['bits_per_weight']:.3f}")
    if "model_bytes" in t:
        fp32 = FP32_BYTES * t["quantized_weights"] + t["unquantized_bytes"]
        tab.add_row("model file", f"{t['model_mb']:.2f} MB  (×{fp32 / t['model_bytes']:.2f} vs fp32)")
    tab.add_row("quantized", f"{len(report['layers'])} layers, {t['quantized_weights'] / 1e6:.2f}M weights")
    before, after = t.get("perplexity_before", {}), t.get("perplexity_after", {})
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        tab.add_row(f"perplexity ({key})", f"{b:.3f} → {a:.3f}" if b and a else f"{a or b:.3f}")
    if not before and not after:
        tab.add_row("perplexity", "not measured (evaluation off)")
    tab.add_row("time", f"{t['seconds_total']:.0f} s")
    return tab


def rd_chart(allocation: Optional[Allocation], bits: float) -> Text:
    if allocation is None or not allocation.rd_curve:
        return Text("no rate-distortion curve (only CVXQ solves one)", style="dim")
    nearest = min(allocation.rd_curve, key=lambda p: abs(p[0] - bits))
    rows = [(f"{b:.2f} b/w", d, f"{d:.3g}") for b, d in allocation.rd_curve]
    return bar_rows(rows, width=28, mark=f"{nearest[0]:.2f} b/w")


class ResultsScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Back"), Binding("n", "new", "New job")]

    def __init__(self, spec: JobSpec, report: dict, out_dir: str, allocation: Optional[Allocation]):
        super().__init__()
        self.spec, self.report, self.out_dir, self.allocation = spec, report, out_dir, allocation

    def compose(self) -> ComposeResult:
        r = self.report
        bits = r["totals"]["bits_per_weight"]
        yield Header()
        with VerticalScroll(id="results"):
            yield Static(f"[b]Done[/b]  {bits:.3f} bits/weight · {self.spec.method}", id="results-title")
            yield Static(summary_table(r), id="summary")
            yield Static("[b]Layers per bits/weight[/b]", classes="section")
            yield Static(bits_histogram([row["bits"] for row in r["layers"]]), id="histogram")
            yield Static("[b]Predicted distortion vs bits/weight[/b] (this budget highlighted)", classes="section")
            yield Static(rd_chart(self.allocation, bits), id="rd")
            yield Static("[b]Output[/b]", classes="section")
            yield Static(Text(f"{self.out_dir}  (model.safetensors, report.json)"), id="out-dir")
            yield Static("[b]Reproduce[/b]", classes="section")
            yield Static(Text(r.get("command") or self.spec.batch_command()), id="command")
        yield Footer()

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_new(self) -> None:
        from .start import StartScreen

        while not isinstance(self.app.screen, StartScreen) and len(self.app.screen_stack) > 2:
            self.app.pop_screen()
