"""The packed model on disk and in memory.

One safetensors file holds every quantized layer as a handful of tensors named after the
layer (`<name>.cvxq.meta|depth|payload|loc|scale|perm|table`, plus `<name>.bias`) and every
other tensor as it was. The bit layout of the payload is defined once in
core/include/cvxq/format.hpp; tile offsets are not stored, they are recomputed from the
depth map when loading (and the payload length is checked against them)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import _core, faults
from .errors import FormatError, OutputError

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
        self._cpu = None              # the CPU tiling, once built
        self._payload_nbytes = None   # set when the payload was released for the tiling

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
        if self.payload is None:
            raise FormatError("this layer's packed payload was released when it was loaded for the CPU "
                              "runtime (only the CPU tiling is kept); load the folder again with "
                              "load_quantized(..., device='cuda') to run it on a GPU")
        if self._core is None:
            try:
                offsets = _core.tile_offsets(self.rows, self.cols, self.group_rows, self.depth)
                self._core = _core.PackedLayer(
                    rows=self.rows, cols=self.cols, group_rows=self.group_rows, depth=self.depth,
                    offsets=offsets, payload=self.payload, loc=self.loc, scale=self.scale, table=self.table,
                    perm=self.perm)
            except (_core.FormatError, _core.ShapeError, _core.CoreValueError, TypeError) as e:
                raise FormatError(f"packed layer is corrupt: {e}") from None
        return self._core

    def cpu_layout(self):
        """The CPU tiling of a layer stored as W (core/include/cvxq/cpu_layout.hpp: the same
        index bits, columns grouped by depth, one word per row holding 32/B indices), built
        once; the AVX2 product reads it."""
        if self.transposed:
            raise ValueError("the CPU tiling is for layers stored as W; this one is stored as W^T")
        if self._cpu is None:
            try:
                self._cpu = self.core().cpu_layout()
            except (_core.FormatError, _core.CoreValueError) as e:
                raise FormatError(f"packed layer is corrupt: {e}") from None
        return self._cpu

    def keep_only_cpu_layout(self) -> None:
        """Builds the CPU tiling and releases the packed payload, which the tiling holds
        again: products and dequantization read the tiling (bit for bit the same weights),
        to_tensors re-packs the payload from it, and the layer can no longer be put on a GPU.
        For the CPU runtime."""
        self.cpu_layout()
        self._payload_nbytes = self.payload.nbytes
        self.payload = None
        self._core = None

    def dequantize(self) -> np.ndarray:
        """Dense float32 [out_features, in_features]."""
        if self._cpu is not None:
            return self._cpu.dequantize()
        w = self.core().dequantize()
        return np.ascontiguousarray(w.T) if self.transposed else w

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x [batch, in_features] -> [batch, out_features], straight from the packed data
        (through the CPU tiling for layers stored as W)."""
        if self.transposed:
            return x @ self.dequantize().T
        return self.cpu_layout().matmul(x)

    # --- disk ----------------------------------------------------------------------------
    def packed_payload(self) -> np.ndarray:
        """The payload; re-packed from the CPU tiling's indices when it was released."""
        if self.payload is not None:
            return self.payload
        return _core.pack(self.rows, self.cols, self.group_rows, self.depth, self._cpu.unpack())[1]

    def to_tensors(self, prefix: str) -> dict[str, np.ndarray]:
        flat = self.depth.reshape(-1)
        uniform = bool(flat.size) and bool((flat == flat[0]).all())
        meta = np.array([FORMAT_VERSION, self.out_features, self.in_features, int(self.transposed),
                         self.group_rows, KINDS.index(self.kind), int(self.perm is not None),
                         int(uniform)], dtype=np.int64)
        t = {
            f"{prefix}.cvxq.meta": meta,
            f"{prefix}.cvxq.depth": flat[:1].copy() if uniform else _core.pack_nibbles(flat),
            f"{prefix}.cvxq.payload": self.packed_payload(),
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
        """Bytes of the layer's tensors in the file."""
        if self.payload is None:
            held = dataclasses.replace(self, payload=np.zeros(0, np.uint32))
            return held.nbytes() + self._payload_nbytes
        return sum(a.nbytes for a in self.to_tensors("x").values())

    @classmethod
    def from_tensors(cls, prefix: str, t: dict[str, np.ndarray]) -> "PackedLinear":
        """Parses and validates one layer; every problem is a FormatError naming it. Sizes
        are checked against the arrays actually present before anything is allocated from
        the metadata, so a corrupt shape cannot ask for more memory than the file holds."""
        def get(name, dtypes, ndim=1):
            key = f"{prefix}.cvxq.{name}"
            if key not in t:
                raise FormatError(f"layer {prefix}: tensor {key} is missing")
            a = t[key]
            if a.dtype not in dtypes or a.ndim != ndim:
                want = " or ".join(str(np.dtype(d)) for d in dtypes)
                raise FormatError(f"layer {prefix}: {name} is {a.dtype} with {a.ndim} dimensions, expected {ndim}-d {want}")
            return a

        meta = get("meta", (np.int64,))
        if meta.shape != (META_FIELDS,):
            raise FormatError(f"layer {prefix}: metadata has shape {meta.shape}, expected ({META_FIELDS},)")
        version, out_f, in_f, transposed, group_rows, kind, has_perm, uniform = (int(v) for v in meta)
        if version != FORMAT_VERSION:
            raise FormatError(f"layer {prefix}: packed format version {version}; this cvxq-tui reads "
                              f"version {FORMAT_VERSION} (re-run the job with this version)")
        if not (0 <= kind < len(KINDS)) or out_f < 1 or in_f < 1 or transposed not in (0, 1) \
                or has_perm not in (0, 1) or uniform not in (0, 1) or max(out_f, in_f) >= 2**31:
            raise FormatError(f"layer {prefix}: metadata is corrupt ({meta.tolist()})")
        rows, cols = (in_f, out_f) if transposed else (out_f, in_f)
        try:
            g = _core.geometry(rows, cols, group_rows)
        except (_core.ShapeError, _core.CoreValueError) as e:
            raise FormatError(f"layer {prefix}: {e}") from None
        n_groups = g["n_clusters"] * cols
        loc, scale = get("loc", (np.float16,), 2), get("scale", (np.float16,), 2)
        for name, a in (("loc", loc), ("scale", scale)):
            if a.shape != (g["n_clusters"], cols):
                raise FormatError(f"layer {prefix}: {name} has shape {list(a.shape)}, expected "
                                  f"[{g['n_clusters']}, {cols}] for a {out_f}x{in_f} layer in groups of {group_rows}")
            if not np.isfinite(a).all():
                raise FormatError(f"layer {prefix}: {name} holds NaN or infinite values: the file is corrupt")
        d = get("depth", (np.uint8,))
        if uniform:
            if d.shape != (1,):
                raise FormatError(f"layer {prefix}: uniform depth must be one value, got {d.size}")
            depth = np.full(n_groups, d[0], dtype=np.uint8)
        else:
            if d.shape != ((n_groups + 1) // 2,):
                raise FormatError(f"layer {prefix}: depth map holds {d.size} bytes, expected {(n_groups + 1) // 2}")
            depth = _core.unpack_nibbles(d, n_groups)
        payload = get("payload", (np.uint32,))
        perm = None
        if has_perm:
            p = get("perm", (np.int16, np.int32))
            if p.shape != (rows,):
                raise FormatError(f"layer {prefix}: perm has {p.size} entries, expected {rows}")
            if p.dtype == np.int16 and rows >= 32768:
                raise FormatError(f"layer {prefix}: perm is int16 but the layer has {rows} rows")
            perm = p.astype(np.int32)
        if KINDS[kind] == "lloyd":
            table = get("table", (np.float32,))
            if table.shape != (_core.TABLE_SIZE,):
                raise FormatError(f"layer {prefix}: table has {table.size} values, expected {_core.TABLE_SIZE}")
        else:
            table = _core.builtin_table(KINDS[kind])
        bias = t.get(f"{prefix}.bias")
        if bias is not None:
            if bias.dtype not in (np.float16, np.float32) or bias.shape != (out_f,):
                raise FormatError(f"layer {prefix}: bias is {bias.dtype} {list(bias.shape)}, expected [{out_f}]")
            if not np.isfinite(bias).all():
                raise FormatError(f"layer {prefix}: bias holds NaN or infinite values: the file is corrupt")
        layer = cls(out_f, in_f, bool(transposed), group_rows, KINDS[kind],
                    depth.reshape(g["n_clusters"], cols), np.ascontiguousarray(payload),
                    np.ascontiguousarray(loc.reshape(g["n_clusters"], cols)).view(np.uint16),
                    np.ascontiguousarray(scale.reshape(g["n_clusters"], cols)).view(np.uint16),
                    np.ascontiguousarray(table), perm,
                    None if bias is None else bias.astype(np.float32))
        try:
            layer.core()  # validates depths, offsets, payload length, permutation
        except FormatError as e:
            raise FormatError(f"layer {prefix}: {e}") from None
        return layer


def _to_half_bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32).astype(np.float16)).view(np.uint16)


