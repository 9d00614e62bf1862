"""Fuzzes the packed-model loader and the core's decoders with mutated model files.

Every input is a small packed model file (CVXQ layers with permutations and per-group depths,
a Lloyd layer with its own table, an RTN-style transposed layer at one depth, biases, an
unquantized tensor) damaged in one of many ways: bytes of the safetensors header, its length
prefix, the metadata (format marker, version, checksum table), and each packed tensor (depth
values and sizes, payload truncated or extended, permutation entries, loc/scale NaN/inf, each
metadata field, table, bias, dtypes, missing tensors), truncation and garbage appended.
Structured mutations are tried twice: as a disk would damage the file (the checksums then
catch it) and "resealed" with checksums recomputed, as a buggy or hostile writer would make
it, so the structural checks and the core's validation are reached too.

Each input goes through packed.read_model_file, and when it is accepted through the core's
validate, unpack, dequantize and matmul (reference and fast paths, both instruction sets).
The only acceptable outcomes are a result or a FormatError; anything else is a finding.

    python tools/fuzz_loader.py -n 100000            # prints counts by outcome
    CVXQ_DEV_CORE_DIR=build/asan/cvxq_tui LD_PRELOAD=$(gcc -print-file-name=libasan.so) \\
        ASAN_OPTIONS=detect_leaks=0 python tools/fuzz_loader.py -n 20000   # sanitized core
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _import_package():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import cvxq_tui

    dev = os.environ.get("CVXQ_DEV_CORE_DIR")
    if dev and os.path.abspath(dev) not in cvxq_tui.__path__:
        cvxq_tui.__path__.insert(0, os.path.abspath(dev))
    from cvxq_tui import _core, packed
    return _core, packed


_core, packed = _import_package()
FormatError = packed.FormatError


# --- the seed file ---------------------------------------------------------------------------
def _layer(rng, rows, cols, group_rows, kind, transposed=False, uniform=None, bias=True, perm=True):
    g = _core.geometry(rows, cols, group_rows)
    shape = (g["n_clusters"], cols)
    depth = (np.full(shape, uniform, np.uint8) if uniform is not None
             else rng.integers(0, 6, size=shape).astype(np.uint8))
    rows_pad = g["rows_pad"]
    idx = np.zeros((rows_pad, cols), np.uint8)
    for c in range(shape[0]):
        r0, r1 = c * group_rows, min(rows_pad, (c + 1) * group_rows)
        hi = (1 << depth[c].astype(np.int64))
        idx[r0:r1] = (rng.integers(0, 1 << 30, size=(r1 - r0, cols)) % hi).astype(np.uint8)
    table = (_core.builtin_table(kind) if kind != "lloyd"
             else np.sort(rng.normal(size=511)).astype(np.float32))
    out_f, in_f = (cols, rows) if transposed else (rows, cols)
    return packed.PackedLinear.build(
        out_features=out_f, in_features=in_f, transposed=transposed, group_rows=group_rows, kind=kind,
        depth=depth, idx=idx, loc=rng.normal(size=shape).astype(np.float32),
        scale=np.abs(rng.normal(size=shape)).astype(np.float32) + 0.01, table=table,
        perm=rng.permutation(rows).astype(np.int32) if perm and not transposed else None,
        bias=rng.normal(size=out_f).astype(np.float32) if bias else None)


def seed_model(seed: int = 0):
    rng = np.random.default_rng(seed)
    layers = {
        "model.layers.0.self_attn.q_proj": _layer(rng, 70, 40, 32, "laplace"),
        "model.layers.0.self_attn.k_proj": _layer(rng, 96, 33, 64, "uniform", bias=False),
        "model.layers.0.mlp.up_proj": _layer(rng, 40, 24, 32, "lloyd"),
        "model.layers.0.mlp.down_proj": _layer(rng, 64, 20, 32, "uniform", transposed=True, uniform=3,
                                               perm=False),
    }
    import torch

    rest = {"model.embed_tokens.weight": torch.from_numpy(rng.normal(size=(16, 8)).astype(np.float32)),
            "model.norm.weight": torch.ones(8)}
    return layers, rest


def seed_bytes(seed: int = 0) -> bytes:
    layers, rest = seed_model(seed)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        packed.save_model_file(path, layers, rest, {"method": "cvxq", "job_id": "fuzz"})
        return path.read_bytes()


# --- parsing and re-serializing ---------------------------------------------------------------
def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def tensors_of(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    from safetensors.numpy import load

    header, _ = split(data)
    return load(data), dict(header.get("__metadata__", {}))


def serialize(tensors: dict[str, np.ndarray], meta: dict[str, str], reseal: bool) -> bytes:
    from safetensors.numpy import save

    meta = dict(meta)
    if reseal:
        meta[packed.CHECKSUMS_KEY] = json.dumps({k: packed.tensor_checksum(v) for k, v in tensors.items()})
    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta)


# --- mutations ---------------------------------------------------------------------------------
def _any_value(rng, dtype):
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, rng.normal() * 10.0 ** rng.integers(-8, 8)])
    info = np.iinfo(dtype)
    return rng.choice([info.min, info.max, 0, -1 if info.min < 0 else 1, int(rng.integers(info.min, info.max,
                                                                                          dtype=np.int64,
                                                                                          endpoint=True))])


def _mutate_tensor(rng, name: str, a: np.ndarray) -> tuple[np.ndarray | None, str]:
    """One damage to one tensor; None means: remove it."""
    leaf = name.rsplit(".", 1)[-1]
    a = a.copy()
    choice = rng.integers(0, 10)
    if choice == 0:
        return None, "drop"
    if choice == 1 and a.size:
        return a[: int(rng.integers(0, a.size))].copy() if a.ndim == 1 else a.reshape(-1)[:-1].copy(), "truncate"
    if choice == 2:
        extra = rng.integers(0, 256, size=int(rng.integers(1, 9)) * a.dtype.itemsize, dtype=np.uint8)
        return np.concatenate([a.reshape(-1).view(np.uint8), extra]).view(a.dtype) if a.dtype.itemsize else a, "extend"
    if choice == 3:
        target = rng.choice([np.uint8, np.int16, np.int32, np.int64, np.float16, np.float32, np.uint32])
        raw = a.reshape(-1).view(np.uint8)
        k = raw.size // np.dtype(target).itemsize
        return raw[: k * np.dtype(target).itemsize].view(target).copy(), "dtype"
    if choice == 4 and a.ndim == 1 and a.size:
        return a.reshape(1, -1).copy(), "ndim"
    if a.size == 0:
        return a, "none"
    flat = a.reshape(-1)
    if leaf == "meta":
        i = int(rng.integers(0, flat.size))
        flat[i] = rng.choice([-1, 0, 1, 2, 3, 7, 31, 32, 33, 64, 4096, 4097, 2**31, 2**40, -2**62,
                              int(flat[i]) + int(rng.integers(-3, 4))])
        return a, f"meta[{i}]"
    if leaf == "perm" and choice < 7:
        i, j = rng.integers(0, flat.size, size=2)
        flat[i] = flat[j] if choice == 5 else _any_value(rng, flat.dtype)
        return a, "perm-dup" if choice == 5 else "perm-value"
    if leaf in ("loc", "scale", "table", "bias") and choice < 8:
        flat[int(rng.integers(0, flat.size))] = rng.choice([np.nan, np.inf, -np.inf, 65504.0, -0.0])
        return a, "nan-inf"
    if leaf == "depth" and choice < 8:
        flat[int(rng.integers(0, flat.size))] = rng.choice([0, 1, 8, 9, 0x99, 0x0f, 0xf0, 0xff,
                                                            int(rng.integers(0, 256))])
        return a, "depth-value"
    # random bit flips
    raw = flat.view(np.uint8)
    for _ in range(int(rng.integers(1, 4))):
        raw[int(rng.integers(0, raw.size))] ^= np.uint8(1 << int(rng.integers(0, 8)))
    return a, "bitflip"


def mutate(seed_data: bytes, rng) -> tuple[bytes, str]:
    """One damaged file and a label of the damage."""
    kind = rng.integers(0, 100)
    data = bytearray(seed_data)
    n_header = struct.unpack("<Q", seed_data[:8])[0]
    if kind < 10:  # bytes of the header JSON
        for _ in range(int(rng.integers(1, 4))):
            data[8 + int(rng.integers(0, n_header))] = int(rng.integers(0, 256))
        return bytes(data), "header-bytes"
    if kind < 14:  # the length prefix
        value = int(rng.choice([0, 1, n_header - 1, n_header + 1, len(data), 2**63, 2**64 - 1,
                                int(rng.integers(0, 2**32))]))
        data[:8] = struct.pack("<Q", value % 2**64)
        return bytes(data), "header-length"
    if kind < 20:  # truncated anywhere
        return bytes(data[: int(rng.integers(0, len(data)))]), "truncate-file"
    if kind < 23:
        return bytes(data) + rng.integers(0, 256, size=int(rng.integers(1, 64)), dtype=np.uint8).tobytes(), "append"
    if kind < 33:  # bytes of the tensor data (a disk error): the checksums catch it
        for _ in range(int(rng.integers(1, 4))):
            data[8 + n_header + int(rng.integers(0, len(data) - 8 - n_header))] ^= 1 << int(rng.integers(0, 8))
        return bytes(data), "data-bitflip"
    tensors, meta = tensors_of(seed_data)
    if kind < 43:  # the metadata
        key = rng.choice(["format", "format_version", packed.CHECKSUMS_KEY, "job_id"])
        how = rng.integers(0, 4)
        if how == 0:
            meta.pop(key, None)
        elif how == 1:
            meta[key] = rng.choice(["", "2", "0", "cvxq-packed", "{}", "[]", "null", "{\"a\":1}", "\x00"])
        elif how == 2 and key == packed.CHECKSUMS_KEY:
            sums = json.loads(meta[key])
            victim = rng.choice(sorted(sums))
            sums[victim] = rng.choice(["00000000", "", sums[victim][::-1]]) if rng.random() < 0.8 else None
            meta[key] = json.dumps(sums)
        else:
            meta[key] = meta.get(key, "") + "x"
        return serialize(tensors, meta, reseal=False), f"metadata-{key}"
    # one packed tensor, then either sealed or not
    names = sorted(tensors)
    name = names[int(rng.integers(0, len(names)))]
    new, what = _mutate_tensor(rng, name, tensors[name])
    if new is None:
        del tensors[name]
    else:
        tensors[name] = new
    reseal = rng.random() < 0.8
    return serialize(tensors, meta, reseal=reseal), f"{name.rsplit('.', 1)[-1]}-{what}" + ("-resealed" if reseal else "")


# --- running one input ---------------------------------------------------------------------------
def exercise(path: Path, rng) -> str:
    """'accepted' or the FormatError category; raises anything else."""
    try:
        layers, rest, _ = packed.read_model_file(path)
    except FormatError as e:
        msg = str(e)
        if "checksum" in msg:
            return "rejected: checksum"
        if "not a readable safetensors file" in msg:
            return "rejected: not safetensors"
        if "packed layer is corrupt" in msg:
            return "rejected: core validation"
        return "rejected: structure"
    for layer in layers.values():
        core = layer.core()
        core.validate()
        core.unpack()
        core.unpack(reference=True)
        w = layer.dequantize()
        w_ref = core.dequantize(reference=True)
        x = rng.normal(size=(int(rng.integers(1, 5)), layer.in_features)).astype(np.float32)
        y = layer.matmul(x)
        if w.shape != (layer.out_features, layer.in_features) or y.shape != (x.shape[0], layer.out_features):
            raise AssertionError(f"shapes {w.shape} {y.shape} for a {layer.out_features}x{layer.in_features} layer")
        if not layer.transposed:
            y_ref = core.matmul(x, reference=True)
            assert y_ref.shape == y.shape
        assert w_ref.shape == (layer.rows, layer.cols)
    return "accepted"


def run(n: int, seed: int = 0, report_every: int = 0, out=sys.stdout) -> dict:
    base = seed_bytes(seed)
    counts: collections.Counter = collections.Counter()
    by_mutation: collections.Counter = collections.Counter()
    findings = []
    rng = np.random.default_rng(seed)
    isas = ["scalar"] + (["avx2"] if _core.cpu_has_avx2() else [])
    previous_isa = _core.active_isa()
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=shm) as d:
        path = Path(d) / "model.safetensors"
        path.write_bytes(base)
        assert exercise(path, rng) == "accepted", "the unmutated seed file must load"
        try:
            for i in range(n):
                data, label = mutate(base, rng)
                path.write_bytes(data)
                _core.set_isa(isas[i % len(isas)])
                try:
                    outcome = exercise(path, rng)
                except Exception as e:  # a finding: anything but FormatError
                    outcome = "CRASH"
                    if len(findings) < 20:
                        findings.append({"input": i, "mutation": label, "error": f"{type(e).__name__}: {e}",
                                         "trace": traceback.format_exc(limit=4)})
                counts[outcome] += 1
                by_mutation[(label.split("-")[0], outcome == "accepted")] += 1
                if report_every and (i + 1) % report_every == 0:
                    print(f"{i + 1} inputs, {counts['CRASH']} crashes, {time.perf_counter() - t0:.0f}s",
                          file=out, flush=True)
        finally:
            _core.set_isa(previous_isa)
    return {"inputs": n, "seconds": time.perf_counter() - t0, "outcomes": dict(counts),
            "crashes": counts["CRASH"], "findings": findings,
            "by_target": {f"{k[0]} ({'accepted' if k[1] else 'rejected'})": v for k, v in sorted(by_mutation.items())}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=100_000, help="mutated inputs (default 100000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    res = run(args.n, args.seed, report_every=0 if args.json else 10_000, out=sys.stderr)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['inputs']} mutated inputs in {res['seconds']:.0f}s, core ISA paths scalar+avx2")
        for k, v in sorted(res["outcomes"].items()):
            print(f"  {k:<28} {v}")
        print("by mutation target:")
        for k, v in res["by_target"].items():
            print(f"  {k:<40} {v}")
        print(f"crashes: {res['crashes']}")
        for f in res["findings"]:
            print(f"  input {f['input']} ({f['mutation']}): {f['error']}\n{f['trace']}")
    return 1 if res["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
