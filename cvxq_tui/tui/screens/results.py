"""Results screen: what the job produced (size, bits/weight, perplexities), how the bits were
spread, the predicted rate-distortion curve, where the output is and how to reproduce it, and
(key m) perplexity measured at budgets around the job's."""

from __future__ import annotations

import math
from typing import Optional

from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from ...errors import JobCancelled
from ...events import Allocation, StageProgress
from ...spec import JobSpec
from .. import backend
from ..charts import bar_rows, bits_histogram, scatter
from ..messages import MeasureEnded, MeasuredPoint, MeasureProgress
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


def measured_view(points: list[dict], float_ppl: Optional[dict], mark: Optional[float]) -> Text:
    """Measured perplexity against all-in bits/weight (log scale; the float model dotted),
    then the numbers: bits, perplexity per text, predicted distortion."""
    keys = sorted({k for p in points for k in p["perplexity"]} | set(float_ppl or {}))
    if not points or not keys:
        return Text("m: quantize + evaluate a few budgets around this one (reuses the calibration)",
                    style="dim")
    key = "eval" if "eval" in keys else keys[0]
    pts = sorted(points, key=lambda p: p["bits"])
    out = scatter([(p["bits"], p["perplexity"].get(key, math.nan)) for p in pts], width=40, height=7,
                  reference=(float_ppl or {}).get(key), mark=mark, ref_label="fp32")
    out.append(f"\n{'bits/w':>8}" + "".join(f"{'ppl ' + k:>11}" for k in keys) + f"{'pred. dist':>12}\n",
               style="bold")
    if float_ppl:
        out.append(f"{'fp32':>8}" + "".join(f"{float_ppl.get(k, math.nan):>11.3f}" for k in keys) + "\n")
    for p in pts:
        hl = mark is not None and abs(p["bits"] - mark) < 1e-6
        line = f"{p['bits']:>8.3f}" + "".join(f"{p['perplexity'].get(k, math.nan):>11.3f}" for k in keys)
        line += f"{p['distortion']:>12.4g}" if math.isfinite(p["distortion"]) else f"{'':>12}"
        out.append(line + "\n", style="bold yellow" if hl else "")
    out.rstrip()
    return out


class ResultsScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Back"), Binding("n", "new", "New job"),
                Binding("m", "measure", "Measure RD")]

    def __init__(self, spec: JobSpec, report: dict, out_dir: str, allocation: Optional[Allocation]):
        super().__init__()
        self.spec, self.report, self.out_dir, self.allocation = spec, report, out_dir, allocation
        totals = report["totals"]
        self.float_ppl: Optional[dict] = dict(totals.get("perplexity_before") or {}) or None
        # The job's own point, when it was evaluated; measurements add to it.
        self.points: list[dict] = []
        if totals.get("perplexity_after"):
            dist = sum(r["distortion"] for r in report["layers"]) if report["layers"] else math.nan
            self.points.append({"target_bits": None, "bits": totals["bits_per_weight"], "distortion": dist,
                                "perplexity": dict(totals["perplexity_after"])})
        self.measuring = False
        self.token = None

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
            yield Static("[b]Measured perplexity vs bits/weight[/b] (m measures)", classes="section")
            yield Static(id="rd-status", classes="rd-status")
            yield Static(measured_view(self.points, self.float_ppl, bits), id="rd-measured")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#results", VerticalScroll).focus()  # arrows / page keys scroll at once

    # -- measured rate-distortion ----------------------------------------------------------
    def action_measure(self) -> None:
        if self.measuring:
            return
        if self.spec.method != "cvxq":
            self.app.notify("measuring several budgets needs CVXQ's plans (rtn/gptq: run each budget)",
                            severity="warning")
            return
        bits = self.report["totals"]["bits_per_weight"]
        budgets = backend.rd_budgets(self.spec.bits if self.spec.bits is not None else round(bits * 4) / 4)
        if not self.points:  # the job was not evaluated: measure its own budget as well
            budgets = sorted(budgets + [self.spec.bits if self.spec.bits is not None else round(bits, 2)])
        self.measuring = True
        self.query_one("#results", VerticalScroll).scroll_end(animate=False)  # where the points appear
        self.query_one("#rd-status", Static).update(
            f"measuring {len(budgets)} budgets: " + ", ".join(f"{b:g}" for b in budgets) + " …")
        self.measure(self.spec, budgets, self.float_ppl)

    @work(thread=True, exclusive=True, group="measure")
    def measure(self, spec: JobSpec, budgets: list[float], float_ppl: Optional[dict]) -> None:
        from ..app import user_message
        from .run import TokenCanceller

        token = backend.new_cancel_token()
        self.token = token
        canceller = TokenCanceller(token)
        self.app.register_busy(canceller)
        def on_event(e) -> None:
            if isinstance(e, StageProgress):
                self.post_message(MeasureProgress(f"{e.stage} {e.done}/{e.total} {e.detail}"))

        def on_point(p: dict) -> None:
            self.post_message(MeasuredPoint(p))

        built = None
        try:
            preview = self.app.preview
            if preview is None or not preview.matches(spec):
                self.post_message(MeasureProgress("no calibration in memory for these settings: calibrating…"))
                built = preview = backend.Preview(spec, on_event, token)
                preview.build()
            preview.measure(spec, budgets, on_event, token, on_point=on_point, float_ppl=float_ppl)
        except JobCancelled:
            self.post_message(MeasureEnded("cancelled", preview=built))
        except Exception as e:  # shown in the UI, never as a traceback
            self.post_message(MeasureEnded("failed", user_message(e), preview=built))
        else:
            self.post_message(MeasureEnded("finished", preview=built))
        finally:
            self.app.unregister_busy(canceller)

    def on_measure_progress(self, msg: MeasureProgress) -> None:
        self.query_one("#rd-status", Static).update(Text(msg.text))

    def on_measured_point(self, msg: MeasuredPoint) -> None:
        p = msg.point
        if p["bits"] is None:
            self.float_ppl = dict(p["perplexity"])
        elif not any(abs(q["bits"] - p["bits"]) < 1e-9 for q in self.points):
            self.points.append(p)
        self.query_one("#rd-measured", Static).update(
            measured_view(self.points, self.float_ppl, self.report["totals"]["bits_per_weight"]))

    def on_measure_ended(self, msg: MeasureEnded) -> None:
        self.measuring = False
        if msg.preview is not None:
            self.app.keep_preview(msg.preview)
        n = len(self.points)
        text = {"finished": f"measured: {n} quantized point{'s' * (n != 1)} · m measures again",
                "cancelled": "measurement cancelled", "failed": f"measurement failed: {msg.message}"}[msg.status]
        self.query_one("#rd-status", Static).update(Text(text))
        if msg.status == "failed":
            self.app.show_error("Measurement failed", msg.message)

    def on_unmount(self) -> None:
        if self.token is not None:
            self.token.set()

    def action_back(self) -> None:
        self.app.pop_screen()

    def action_new(self) -> None:
        from .start import StartScreen

        while not isinstance(self.app.screen, StartScreen) and len(self.app.screen_stack) > 2:
            self.app.pop_screen()
