"""What the user is composing in the workstation: the job options, the model's layer list,
per-layer include/pin choices and the size estimate. Plain Python (no textual, no torch) so
the screens share one source of truth and the tests can check it directly."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import InputError
from ..events import Allocation, LayerDone
from ..spec import JobSpec, parse_size

# Before the default model is loaded the estimate uses its known layout: 210 linears in the
# decoder blocks, and the fp32 embedding (49152 x 576) plus norms saved as they are.
DEFAULT_QUANTIZED_PARAMS = 106_168_320
DEFAULT_UNQUANTIZED_BYTES = 113_300_000
FP32_BYTES = 4


@dataclass(frozen=True)
class LayerMeta:
    name: str
    shape: tuple[int, int]     # (out_features, in_features)
    params: int
    dense_bytes: int           # bytes on disk when left unquantized (weight + bias)


@dataclass(frozen=True)
class ModelLayout:
    """The quantizable layers of a loaded model and the bytes of everything else."""
    model_name: str
    layers: tuple[LayerMeta, ...]
    other_bytes: int           # tensors that are never quantized (embeddings, norms, ...)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


@dataclass(frozen=True)
class Estimate:
    bits: Optional[float]      # all-in bits per quantized weight (None: budget infeasible)
    size_bytes: Optional[int]
    ratio: Optional[float]     # fp32 size / estimated size
    quantized_params: int
    n_layers: int
    from_model: bool           # False: built-in constants for the default model
    problem: str = ""

    def line(self) -> str:
        src = "" if self.from_model else " (default model, before loading)"
        if self.problem:
            return f"{self.problem}{src}"
        return (f"≈ {self.size_bytes / 1e6:.1f} MB · {self.bits:.2f} bits/w · ×{self.ratio:.1f} vs fp32 · "
                f"{self.n_layers} layers, {self.quantized_params / 1e6:.1f}M params{src}")


def parse_budget(text: str) -> tuple[Optional[float], Optional[int]]:
    """'3.25' -> bits per weight; '60MB' / '58MiB' -> model size in bytes."""
    text = text.strip()
    if not text:
        raise InputError("budget is empty; type bits per weight (e.g. 3) or a size (e.g. 60MB)")
    try:
        bits = float(text)
    except ValueError:
        return None, parse_size(text)
    if not 0.0 < bits <= 16.0:
        raise InputError(f"{bits:g} bits/weight is outside (0, 16]; typical values are 2.5 to 4")
    return bits, None


def budget_text(bits: Optional[float], size: Optional[int]) -> str:
    return f"{bits:g}" if bits is not None else f"{size / 1e6:g}MB"


def check_model_path(text: str) -> tuple[bool, str]:
    """Validation shown next to the model field while typing: (usable, note)."""
    if not text.strip():
        return True, "built-in SmolLM2-135M"
    p = Path(text.strip()).expanduser()
    if not p.exists():
        return False, "no such path"
    if p.is_file():
        return (True, "GGUF file") if p.suffix.lower() == ".gguf" else (False, "not a .gguf file")
    if (p / "config.json").is_file():
        return True, "HF folder"
    if any(p.glob("*.gguf")):
        return False, "folder with .gguf: pick the file"
    return False, "no config.json here"


def check_text_path(text: str) -> tuple[bool, str]:
    if not text.strip():
        return True, "built-in text"
    p = Path(text.strip()).expanduser()
    if not p.exists():
        return False, "no such path"
    return True, "folder" if p.is_dir() else "file"


def check_out_path(text: str) -> tuple[bool, str]:
    if not text.strip():
        return False, "give an output folder"
    p = Path(text.strip()).expanduser()
    if p.exists() and not p.is_dir():
        return False, "is a file"
    if p.is_dir() and any(p.iterdir()):
        if (p / "report.json").is_file():
            return True, "holds a finished job"
        return True, "holds a job" if (p / "job.json").is_file() else "not empty"
    return True, "new folder" if not p.exists() else "empty folder"


@dataclass
class Draft:
    """The job being composed. `spec` keeps the options; layer choices live per layer once
    the layout is known and are turned back into globs by to_spec()."""
    spec: JobSpec
    layout: Optional[ModelLayout] = None
    included: dict[str, bool] = field(default_factory=dict)
    pins: dict[str, int] = field(default_factory=dict)
    allocation: Optional[Allocation] = None
    allocation_stale: bool = False     # the selection changed since the preview was planned
    run_layers: dict[str, LayerDone] = field(default_factory=dict)

    # -- layout -------------------------------------------------------------------------
    def set_layout(self, layout: ModelLayout) -> None:
        """Per-layer choices from the spec's globs, with the pipeline's own rules (the
        pipeline is already imported by the worker that produced the layout)."""
        from ..pipeline import pinned_depth, select_layers

        self.layout = layout
        pairs = [(n, None) for n in layout.names]
        chosen = {n for n, _ in select_layers(pairs, self.spec)}
        self.included = {n: n in chosen for n in layout.names}
        self.pins = {n: d for n in layout.names if (d := pinned_depth(n, self.spec)) is not None}
        self.allocation, self.run_layers = None, {}

    def toggle(self, name: str) -> None:
        self.included[name] = not self.included[name]
        self.allocation_stale = self.allocation is not None

    def pin(self, name: str, bits: Optional[int]) -> None:
        if bits is None:
            self.pins.pop(name, None)
        else:
            self.pins[name] = bits

    # -- estimate -----------------------------------------------------------------------
    def estimate(self) -> Estimate:
        if self.layout is None:
            q, u, n, exact = DEFAULT_QUANTIZED_PARAMS, DEFAULT_UNQUANTIZED_BYTES, 210, False
            if self.spec.model:
                return Estimate(None, None, None, 0, 0, True, "size estimate after the model loads")
        else:
            q = sum(m.params for m in self.layout.layers if self.included[m.name])
            u = self.layout.other_bytes + sum(m.dense_bytes for m in self.layout.layers
                                              if not self.included[m.name])
            n = sum(self.included.values())
            exact = True
        if q == 0:
            return Estimate(None, None, None, 0, 0, exact, "no layer selected")
        spec = self.spec
        if spec.bits is not None:
            bits, size = spec.bits, int(spec.bits * q / 8 + u)
        else:
            bits, size = 8 * (spec.size - u) / q, spec.size
            if bits <= 0:
                return Estimate(None, size, None, q, n, exact,
                                f"{size / 1e6:.1f} MB is below the unquantized part ({u / 1e6:.1f} MB)")
        return Estimate(bits, size, (FP32_BYTES * q + u) / size, q, n, exact)

    # -- back to a spec -----------------------------------------------------------------
    def to_spec(self) -> JobSpec:
        """The spec of the job to run: the options plus the layer choices as globs. The
        user's own globs are kept when they still describe the choice (shorter command)."""
        spec = dataclasses.replace(self.spec)
        if self.layout is not None:
            names = self.layout.names
            chosen = [n for n in names if self.included[n]]
            if not chosen:
                raise InputError("no layer is selected for quantization; include at least one (space)")
            base = Draft(self.spec)
            base.set_layout(self.layout)
            if base.included != self.included:
                dropped = [n for n in names if not self.included[n]]
                spec.include, spec.exclude = ([], dropped) if len(dropped) < len(chosen) else (chosen, [])
            if base.pins != self.pins:
                spec.pin = [(n, self.pins[n]) for n in names if n in self.pins]
        return spec.validate()