# --- whole files ---------------------------------------------------------------------------
def write_atomic(path: Path, write) -> None:
    """write(tmp_path) then fsync + rename: readers never see a half-written file. A failed
    write (disk full, read-only folder...) leaves the old file, if any, and no temporary
    file, and raises OutputError saying what happened and what to do."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        faults.point(f"write:{path.name}")
        injected = faults.injected_write_error(path.name)
        if injected is not None:
            raise injected
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(tmp, path)
        tmp = None
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        raise OutputError(write_error_message(e, path)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_error_message(e: OSError, path: Path) -> str:
    """What a user reads when writing `path` failed: the cause in words and the fix."""
    where = Path(path).parent
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f" ({shutil.disk_usage(where).free / 1e6:.1f} MB free)"
        except OSError:
            free = ""
        return (f"the disk holding {where} is full{free} while writing {Path(path).name}: free some "
                "space or choose an --out on another disk; what was finished is kept, rerun with --resume")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"cannot write {Path(path).name} in {where}: {e.strerror}; choose a writable --out folder "
                "(what was finished is kept, rerun with --resume once it is writable)")
    return (f"writing {Path(path).name} in {where} failed: {e.strerror or e}; check the disk and rerun "
            "with --resume to continue")


CHECKSUMS_KEY = "checksums"


def tensor_checksum(a: np.ndarray) -> str:
    """CRC-32 of a tensor's bytes as stored, 8 hex digits."""
    return f"{zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8)):08x}"


