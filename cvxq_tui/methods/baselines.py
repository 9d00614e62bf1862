"""Baselines in the same tool and format: round-to-nearest (RTN) and GPTQ with the usual
asymmetric min/max uniform grid, one (scale, zero) pair in float16 per group of
`group` consecutive input columns of a row. Stored as the transposed matrix W^T in the
packed format (a group of input columns of W is a group of rows of W^T), so their size is
counted exactly like CVXQ's: B + 32 / group bits per weight plus a shared depth byte."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..errors import BudgetError
from .gptq import error_feedback

SIDE_BITS_PER_GROUP = 32  # float16 loc + float16 scale


def group_sizes(widths: list[int]) -> list[int]:
    """Group sizes (multiples of 32) that divide every layer's input width, so every group
    is whole and the size is exactly B + 32 / group."""
    g = 0
    for w in widths:
        g = math.gcd(g, w)
    sizes = [s for s in range(32, min(4096, g) + 1, 32) if g % s == 0]
    return sizes or [32]


def fixed_config(bits: float, widths: list[int], group: int = 0) -> tuple[int, int]:
    """The highest depth B, then the smallest group with B + 32 / group <= bits. A given
    group size is kept and only B is chosen."""
    sizes = [group] if group else group_sizes(widths)
    for b in range(8, 0, -1):
        fits = [g for g in sizes if b + SIDE_BITS_PER_GROUP / g <= bits + 1e-9]
        if fits:
            # Smallest group that fits: the most side information the budget pays for.
            return b, min(fits)
    least = 1 + SIDE_BITS_PER_GROUP / max(sizes)
    raise BudgetError(
        f"a budget of {bits:.3f} bits/weight is below the smallest RTN/GPTQ configuration for these layers "
        f"(1 bit, groups of {max(sizes)}: {least:.3f} bits/weight); raise --bits or use --method cvxq")


@dataclass
class FixedResult:
    idx_t: np.ndarray     # uint8 [cols_pad, rows]: indices of W^T in storage order
    loc: np.ndarray       # float32 [n_groups_along_cols, rows], float16-exact
    scale: np.ndarray
    recon: np.ndarray     # float32 [rows, cols]


def _params(block: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    mn = block.min(dim=1).values
    mx = block.max(dim=1).values
    loc = ((mx + mn) / 2).half().float()
    scale = ((mx - mn) / (levels - 1)).half().float()
    return loc, scale


def _quantize_with(col: torch.Tensor, loc, scale, levels: int):
    half = (levels - 1) / 2
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    k = torch.clamp(torch.round((col - loc) / safe + half), 0, levels - 1)
    k = torch.where(scale > 0, k, torch.zeros_like(k))
    t = k - half
    recon = loc + scale * t
    return k.to(torch.uint8), recon


def quantize_fixed(w: np.ndarray, bits: int, group: int, hessian: Optional[torch.Tensor],
                   cancel=None) -> FixedResult:
    """RTN when hessian is None, GPTQ otherwise."""
    rows, cols = w.shape
    levels = 1 << bits
    cols_pad = -(-cols // 32) * 32
    n_groups = -(-cols_pad // group)
    wt = torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32))
    idx_t = np.zeros((cols_pad, rows), dtype=np.uint8)
    loc = np.zeros((n_groups, rows), dtype=np.float32)
    scale = np.zeros_like(loc)
    state = {}

    def quantize_column(j: int, ahead: torch.Tensor) -> torch.Tensor:
        if j % group == 0:
            l, s = _params(ahead[:, :group], levels)
            state["l"], state["s"] = l, s
            loc[j // group], scale[j // group] = l.numpy(), s.numpy()
        k, recon = _quantize_with(ahead[:, 0], state["l"], state["s"], levels)
        idx_t[j] = k.numpy()
        return recon

    if hessian is None:
        recon = torch.empty_like(wt)
        for j0 in range(0, cols, group):
            blk = wt[:, j0:j0 + group]
            l, s = _params(blk, levels)
            loc[j0 // group], scale[j0 // group] = l.numpy(), s.numpy()
            k, r = _quantize_with(blk, l[:, None], s[:, None], levels)
            idx_t[j0:j0 + blk.shape[1]] = k.T.numpy()
            recon[:, j0:j0 + group] = r
    else:
        block = max(group, (128 // group) * group)
        recon = error_feedback(wt, hessian, quantize_column, block=block, cancel=cancel)
    return FixedResult(idx_t, loc, scale, recon.numpy())
