"""Calibration: statistics of each quantizable layer's inputs and the sensitivity of the
model's output to each weight.

Sensitivity estimators (all return g2[r, j] ~ E[(dz/dW[r, j])^2] per layer):
- ``fisher``: z = the LM loss. One backward pass per calibration sequence of the
  sign-randomised sum z = sum_t s_t * nll_t (s_t = +-1): E[(dz/dW)^2] = sum_t (dnll_t/dW)^2
  because the cross terms have zero mean, so one backward gives an unbiased estimate of the
  summed per-token squares that would otherwise need one backward per token.
- ``grad`` (CVXQ): z = v . h_t on the final hidden states (output head removed), v cycling
  through the top principal directions of h, positions every ``stride`` tokens, combined with
  random signs the same way.
- ``hessian``: no back-propagation; g2[r, j] = E[x_j^2] (the diagonal of the layer's input
  second moment), the same for every row. Fast, but blind to how much each layer matters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import JobCancelled

ProgressFn = Callable[[int, int, str], None]


@dataclass
class InputStats:
    count: int
    x_mean: torch.Tensor            # [n] mean input (bias correction)
    x_sq: torch.Tensor              # [n] E[x^2]
    hessian: Optional[torch.Tensor]  # [n, n] E[x x^T] (GPTQ / error feedback), or None


def _check_cancel(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise JobCancelled("cancelled during calibration; rerun with --resume to continue")


class InputStatsRecorder:
    """Hooks on every layer's input that accumulate InputStats over the forward passes run
    while installed (a separate pass, or the sensitivity pass itself). Layers fed the same
    tensor (q/k/v, gate/up) share one set of statistics. Call new_pass() before each
    forward."""

    def __init__(self, layers, need_hessian: bool):
        self.layers = layers
        self.need_hessian = need_hessian
        self.sums: dict[str, dict] = {}
        self.alias: dict[str, str] = {}
        # Inputs seen in the current forward pass, kept alive so their memory cannot be reused
        # by a later tensor with the same address during the pass.
        self.seen_in_step: dict[int, tuple[str, torch.Tensor]] = {}
        self.handles = []

    def __enter__(self):
        self.handles = [mod.register_forward_pre_hook(self._hook_for(name)) for name, mod in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.seen_in_step.clear()
        return False

    def new_pass(self) -> None:
        self.seen_in_step.clear()

    def _hook_for(self, name):
        def hook(module, args):
            x = args[0].detach()
            key = x.data_ptr()
            hit = self.seen_in_step.get(key)
            if hit is not None and hit[0] != name and hit[1].shape == x.shape:
                self.alias[name] = hit[0]
                return
            self.seen_in_step[key] = (name, x)
            x2 = x.reshape(-1, x.shape[-1]).float()
            s = self.sums.get(name)
            if s is None:
                n = x2.shape[1]
                s = self.sums[name] = {"count": 0, "sum": torch.zeros(n, dtype=torch.float64),
                                       "sq": torch.zeros(n, dtype=torch.float64),
                                       "h": torch.zeros(n, n) if self.need_hessian else None}
            s["count"] += x2.shape[0]
            s["sum"] += x2.sum(0, dtype=torch.float64)
            s["sq"] += (x2 * x2).sum(0, dtype=torch.float64)
            if self.need_hessian:
                s["h"].addmm_(x2.T, x2)
        return hook

    def result(self) -> dict[str, InputStats]:
        stats: dict[str, InputStats] = {}
        for name, s in self.sums.items():
            c = s["count"]
            h = s["h"] / c if s["h"] is not None else None
            stats[name] = InputStats(c, (s["sum"] / c).float(), (s["sq"] / c).float(), h)
        for name, owner in self.alias.items():
            if name not in stats:
                stats[name] = stats[owner]
        return stats


def collect_input_stats(model, layers, windows: torch.Tensor, *, need_hessian: bool,
                        on_progress: Optional[ProgressFn] = None, cancel=None,
                        batch_size: int = 4) -> dict[str, InputStats]:
    """One forward pass over the windows with hooks on every layer's input."""
    n = windows.shape[0]
    with InputStatsRecorder(layers, need_hessian) as rec, torch.inference_mode():
        for i in range(0, n, batch_size):
            _check_cancel(cancel)
            rec.new_pass()
            model(windows[i:i + batch_size])
            if on_progress:
                on_progress(min(n, i + batch_size), n, "input statistics")
    return rec.result()


