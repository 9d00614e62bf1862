"""CVXQ (Young 2024): rows clustered by sensitivity, one depth per (row cluster, column)
group chosen by the convex allocation over the whole model, companded quantizers with a
per-group scale/shift search, optional GPTQ-style error feedback, bias correction.

Planning (clustering + measured distortion curves) and quantization are separate so the
allocation can be re-solved for a new budget without touching the weights again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import _core
from .layout import GroupLayout
from .gptq import inverse_cholesky

# Side information per group on disk: float16 loc + float16 scale + a 4-bit depth.
SIDE_BITS_PER_GROUP = 16 + 16 + 4


@dataclass
class LayerPlan:
    name: str
    layout: GroupLayout
    perm: np.ndarray        # int32 [rows]: storage position -> original row
    g2c: np.ndarray         # float32 [n_clusters * cols]: mean sensitivity of each group
    curve: np.ndarray       # float32 [n_groups, 9]: weighted distortion at depth 0..8
    table: np.ndarray       # float32 [511] codebook of the layer
    kind: str

    @property
    def n_groups(self) -> int:
        return self.layout.n_clusters * self.layout.cols


def quant_kwargs(kind: str, table: np.ndarray) -> dict:
    return {"kind": kind, "table": table}


def layer_table(kind: str, w: np.ndarray, layout: GroupLayout, perm, seed: int = 0) -> np.ndarray:
    if kind != "lloyd":
        return _core.builtin_table(kind)
    # Lloyd-Max codebook of the layer, fitted on standardised weights of a sample of groups.
    wp = layout.to_storage(w, perm)
    first, count, size = next(layout.runs())
    x = layout.groups(wp, first, count, size)
    rng = np.random.default_rng(seed)
    pick = rng.choice(x.shape[0], size=min(x.shape[0], max(1, 200_000 // size)), replace=False)
    xs = np.ascontiguousarray(x[np.sort(pick)])
    mu, sigma = _core.group_stats(xs)
    z = ((xs - mu[:, None]) / sigma[:, None]).astype(np.float32).reshape(-1)
    return _core.fit_lloyd_table(np.ascontiguousarray(z))


# Depths up to this are measured; above, the curve follows high-rate theory (error / 4 per
# bit), which is accurate there and saves most of the planning time.
MEASURED_MAX_DEPTH = 4


def plan_layer(name: str, w: np.ndarray, g2: np.ndarray, *, group_rows: int, kind: str,
               cancel=None, seed: int = 0) -> LayerPlan:
    """w: [rows, cols] float32; g2: [rows, cols] or [1, cols] sensitivities."""
    rows, cols = w.shape
    layout = GroupLayout(rows, cols, group_rows)
    g2_row = g2.mean(axis=1) if g2.shape[0] == rows else np.full(rows, float(g2.mean()))
    var = w.var(axis=1) + 1e-30
    key = (np.log2(var) + np.log2(g2_row + 1e-30)).astype(np.float32)
    perm = _core.cluster_rows(np.ascontiguousarray(key))
    table = layer_table(kind, w, layout, perm, seed)

    wp = layout.to_storage(w, perm)
    # Mean sensitivity of each group over its real (not padding) rows.
    if g2.shape[0] == rows:
        gp = np.zeros((layout.rows_pad, cols), dtype=np.float32)
        gp[:rows] = g2[perm]
        real = np.zeros((layout.rows_pad, 1), dtype=np.float32)
        real[:rows] = 1
    curves, g2c = [], []
    for first, count, size in layout.runs():
        x = layout.groups(wp, first, count, size)
        curves.append(_core.error_curves(x, **quant_kwargs(kind, table), cancel=cancel,
                                          measured_max_depth=MEASURED_MAX_DEPTH))
        if g2.shape[0] == rows:
            s = layout.groups(gp, first, count, size).sum(axis=1)
            n = np.maximum(layout.groups(np.broadcast_to(real, gp.shape).copy(), first, count, size).sum(axis=1), 1)
            g2c.append((s / n).astype(np.float32))
        else:
            g2c.append(np.tile(g2.reshape(-1), count).astype(np.float32))
    g2c = np.concatenate(g2c)
    curve = np.concatenate(curves) * g2c[:, None]
    return LayerPlan(name, layout, perm, g2c, curve.astype(np.float32), table, kind)


@dataclass
class QuantizedLayer:
    idx: np.ndarray      # uint8 [rows_pad, cols] storage order
    loc: np.ndarray      # float32 [n_clusters, cols] (float16-exact)
    scale: np.ndarray    # float32 [n_clusters, cols] (float16-exact)
    recon: np.ndarray    # float32 [rows, cols] original row order


def quantize_layer(plan: LayerPlan, w: np.ndarray, depth: np.ndarray,
                   hessian: Optional[torch.Tensor], cancel=None,
                   hinv_u: Optional[np.ndarray] = None) -> QuantizedLayer:
    """Quantize at the allocated depths [n_clusters, cols]; with a Hessian, columns are
    quantized in order with GPTQ-style error feedback. hinv_u: inverse_cholesky(hessian)
    if already computed (layers fed the same input share it)."""
    lay = plan.layout
    kw = quant_kwargs(plan.kind, plan.table)
    wp = lay.to_storage(w, plan.perm)
    idx = np.zeros((lay.rows_pad, lay.cols), dtype=np.uint8)
    loc = np.zeros((lay.n_clusters, lay.cols), dtype=np.float32)
    scale = np.zeros_like(loc)
    if hessian is None:
        recon_p = np.zeros_like(wp)
        for first, count, size in lay.runs():
            x = lay.groups(wp, first, count, size)
            d = np.ascontiguousarray(depth[first:first + count].reshape(-1))
            r = _core.quantize_groups(x, d, **kw, cancel=cancel)
            rows = slice(first * lay.group_rows, first * lay.group_rows + count * size)
            idx[rows] = lay.ungroup(r["idx"], count, size)
            recon_p[rows] = lay.ungroup(r["recon"], count, size)
            loc[first:first + count] = r["loc"].reshape(count, lay.cols)
            scale[first:first + count] = r["scale"].reshape(count, lay.cols)
    else:
        # The column loop runs in the core: clusters are independent under error feedback
        # (it only mixes the columns of a row), so they run in parallel with no Python per
        # column.
        u = hinv_u if hinv_u is not None else inverse_cholesky(hessian).numpy()
        r = _core.quantize_feedback(wp, np.ascontiguousarray(u, dtype=np.float32),
                                    np.ascontiguousarray(depth, dtype=np.uint8), group_rows=lay.group_rows,
                                    **kw, cancel=cancel)
        idx, recon_p, loc, scale = r["idx"], r["recon"], r["loc"], r["scale"]
    recon = np.empty_like(w)
    recon[plan.perm] = recon_p[: lay.rows]
    return QuantizedLayer(idx, loc, scale, recon)
