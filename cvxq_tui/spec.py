"""The job spec: everything that defines a compression job, validated once, shared by the
batch CLI and the TUI."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Optional

from .errors import InputError

METHODS = ("cvxq", "rtn", "gptq")
QUANTIZERS = ("laplace", "uniform", "lloyd")
SENSITIVITIES = ("fisher", "grad", "hessian")
DEVICES = ("cpu", "cuda", "auto")

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "k": 10**3, "mb": 10**6, "m": 10**6, "gb": 10**9, "g": 10**9,
          "kib": 2**10, "ki": 2**10, "mib": 2**20, "mi": 2**20, "gib": 2**30, "gi": 2**30}


def parse_size(text: str) -> int:
    """'60MB' -> 60_000_000 bytes (MB = 10^6, MiB = 2^20)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise InputError(f"--size {text!r} is not a size; write e.g. 60MB, 58.5MiB or 1.2GB")
    value = float(m.group(1))
    unit = (m.group(2) or "b").lower()
    if unit not in _UNITS:
        raise InputError(f"--size {text!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB (or KiB, MiB, GiB)")
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise InputError(f"--size {text!r} must be positive")
    return size


def parse_pin(text: str) -> tuple[str, int]:
    """'model.layers.0.*=4' -> ('model.layers.0.*', 4)."""
    glob, sep, bits = text.rpartition("=")
    if not sep or not glob:
        raise InputError(f"--pin {text!r}: write GLOB=BITS, e.g. --pin 'model.layers.0.*=4'")
    try:
        b = int(bits)
    except ValueError:
        raise InputError(f"--pin {text!r}: BITS must be an integer 0..8") from None
    if not 0 <= b <= 8:
        raise InputError(f"--pin {text!r}: BITS must be between 0 and 8")
    return glob, b


@dataclass
class JobSpec:
    model: Optional[str] = None          # None: the built-in default (SmolLM2-135M)
    text: Optional[str] = None           # calibration text file/dir; None: built-in
    eval_text: Optional[str] = None      # evaluation text file/dir; None: built-in
    out: str = "cvxq-out"
    method: str = "cvxq"
    bits: Optional[float] = None         # average bits per quantized weight, all-in
    size: Optional[int] = None           # bytes of the output folder's model files
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    pin: list[tuple[str, int]] = field(default_factory=list)
    quantizer: str = "laplace"
    sensitivity: str = "fisher"
    group_rows: int = 128                # rows per CVXQ group (multiple of 32); 128 beat 64 (README)
    gptq_group: int = 0                  # RTN/GPTQ group along inputs; 0 = chosen from budget
    calib_samples: int = 32
    seq_len: int = 256
    # 24 windows x 512 tokens per text: the ratio after/before has a standard error of about
    # 2% (measured 1.7% / 1.4% at 40 windows on the default job) at 60% of the cost of 40.
    eval_samples: int = 24
    eval_seq_len: int = 512
    ood_eval: bool = True                # also evaluate on the built-in other-domain text
    rounds: int = 1                      # sensitivity re-estimation rounds (CVXQ)
    # Both off by default: measured on the default model at 3.0 bits (bench/defaults.py,
    # README), turning either on made in-domain perplexity no better and out-of-domain worse.
    error_feedback: bool = False         # GPTQ-style error feedback inside CVXQ
    bias_correction: bool = False        # b -= (W^ - W) E[x]; adds a bias to layers without one
    device: str = "cpu"
    seed: int = 0
    evaluate: bool = True
    resume: bool = False
    overwrite: bool = False

    DEFAULT_BITS = 3.0

    def validate(self) -> "JobSpec":
        if self.method not in METHODS:
            raise InputError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.quantizer not in QUANTIZERS:
            raise InputError(f"--quantizer {self.quantizer!r} is not one of {', '.join(QUANTIZERS)}")
        if self.sensitivity not in SENSITIVITIES:
            raise InputError(f"--sensitivity {self.sensitivity!r} is not one of {', '.join(SENSITIVITIES)}")
        if self.device not in DEVICES:
            raise InputError(f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.bits is not None and self.size is not None:
            raise InputError("give either --bits or --size, not both")
        if self.bits is None and self.size is None:
            self.bits = self.DEFAULT_BITS
        if self.bits is not None and not (0.0 < self.bits <= 16.0):
            raise InputError(f"--bits {self.bits} is outside (0, 16]; typical values are 2.5 to 4")
        if self.group_rows % 32 or not 32 <= self.group_rows <= 4096:
            raise InputError(f"--group-rows {self.group_rows} must be a multiple of 32 between 32 and 4096")
        if self.gptq_group and (self.gptq_group % 32 or not 32 <= self.gptq_group <= 4096):
            raise InputError(f"--gptq-group {self.gptq_group} must be a multiple of 32 between 32 and 4096")
        for name in ("calib_samples", "seq_len", "eval_samples", "eval_seq_len"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        if self.seq_len < 16 or self.eval_seq_len < 16:
            raise InputError("--seq-len and --eval-seq-len must be at least 16 tokens")
        if self.rounds < 1:
            raise InputError("--rounds must be at least 1")
        return self

    def budget_text(self) -> str:
        return f"{self.bits:g} bits/weight" if self.bits is not None else f"{self.size / 1e6:.2f} MB"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["pin"] = [list(p) for p in self.pin]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "JobSpec":
        d = dict(d)
        d["pin"] = [tuple(p) for p in d.get("pin", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def identity(self) -> str:
        """What makes two runs the same job (for --resume): everything but run-only flags."""
        d = self.to_dict()
        for k in ("resume", "overwrite", "evaluate", "device"):
            d.pop(k, None)
        return json.dumps(d, sort_keys=True)

    def batch_command(self) -> str:
        """The exact `cvxq-tui --batch ...` command that reproduces this job."""
        import shlex

        parts = ["cvxq-tui", "--batch"]
        defaults = JobSpec()
        def opt(name, value):
            parts.extend([f"--{name}", str(value)])
        if self.model:
            opt("model", self.model)
        if self.text:
            opt("text", self.text)
        if self.eval_text:
            opt("eval-text", self.eval_text)
        if self.bits is not None:
            opt("bits", f"{self.bits:g}")
        else:
            opt("size", f"{self.size}B")
        for f in ("method", "quantizer", "sensitivity", "group_rows", "gptq_group", "calib_samples",
                  "seq_len", "eval_samples", "eval_seq_len", "rounds", "seed", "out", "device"):
            v = getattr(self, f)
            if v != getattr(defaults, f):
                opt(f.replace("_", "-"), v)
        for g in self.include:
            opt("include", g)
        for g in self.exclude:
            opt("exclude", g)
        for g, b in self.pin:
            opt("pin", f"{g}={b}")
        if self.error_feedback != defaults.error_feedback:
            parts.append("--error-feedback" if self.error_feedback else "--no-error-feedback")
        if self.bias_correction != defaults.bias_correction:
            parts.append("--bias-correction" if self.bias_correction else "--no-bias-correction")
        if not self.evaluate:
            parts.append("--no-eval")
        return " ".join(shlex.quote(p) for p in parts)