def save_model_file(path: Path, packed: dict[str, PackedLinear], rest: dict[str, torch.Tensor],
                    metadata: dict[str, str]) -> None:
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for name, layer in packed.items():
        tensors.update(layer.to_tensors(name))
    for name, t in rest.items():
        tensors[name] = t.detach().cpu().contiguous().numpy()
    sums = json.dumps({k: tensor_checksum(v) for k, v in sorted(tensors.items())}, separators=(",", ":"))
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), **metadata, CHECKSUMS_KEY: sums}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_model_file(path: Path) -> tuple[dict[str, PackedLinear], dict[str, np.ndarray], dict]:
    """Every layer parsed and validated (format version, shapes, depth ranges, stream lengths,
    permutations) and every tensor checked against its checksum. A damaged file raises
    FormatError, whatever the damage."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} does not exist: is this a cvxq-tui output folder?")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a damaged file
        raise FormatError(f"{path} is not a readable safetensors file ({_short(e)}); it is truncated or corrupt: "
                          "copy it again or re-run the job") from None
    if meta.get("format") != FORMAT_NAME:
        raise FormatError(f"{path} is not a cvxq-tui packed model (no '{FORMAT_NAME}' marker)")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise FormatError(f"{path} has packed format version {meta.get('format_version')!r}; this cvxq-tui "
                          f"reads version {FORMAT_VERSION} (re-run the job with this version)")
    _verify_checksums(path, meta, tensors)
    prefixes = sorted({k[: -len(".cvxq.meta")] for k in tensors if k.endswith(".cvxq.meta")})
    try:
        packed = {p: PackedLinear.from_tensors(p, tensors) for p in prefixes}
    except FormatError as e:
        raise FormatError(f"{path}: {e}; the file is damaged or was not written by this cvxq-tui: "
                          "copy it again or re-run the job") from None
    owned = {k for k in tensors if any(k.startswith(p + ".cvxq.") or k == p + ".bias" for p in prefixes)}
    rest = {k: v for k, v in tensors.items() if k not in owned}
    return packed, rest, meta


def _verify_checksums(path: Path, meta: dict, tensors: dict[str, np.ndarray]) -> None:
    try:
        sums = json.loads(meta[CHECKSUMS_KEY])
        if not isinstance(sums, dict):
            raise ValueError
    except (KeyError, ValueError):
        raise FormatError(f"{path}: the checksum table in the header is missing or damaged; the file is "
                          "corrupt or was not written by cvxq-tui: re-run the job") from None
    if set(sums) != set(tensors):
        extra, missing = sorted(set(tensors) - set(sums)), sorted(set(sums) - set(tensors))
        raise FormatError(f"{path}: tensors do not match the checksum table (missing {missing[:3]}, "
                          f"unexpected {extra[:3]}); the file is corrupt: re-run the job")
    for k, a in tensors.items():
        if sums[k] != tensor_checksum(a):
            raise FormatError(f"{path}: tensor {k} fails its checksum; the file is corrupt "
                              "(a bad copy or a failing disk): copy it again or re-run the job")


def _short(e: Exception, limit: int = 200) -> str:
    text = str(e).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
