"""Small text charts (rich Text) that fit an 80-column terminal: horizontal bars and a
histogram. Textual's Sparkline covers the per-layer series; these label their values."""

from __future__ import annotations

from typing import Sequence

from rich.text import Text

_EIGHTHS = " ▏▎▍▌▋▊▉█"


def bar(value: float, top: float, width: int) -> str:
    """A bar of `width` cells at full scale, drawn in eighths of a cell."""
    if top <= 0 or value <= 0:
        return ""
    eighths = round(min(value / top, 1.0) * width * 8)
    return "█" * (eighths // 8) + (_EIGHTHS[eighths % 8] if eighths % 8 else "")


def bar_rows(rows: Sequence[tuple[str, float, str]], width: int = 30, style: str = "cyan",
             mark: str | None = None) -> Text:
    """One line per (label, value, shown value); the row labelled `mark` is highlighted."""
    out = Text()
    if not rows:
        return out
    top = max(v for _, v, _ in rows)
    lw = max(len(label) for label, _, _ in rows)
    for label, value, shown in rows:
        hl = label == mark
        out.append(f"{label:>{lw}} ", style="bold" if hl else "")
        out.append(f"{bar(value, top, width):<{width}}", style="bold yellow" if hl else style)
        out.append(f" {shown}\n", style="bold" if hl else "dim")
    out.rstrip()
    return out


def histogram(values: Sequence[float], lo: float = 0.0, hi: float = 8.0,
              bins: int = 8) -> list[tuple[str, int]]:
    """Counts of values in equal bins of [lo, hi] (the top bin includes hi)."""
    step = (hi - lo) / bins
    counts = [0] * bins
    for v in values:
        i = min(max(int((v - lo) / step), 0), bins - 1)
        counts[i] += 1
    return [(f"{lo + i * step:g}-{lo + (i + 1) * step:g}", c) for i, c in enumerate(counts)]


def bits_histogram(values: Sequence[float], width: int = 30) -> Text:
    """Layers per bits/weight bin, over the range the values actually span."""
    if not values:
        return Text("no layers", style="dim")
    lo, hi = int(min(values)), int(max(values)) + 1
    bins = histogram(values, lo, hi, bins=max(min((hi - lo) * 2, 12), 2))
    return bar_rows([(f"{label} b", float(c), f"{c} layer" + ("" if c == 1 else "s")) for label, c in bins], width)


def scatter(points: Sequence[tuple[float, float]], width: int = 44, height: int = 7,
            reference: float | None = None, mark: float | None = None, log_y: bool = True,
            x_label: str = "bits/weight", ref_label: str = "fp32") -> Text:
    """Points (x, y) on a character grid, y on a log scale by default (perplexity explodes at
    low bits). `reference` is drawn as a dotted line (the float model); the point whose x is
    `mark` is highlighted. Labels: y at top/bottom, x at both ends and at every point."""
    import math

    pts = [(x, y) for x, y in points if y > 0 and math.isfinite(y)]
    if not pts:
        return Text("no points yet", style="dim")
    f = (lambda v: math.log(v)) if log_y else (lambda v: v)
    ys = [y for _, y in pts] + ([reference] if reference else [])
    y_lo, y_hi = f(min(ys)), f(max(ys))
    x_lo, x_hi = min(x for x, _ in pts), max(x for x, _ in pts)
    if y_hi - y_lo < 1e-12:
        y_lo, y_hi = y_lo - 1, y_hi + 1
    if x_hi - x_lo < 1e-12:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5

    def col(x: float) -> int:
        return round((x - x_lo) / (x_hi - x_lo) * (width - 1))

    def row(y: float) -> int:  # row 0 at the top
        return round((y_hi - f(y)) / (y_hi - y_lo) * (height - 1))

    grid = [[(" ", "")] * width for _ in range(height)]
    if reference:
        r = row(reference)
        grid[r] = [("┄", "dim green")] * width
    for x, y in sorted(pts):
        hl = mark is not None and abs(x - mark) < 1e-6
        grid[row(y)][col(x)] = ("◆", "bold yellow") if hl else ("●", "cyan")
    labels = {0: max(ys), height - 1: min(ys)}
    if reference:
        labels[row(reference)] = reference
    lw = max(len(f"{v:.4g}") for v in labels.values())
    out = Text()
    for r in range(height):
        label = f"{labels[r]:.4g}" if r in labels else ""
        out.append(f"{label:>{lw}} ", style="dim")
        out.append("│", style="dim")
        for ch, style in grid[r]:
            out.append(ch, style=style)
        if reference and r == row(reference):
            out.append(f" {ref_label}", style="dim green")
        out.append("\n")
    out.append(" " * lw + " └" + "─" * width + "\n", style="dim")
    ticks = [" "] * (width + 8)
    for x, _ in sorted(pts):
        s = f"{x:.2f}"
        c = col(x)
        start = min(max(c - len(s) // 2, 0), width + 8 - len(s))
        if all(ch == " " for ch in ticks[max(start - 1, 0):start + len(s) + 1]):
            ticks[start:start + len(s)] = list(s)
    out.append(" " * (lw + 2) + "".join(ticks).rstrip() + f"  {x_label}", style="dim")
    return out