def _base_model(model):
    return getattr(model, model.base_model_prefix, model)


def _principal_directions(model, windows, k: int, batch_size: int) -> torch.Tensor:
    base = _base_model(model)
    cov = None
    with torch.inference_mode():
        for i in range(0, windows.shape[0], batch_size):
            h = base(windows[i:i + batch_size]).last_hidden_state.float()
            h = h.reshape(-1, h.shape[-1])
            cov = h.T @ h if cov is None else cov + h.T @ h
    evals, evecs = torch.linalg.eigh(cov.double())
    return evecs[:, -k:].flip(1).T.float().contiguous()  # [k, d], largest first


def collect_sensitivity(model, layers, windows: torch.Tensor, *, estimator: str,
                        input_stats: Optional[dict[str, InputStats]] = None, seed: int = 0,
                        stride: int = 16, directions: int = 16,
                        on_progress: Optional[ProgressFn] = None,
                        cancel=None, record: Optional[InputStatsRecorder] = None) -> dict[str, torch.Tensor]:
    """Returns g2 per layer: [m, n] for fisher/grad; [1, n] (broadcast over rows) for hessian.
    With ``record`` (fisher/grad), the input statistics are gathered during the same forward
    passes, so calibration needs no separate statistics pass."""
    if estimator == "hessian":
        if input_stats is None:
            raise ValueError("hessian sensitivity needs the input statistics")
        return {name: input_stats[name].x_sq.reshape(1, -1).clone() for name, _ in layers}

    params = [mod.weight for _, mod in layers]
    was = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    g2 = {name: torch.zeros_like(mod.weight, dtype=torch.float32) for name, mod in layers}
    gen = torch.Generator().manual_seed(seed)
    n = windows.shape[0]
    dirs = _principal_directions(model, windows, directions, 4) if estimator == "grad" else None
    base = _base_model(model)
    hooks = record if record is not None else contextlib.nullcontext()
    try:
        with hooks:
            _sensitivity_loop(model, base, layers, windows, estimator, g2, gen, dirs, stride, record,
                              on_progress, cancel)
    finally:
        for p, r in was.items():
            p.requires_grad_(r)
            p.grad = None
    for name in g2:
        g2[name] /= n
        # A weight the data never touched still costs something when it changes.
        floor = g2[name].mean() * 1e-6 + 1e-30
        g2[name].clamp_(min=float(floor))
    return g2


def _sensitivity_loop(model, base, layers, windows, estimator, g2, gen, dirs, stride, record,
                      on_progress, cancel) -> None:
    n = windows.shape[0]
    for i in range(n):
        _check_cancel(cancel)
        ids = windows[i:i + 1]
        T = ids.shape[1]
        if record is not None:
            record.new_pass()
        if estimator == "fisher":
            logits = model(ids).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
            signs = torch.randint(0, 2, (T - 1,), generator=gen).float() * 2 - 1
            z = (signs * nll).sum()
        elif estimator == "grad":
            h = base(ids).last_hidden_state[0].float()
            pos = torch.arange(int(torch.randint(0, stride, (1,), generator=gen)), T, stride)
            signs = torch.randint(0, 2, (len(pos),), generator=gen).float() * 2 - 1
            v = dirs[i % dirs.shape[0]]
            z = (signs * (h[pos] @ v)).sum()
        else:
            raise ValueError(f"unknown sensitivity estimator {estimator!r}")
        z.backward()
        with torch.no_grad():
            for (name, mod) in layers:
                g = mod.weight.grad
                g2[name].addcmul_(g, g)
                mod.weight.grad = None
        if on_progress:
            on_progress(i + 1, n, "sensitivity")
