"""GPTQ-style error feedback (Frantar et al. 2022): quantize the columns of W in order and
push each column's rounding error onto the columns not yet quantized, through the inverse
Cholesky factor of the layer's input second moment H = E[x x^T]. Used by the GPTQ baseline
and, optionally, inside CVXQ. The quantizer is a callback so both share this loop."""

from __future__ import annotations

from typing import Callable

import torch

# quantize(j, ahead) -> reconstructed column j [m]. ahead = the error-updated columns j..
# (to the end of the current block, at least 128 or to the end of W): ahead[:, 0] is the
# column to quantize; the rest lets a group quantizer fix its parameters when a group starts.
ColumnQuantizer = Callable[[int, torch.Tensor], torch.Tensor]


def inverse_cholesky(h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 with GPTQ's dampening (damp * mean diag) and dead
    inputs (zero diagonal) made harmless."""
    h = h.double().clone()
    n = h.shape[0]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    lam = damp * torch.mean(torch.diag(h))
    for attempt in range(6):
        try:
            hd = h + torch.eye(n, dtype=h.dtype) * lam
            # U with H^-1 = U^T U, without forming H^-1: with J the order reversal,
            # J H J = L L^T gives H = (J L J)(J L J)^T, so U = (J L J)^-1 = J L^-1 J.
            # Same factor as cholesky(cholesky_inverse(cholesky(H)), upper=True), 3x cheaper.
            L = torch.linalg.cholesky(hd.flip(0, 1))
            linv = torch.linalg.solve_triangular(L, torch.eye(n, dtype=h.dtype), upper=False)
            return linv.flip(0, 1).float().contiguous()
        except RuntimeError:
            lam = lam * 10
    raise RuntimeError("input second moment is not positive definite even after dampening")


def error_feedback(w: torch.Tensor, h: torch.Tensor, quantize: ColumnQuantizer,
                   block: int = 128, damp: float = 0.01, cancel=None) -> torch.Tensor:
    """Returns the quantized weights [m, n]; quantize(j, ahead) is called for j = 0..n-1 in
    order. Groups along columns must not straddle blocks: block is a multiple of them."""
    w = w.float().clone()
    m, n = w.shape
    hinv = inverse_cholesky(h, damp)
    q = torch.empty_like(w)
    for b0 in range(0, n, block):
        if cancel is not None and cancel.is_set():
            from ..errors import JobCancelled
            raise JobCancelled("cancelled during quantization")
        b1 = min(n, b0 + block)
        wb = w[:, b0:b1].clone()
        err = torch.empty_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = wb[:, i]
            qc = quantize(b0 + i, wb[:, i:])
            q[:, b0 + i] = qc
            e = (col - qc) / hb[i, i]
            wb[:, i + 1:] -= e.unsqueeze(1) * hb[i, i + 1:].unsqueeze(0)
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    return q
