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
