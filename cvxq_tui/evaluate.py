"""Perplexity of a causal LM on token windows."""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from cvxq_tui.errors import JobCancelled, TextError


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


def _device_of(model: torch.nn.Module) -> torch.device:
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
    cancel: CancelFlag | None = None,
) -> float:
    """exp(mean next-token NLL) over every predicted token of every window
    (seq_len - 1 per window). ``windows`` is a LongTensor [n, seq_len].
    ``on_progress(done, total)`` is called with window counts after each batch; ``cancel``
    is polled between batches and raises JobCancelled when set."""
    nll = window_nlls(model, windows, batch_size=batch_size, on_progress=on_progress, cancel=cancel)
    # Every window predicts the same number of tokens: the mean of the window means is the
    # mean over all tokens.
    return math.exp(sum(nll) / len(nll))


def window_nlls(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    on_progress: Callable[[int, int], None] | None = None,
    cancel: CancelFlag | None = None,
) -> list[float]:
    """Mean next-token NLL of each window (its spread gives the perplexity's standard error)."""
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise TextError(
            f"No evaluation windows to score (shape {tuple(windows.shape)}). Fix: use a longer "
            "evaluation text or a shorter --seq-len."
        )
    total = windows.shape[0]
    device = _device_of(model)
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, total, batch_size):
                if cancel is not None and cancel.is_set():
                    raise JobCancelled(
                        f"Evaluation stopped after {start} of {total} windows. Fix: run the "
                        "job again to resume it."
                    )
                batch = windows[start:start + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                nll = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    batch[:, 1:].reshape(-1),
                    reduction="none",
                ).view(batch.shape[0], -1)
                out.extend(nll.double().mean(1).tolist())
                del logits
                if on_progress is not None:
                    on_progress(min(start + batch_size, total), total)
    finally:
        model.train(was_training)
    return out


def paired_se_pct(before: list[float], after: list[float]) -> float:
    """Standard error, in % of the perplexity ratio, of exp(mean(after - before)) from the
    spread of the per-window NLL differences (same windows for both)."""
    n = len(before)
    if n < 2 or len(after) != n:
        return float("nan")
    d = [a - b for a, b in zip(after, before)]
    m = sum(d) / n
    var = sum((x - m) ** 2 for x in d) / (n - 1)
    return 100.0 * math.sqrt(var / n)
