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
    if windows.ndim != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise TextError(
            f"No evaluation windows to score (shape {tuple(windows.shape)}). Fix: use a longer "
            "evaluation text or a shorter --seq-len."
        )
    total = windows.shape[0]
    device = _device_of(model)
    nll_sum = 0.0
    n_tokens = 0
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
                # Summed in float32 per batch, accumulated in float64 across batches.
                nll = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                    batch[:, 1:].reshape(-1),
                    reduction="sum",
                )
                nll_sum += float(nll)
                n_tokens += batch[:, 1:].numel()
                del logits
                if on_progress is not None:
                    on_progress(min(start + batch_size, total), total)
    finally:
        model.train(was_training)
    return math.exp(nll_sum / n_tokens)
