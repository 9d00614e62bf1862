"""The packed model on disk and in memory.

One safetensors file holds every quantized layer as a handful of tensors named after the
layer (`<name>.cvxq.meta|depth|payload|loc|scale|perm|table`, plus `<name>.bias`) and every
other tensor as it was. The bit layout of the payload is defined once in
core/include/cvxq/format.hpp; tile offsets are not stored, they are recomputed from the
depth map when loading (and the payload length is checked against them)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import _core
from .errors import FormatError

FORMAT_NAME = "cvxq-packed"
FORMAT_VERSION = 1
KINDS = ("laplace", "uniform", "lloyd")
MODEL_FILE = "model.safetensors"
META_FIELDS = 8  # version, out, in, transposed, group_rows, kind, has_perm, uniform_depth


@dataclass
class PackedLinear:
    out_features: int
    in_features: int
    transposed: bool          # the stored matrix is W^T (groups along inputs: RTN/GPTQ)
    group_rows: int
    kind: str
    depth: np.ndarray         # uint8 [n_clusters, cols] of the stored matrix
    payload: np.ndarray       # uint32
    loc: np.ndarray           # uint16 float16 bits [n_clusters, cols]
    scale: np.ndarray         # uint16 float16 bits [n_clusters, cols]
    table: np.ndarray         # float32 [511]
    perm: Optional[np.ndarray]  # int32 [rows] or None
    bias: Optional[np.ndarray] = None  # float32 [out_features] (float16-exact)

    def __post_init__(self):
        self._core = None

    @property
    def rows(self) -> int:
        return self.in_features if self.transposed else self.out_features

    @property
    def cols(self) -> int:
        return self.out_features if self.transposed else self.in_features

    @classmethod
    def build(cls, *, out_features: int, in_features: int, transposed: bool, group_rows: int,
              kind: str, depth: np.ndarray, idx: np.ndarray, loc: np.ndarray, scale: np.ndarray,
              table: np.ndarray, perm: Optional[np.ndarray], bias: Optional[np.ndarray]):
        rows, cols = (in_features, out_features) if transposed else (out_features, in_features)
        depth = np.ascontiguousarray(depth, dtype=np.uint8)
        _, payload = _core.pack(rows, cols, group_rows, depth, np.ascontiguousarray(idx, dtype=np.uint8))
        return cls(out_features, in_features, transposed, group_rows, kind, depth, payload,
                   _to_half_bits(loc), _to_half_bits(scale),
                   np.ascontiguousarray(table, dtype=np.float32),
                   None if perm is None else np.ascontiguousarray(perm, dtype=np.int32),
                   None if bias is None else bias.astype(np.float16).astype(np.float32))

    # --- compute -------------------------------------------------------------------------
    def core(self):
        if self._core is None:
            try:
                offsets = _core.tile_offsets(self.rows, self.cols, self.group_rows, self.depth)
                self._core = _core.PackedLayer(
                    rows=self.rows, cols=self.cols, group_rows=self.group_rows, depth=self.depth,
                    offsets=offsets, payload=self.payload, loc=self.loc, scale=self.scale, table=self.table,
                    perm=self.perm)
            except (_core.FormatError, _core.ShapeError, _core.CoreValueError) as e:
                raise FormatError(f"packed layer is corrupt: {e}") from None
        return self._core

    def dequantize(self) -> np.ndarray:
        """Dense float32 [out_features, in_features]."""
        w = self.core().dequantize()
        return np.ascontiguousarray(w.T) if self.transposed else w

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x [batch, in_features] -> [batch, out_features], straight from the packed data."""
        if self.transposed:
            return x @ self.dequantize().T
        return self.core().matmul(x)

    # --- disk ----------------------------------------------------------------------------
    def to_tensors(self, prefix: str) -> dict[str, np.ndarray]:
        flat = self.depth.reshape(-1)
        uniform = bool(flat.size) and bool((flat == flat[0]).all())
        meta = np.array([FORMAT_VERSION, self.out_features, self.in_features, int(self.transposed),
                         self.group_rows, KINDS.index(self.kind), int(self.perm is not None),
                         int(uniform)], dtype=np.int64)
        t = {
            f"{prefix}.cvxq.meta": meta,
            f"{prefix}.cvxq.depth": flat[:1].copy() if uniform else _core.pack_nibbles(flat),
            f"{prefix}.cvxq.payload": self.payload,
            f"{prefix}.cvxq.loc": self.loc.view(np.float16),
            f"{prefix}.cvxq.scale": self.scale.view(np.float16),
        }
        if self.perm is not None:
            small = self.rows < 32768
            t[f"{prefix}.cvxq.perm"] = self.perm.astype(np.int16 if small else np.int32)
        if self.kind == "lloyd":
            t[f"{prefix}.cvxq.table"] = self.table
        if self.bias is not None:
            t[f"{prefix}.bias"] = self.bias.astype(np.float16)
        return t

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.to_tensors("x").values())

    @classmethod
    def from_tensors(cls, prefix: str, t: dict[str, np.ndarray]) -> "PackedLinear":
        def get(name):
            key = f"{prefix}.cvxq.{name}"
            if key not in t:
                raise FormatError(f"layer {prefix}: tensor {key} is missing")
            return t[key]

        meta = get("meta")
        if meta.dtype != np.int64 or meta.shape != (META_FIELDS,):
            raise FormatError(f"layer {prefix}: metadata has shape {meta.shape}, expected ({META_FIELDS},)")
        version, out_f, in_f, transposed, group_rows, kind, has_perm, uniform = (int(v) for v in meta)
        if version != FORMAT_VERSION:
            raise FormatError(f"layer {prefix}: packed format version {version}; this cvxq-tui reads "
                              f"version {FORMAT_VERSION} (re-run the job with this version)")
        if not (0 <= kind < len(KINDS)) or out_f < 1 or in_f < 1 or transposed not in (0, 1):
            raise FormatError(f"layer {prefix}: metadata is corrupt ({meta.tolist()})")
        rows, cols = (in_f, out_f) if transposed else (out_f, in_f)
        try:
            g = _core.geometry(rows, cols, group_rows)
        except (_core.ShapeError, _core.CoreValueError) as e:
            raise FormatError(f"layer {prefix}: {e}") from None
        n_groups = g["n_clusters"] * cols
        d = get("depth")
        if d.dtype != np.uint8:
            raise FormatError(f"layer {prefix}: depth map has dtype {d.dtype}, expected uint8")
        if uniform:
            if d.shape != (1,):
                raise FormatError(f"layer {prefix}: uniform depth must be one value")
            depth = np.full(n_groups, d[0], dtype=np.uint8)
        else:
            if d.shape != ((n_groups + 1) // 2,):
                raise FormatError(f"layer {prefix}: depth map holds {d.size} bytes, expected {(n_groups + 1) // 2}")
            depth = _core.unpack_nibbles(d, n_groups)
        loc, scale = get("loc"), get("scale")
        for name, a in (("loc", loc), ("scale", scale)):
            if a.dtype != np.float16 or a.size != n_groups:
                raise FormatError(f"layer {prefix}: {name} has {a.size} {a.dtype} values, expected {n_groups} float16")
        perm = None
        if has_perm:
            perm = get("perm").astype(np.int32)
        table = get("table").astype(np.float32) if KINDS[kind] == "lloyd" else _core.builtin_table(KINDS[kind])
        bias = t.get(f"{prefix}.bias")
        layer = cls(out_f, in_f, bool(transposed), group_rows, KINDS[kind],
                    depth.reshape(g["n_clusters"], cols), get("payload"),
                    np.ascontiguousarray(loc.reshape(g["n_clusters"], cols)).view(np.uint16),
                    np.ascontiguousarray(scale.reshape(g["n_clusters"], cols)).view(np.uint16),
                    np.ascontiguousarray(table), perm,
                    None if bias is None else bias.astype(np.float32))
        layer.core()  # validates depths, offsets, payload length, permutation
        return layer


def _to_half_bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32).astype(np.float16)).view(np.uint16)


# --- whole files ---------------------------------------------------------------------------
def write_atomic(path: Path, write) -> None:
    """write(tmp_path) then fsync + rename: readers never see a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model_file(path: Path, packed: dict[str, PackedLinear], rest: dict[str, torch.Tensor],
                    metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for name, layer in packed.items():
        tensors.update(layer.to_tensors(name))
    for name, t in rest.items():
        tensors[name] = t.detach().cpu().contiguous().numpy()
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), **metadata}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_model_file(path: Path) -> tuple[dict[str, PackedLinear], dict[str, np.ndarray], dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} does not exist: is this a cvxq-tui output folder?")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise FormatError(f"{path} is not a readable safetensors file ({e}); it is truncated or corrupt") from None
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{path} is not a cvxq-tui packed model (no '{FORMAT_NAME}' marker)")
    prefixes = sorted({k[: -len(".cvxq.meta")] for k in tensors if k.endswith(".cvxq.meta")})
    packed = {p: PackedLinear.from_tensors(p, tensors) for p in prefixes}
    owned = {k for k in tensors if any(k.startswith(p + ".cvxq.") or k == p + ".bias" for p in prefixes)}
    rest = {k: v for k, v in tensors.items() if k not in owned}
    return packed, rest, meta
