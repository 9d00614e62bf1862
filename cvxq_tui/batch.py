"""Headless front end: renders pipeline events as rich progress bars on a terminal, or as
one plain line per event otherwise (logs, CI, pipes)."""

from __future__ import annotations

import sys
import time

from .events import (Allocation, Finished, LayerDone, Log, StageFinished, StageProgress,
                     StageStarted)


class PlainRenderer:
    """One line per event, flushed, no control characters."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self._last = {}

    def __call__(self, e) -> None:
        line = None
        if isinstance(e, StageStarted):
            line = f"[stage] {e.stage} started" + (f" ({e.total} units)" if e.total else "")
        elif isinstance(e, StageFinished):
            line = f"[stage] {e.stage} finished in {e.seconds:.1f}s"
        elif isinstance(e, StageProgress):
            # At most one line per stage every 2 s, plus the last one.
            now = time.monotonic()
            if e.done >= e.total or now - self._last.get(e.stage, 0) > 2.0:
                self._last[e.stage] = now
                line = f"[{e.stage}] {e.done}/{e.total} {e.detail}".rstrip()
        elif isinstance(e, LayerDone):
            line = (f"[layer] {e.name} {e.shape[0]}x{e.shape[1]} {e.bits:.3f} bits/w {e.bytes} B "
                    f"{e.seconds:.2f}s mse={e.mse:.3g}")
        elif isinstance(e, Allocation):
            line = f"[allocate] solved: log2 lambda = {e.log2_lambda:.3f}"
        elif isinstance(e, Log):
            line = f"[{e.level}] {e.message}"
        elif isinstance(e, Finished):
            line = f"[done] wrote {e.out_dir}"
        if line:
            print(line, file=self.stream, flush=True)


class RichRenderer:
    """Progress bars with stage, current layer and ETA."""

    def __init__(self, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = console
        self.progress = Progress(TextColumn("[bold]{task.fields[stage]:<10}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), TextColumn("{task.fields[detail]}"),
                                 console=console, transient=False)
        self.tasks = {}

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def _task(self, stage, total):
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total or None, stage=stage, detail="")
        return self.tasks[stage]

    def __call__(self, e) -> None:
        if isinstance(e, StageStarted):
            self._task(e.stage, e.total)
        elif isinstance(e, StageProgress):
            t = self._task(e.stage, e.total)
            self.progress.update(t, completed=e.done, total=e.total, detail=e.detail[-48:])
        elif isinstance(e, StageFinished):
            t = self._task(e.stage, 0)
            task = self.progress.tasks[[x.id for x in self.progress.tasks].index(t)]
            self.progress.update(t, completed=task.total or 1, total=task.total or 1, detail=f"{e.seconds:.1f}s")
        elif isinstance(e, Log):
            self.console.log(e.message)
        elif isinstance(e, LayerDone):
            pass  # the quantize bar shows the layer; details land in report.json


def summary_table(report: dict):
    from rich.table import Table

    t = report["totals"]
    tab = Table(title="cvxq-tui result", show_header=True)
    tab.add_column("what")
    tab.add_column("value", justify="right")
    tab.add_row("bits/weight (all-in)", f"{t['bits_per_weight']:.3f}")
    tab.add_row("model file", f"{t['model_mb']:.2f} MB")
    for k, v in t["perplexity_before"].items():
        tab.add_row(f"perplexity {k} (float)", f"{v:.3f}")
    for k, v in t["perplexity_after"].items():
        tab.add_row(f"perplexity {k} (quantized)", f"{v:.3f}")
    tab.add_row("time", f"{t['seconds_total']:.0f} s")
    tab.add_row("peak memory", f"{t['peak_rss_mb']:.0f} MB")
    return tab
