"""The one pipeline both front ends run: load -> calibrate -> allocate -> quantize -> save ->
evaluate, emitting events (cvxq_tui.events) and honouring a cancel token between work units.
Never imports textual."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import _core
from .errors import BudgetError, CvxqError, InputError, JobCancelled, OutputError
from .events import (Allocation, Finished, LayerDone, LayerInfo, Log, StageFinished, StageProgress,
                     StageStarted)
from .packed import MODEL_FILE, PackedLinear, save_model_file, write_atomic
from .spec import JobSpec

JOB_FILE = "job.json"
REPORT_FILE = "report.json"
WORK_DIR = ".work"
PER_TENSOR_HEADER_BYTES = 96  # safetensors JSON entry per tensor, besides the name


class CancelToken:
    """Set from any thread; polled by the pipeline and by the core between work units."""

    def __init__(self):
        self._event = threading.Event()
        self.core = _core.CancelFlag()

    def set(self) -> None:
        self._event.set()
        self.core.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def _check(cancel) -> None:
    if cancel is not None and cancel.is_set():
        raise JobCancelled("job cancelled; finished layers are kept: rerun with --resume to continue")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Stages:
    def __init__(self, emit):
        self.emit = emit
        self.seconds: dict[str, float] = {}

    def run(self, stage: str, fn, total: int = 0, detail: str = ""):
        self.emit(StageStarted(stage, total, detail))
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        self.seconds[stage] = self.seconds.get(stage, 0.0) + dt
        self.emit(StageFinished(stage, dt))
        return out


# --- layer selection ---------------------------------------------------------------------------
def select_layers(all_layers, spec: JobSpec):
    names = [n for n, _ in all_layers]
    for glob in spec.include + spec.exclude + [g for g, _ in spec.pin]:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            sample = ", ".join(names[:3])
            raise InputError(f"the glob {glob!r} matches no quantizable layer; layer names look like {sample}, ...")
    chosen = []
    for name, mod in all_layers:
        if spec.include and not any(fnmatch.fnmatchcase(name, g) for g in spec.include):
            continue
        if any(fnmatch.fnmatchcase(name, g) for g in spec.exclude):
            continue
        chosen.append((name, mod))
    if not chosen:
        raise InputError("--include/--exclude leave no layer to quantize")
    return chosen


def pinned_depth(name: str, spec: JobSpec) -> Optional[int]:
    depth = None
    for glob, bits in spec.pin:  # the last matching pin wins, like later options on a command line
        if fnmatch.fnmatchcase(name, glob):
            depth = bits
    return depth


# --- output folder ---------------------------------------------------------------------------
def prepare_output(spec: JobSpec) -> Path:
    out = Path(spec.out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder path")
    job_file = out / JOB_FILE
    if out.is_dir() and any(out.iterdir()):
        if job_file.is_file():
            try:
                old = json.loads(job_file.read_text())
            except (OSError, json.JSONDecodeError):
                old = {}
            same = old.get("identity") == spec.identity()
            if spec.overwrite:
                shutil.rmtree(out)
            elif spec.resume and same:
                pass
            elif spec.resume:
                raise OutputError(f"{out} holds a different job (other model, budget or settings); "
                                  "--resume needs the same options, or use --overwrite or another --out")
            elif same and (out / REPORT_FILE).is_file():
                raise OutputError(f"{out} already holds this finished job; use --overwrite to redo it or another --out")
            else:
                raise OutputError(f"{out} already holds a job; use --resume to continue it, "
                                  "--overwrite to replace it, or another --out")
        elif spec.overwrite:
            shutil.rmtree(out)
        else:
            raise OutputError(f"{out} is not empty and was not made by cvxq-tui; choose an empty or new --out folder")
    try:
        (out / WORK_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OutputError(f"cannot write to {out}: {e.strerror}; choose a writable --out folder") from None
    record = {"identity": spec.identity(), "spec": spec.to_dict(), "command": spec.batch_command(),
              "tool": "cvxq-tui", "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_atomic(job_file, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    return out


# --- budget ----------------------------------------------------------------------------------
def _layer_fixed_bytes(name: str, rows: int, out_features: int, has_perm: bool, has_bias: bool,
                       n_tensors: int) -> int:
    """Bytes of a packed layer that do not depend on the depths: metadata, permutation,
    bias and the file header entries."""
    b = 8 * 8
    if has_perm:
        b += rows * (2 if rows < 32768 else 4)
    if has_bias:
        b += 2 * out_features
    return b + n_tensors * (PER_TENSOR_HEADER_BYTES + len(name) + 14)


def _rest_bytes(rest: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() + PER_TENSOR_HEADER_BYTES + len(k) for k, t in rest.items())


def unquantized_tensors(model, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor saved as it was: not the weights/biases of quantized layers, and tied
    tensors once."""
    out, seen = {}, set()
    for k, t in model.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if mod in quantized and leaf in ("weight", "bias"):
            continue
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        out[k] = t
    return out


# --- the job ---------------------------------------------------------------------------------
def run(spec: JobSpec, on_event: Callable = lambda e: None, cancel: Optional[CancelToken] = None) -> dict:
    from . import calibrate, evaluate, models, text
    from .methods import baselines
    from .methods import cvxq as cvxq_method

    spec.validate()
    torch.manual_seed(spec.seed)
    cancel = cancel or CancelToken()
    emit = on_event
    stages = _Stages(emit)
    t_start = time.perf_counter()
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available; use --device cpu")
        emit(Log("CUDA calibration is not implemented yet; running on the CPU", "warning"))

    out = prepare_output(spec)

    loaded = stages.run("load", lambda: models.load_model(spec.model))
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    layers = select_layers(models.quantizable_linears(model), spec)
    for name, mod in layers:
        emit(LayerInfo(name, (mod.out_features, mod.in_features), mod.weight.numel()))
    n_weights = sum(mod.weight.numel() for _, mod in layers)

    calib_text = text.read_text(spec.text) if spec.text else text.default_text("calib")
    calib = text.token_windows(tok, calib_text, spec.seq_len, spec.calib_samples, purpose="calibration")
    evals = {}
    if spec.evaluate:
        eval_text = text.read_text(spec.eval_text) if spec.eval_text else text.default_text("eval")
        evals["eval"] = text.token_windows(tok, eval_text, spec.eval_seq_len, None, purpose="evaluation")[: spec.eval_samples]
        if spec.ood_eval:
            evals["ood"] = text.token_windows(tok, text.default_text("ood"), spec.eval_seq_len, None,
                                              purpose="evaluation")[: spec.eval_samples]

    def perplexities(tag: str) -> dict[str, float]:
        res = {}
        for key, windows in evals.items():
            def prog(done, total, key=key):
                emit(StageProgress("evaluate", done, total, f"{tag} model, {key} text"))
            res[key] = evaluate.perplexity(model, windows, on_progress=prog, cancel=cancel)
        return res

    ppl_before = stages.run("evaluate", lambda: perplexities("float")) if evals else {}

    # Calibration: input statistics (bias correction, GPTQ) and sensitivities (CVXQ).
    need_h = spec.method == "gptq" or (spec.method == "cvxq" and spec.error_feedback)

    def do_calibrate():
        def prog(done, total, what):
            emit(StageProgress("calibrate", done, total, what))
        stats = calibrate.collect_input_stats(model, layers, calib, need_hessian=need_h,
                                              on_progress=prog, cancel=cancel)
        g2 = None
        if spec.method == "cvxq":
            g2 = calibrate.collect_sensitivity(model, layers, calib, estimator=spec.sensitivity,
                                               input_stats=stats, seed=spec.seed,
                                               on_progress=prog, cancel=cancel)
        return stats, g2

    stats, g2 = stages.run("calibrate", do_calibrate, total=calib.shape[0])

    quantized_names = {n for n, _ in layers}
    rest = unquantized_tensors(model, quantized_names)
    rest_bytes = _rest_bytes(rest)
    has_bias = {n: (spec.bias_correction or mod.bias is not None) for n, mod in layers}

    work = out / WORK_DIR
    packed: dict[str, PackedLinear] = {}
    layer_rows: list[dict] = []

    if spec.method == "cvxq":
        plans = {}

        def do_plan():
            for i, (name, mod) in enumerate(layers):
                _check(cancel)
                w = mod.weight.detach().numpy()
                plans[name] = cvxq_method.plan_layer(name, w, g2[name].numpy(), group_rows=spec.group_rows,
                                                     kind=spec.quantizer, cancel=cancel.core, seed=spec.seed)
                emit(StageProgress("plan", i + 1, len(layers), name))

        stages.run("plan", do_plan, total=len(layers))
        fixed = sum(_layer_fixed_bytes(n, mod.out_features, mod.out_features, True, has_bias[n], 7)
                    for n, mod in layers)
        if spec.bits is not None:
            budget_bits = spec.bits * n_weights - 8 * fixed
        else:
            budget_bits = 8 * (spec.size - rest_bytes - fixed)
        depths, alloc = stages.run("allocate", lambda: allocate_cvxq(plans, layers, spec, budget_bits, n_weights, fixed, rest_bytes))
        emit(alloc)
    else:
        fixed_per_layer = {n: _layer_fixed_bytes(n, mod.in_features, mod.out_features, False, mod.bias is not None, 6)
                           for n, mod in layers}
        fixed = sum(fixed_per_layer.values())
        bits = spec.bits if spec.bits is not None else 8 * (spec.size - rest_bytes) / n_weights
        bits_eff = bits - 8 * fixed / n_weights
        min_cols = min(mod.in_features for _, mod in layers)
        b, group = baselines.fixed_config(bits_eff, min_cols, spec.gptq_group)
        emit(Log(f"{spec.method.upper()}: {b} bits, groups of {group} inputs "
                 f"({b + baselines.SIDE_BITS_PER_GROUP / group:.3f} bits/weight before per-layer overhead)"))

    def do_quantize():
        for i, (name, mod) in enumerate(layers):
            _check(cancel)
            t0 = time.perf_counter()
            ckpt = work / f"layer-{i:04d}.npz"
            w = mod.weight.detach().numpy()
            layer = _load_checkpoint(ckpt, name) if spec.resume else None
            if layer is None:
                h = stats[name].hessian if need_h else None
                if spec.method == "cvxq":
                    plan = plans[name]
                    d = depths[name]
                    q = cvxq_method.quantize_layer(plan, w, d, h, cancel=cancel.core)
                    recon = q.recon
                    layer_args = dict(transposed=False, group_rows=spec.group_rows, kind=spec.quantizer,
                                      depth=d, idx=q.idx, loc=q.loc, scale=q.scale, table=plan.table,
                                      perm=plan.perm)
                    distortion = float((plan.curve[np.arange(plan.n_groups), d.reshape(-1)]).sum())
                else:
                    pin = pinned_depth(name, spec)
                    bl = pin if pin is not None else b
                    r = baselines.quantize_fixed(w, bl, group, h, cancel=cancel)
                    recon = r.recon
                    n_cl = r.loc.shape[0]
                    layer_args = dict(transposed=True, group_rows=group, kind="uniform",
                                      depth=np.full((n_cl, mod.out_features), bl, np.uint8), idx=r.idx_t,
                                      loc=r.loc, scale=r.scale, table=_core.builtin_table("uniform"), perm=None)
                    distortion = float("nan")
                bias = None
                if mod.bias is not None or spec.bias_correction:
                    bias = mod.bias.detach().numpy().copy() if mod.bias is not None else np.zeros(mod.out_features, np.float32)
                    if spec.bias_correction:
                        bias -= (recon - w) @ stats[name].x_mean.numpy()
                layer = PackedLinear.build(out_features=mod.out_features, in_features=mod.in_features,
                                           bias=bias, **layer_args)
                _save_checkpoint(ckpt, name, layer, distortion)
            packed[name] = layer
            dt = time.perf_counter() - t0
            nbytes = layer.nbytes() + 7 * (PER_TENSOR_HEADER_BYTES + len(name) + 14)
            wq = layer.dequantize()
            mse = float(np.mean((wq - w) ** 2))
            distortion = _checkpoint_distortion(ckpt)
            row = {"name": name, "shape": [mod.out_features, mod.in_features], "bits": 8 * nbytes / w.size,
                   "bytes": nbytes, "seconds": dt, "distortion": distortion, "mse": mse,
                   "mean_depth": float(layer.depth.mean())}
            layer_rows.append(row)
            emit(LayerDone(name, (mod.out_features, mod.in_features), row["bits"], nbytes, dt, distortion, mse))
            emit(StageProgress("quantize", i + 1, len(layers), name))

    stages.run("quantize", do_quantize, total=len(layers))

    # The in-memory model now computes exactly what the packed model computes.
    with torch.no_grad():
        for name, mod in layers:
            layer = packed[name]
            mod.weight.data = torch.from_numpy(layer.dequantize())
            if layer.bias is not None:
                mod.bias = torch.nn.Parameter(torch.from_numpy(layer.bias.copy()), requires_grad=False)

    def do_save():
        meta = {"spec": json.dumps(spec.to_dict()), "method": spec.method}
        save_model_file(out / MODEL_FILE, packed, rest, meta)
        model.config.save_pretrained(out)
        tok.save_pretrained(out)

    stages.run("save", do_save)
    _check(cancel)
    ppl_after = stages.run("evaluate", lambda: perplexities("quantized")) if evals else {}

    model_bytes = (out / MODEL_FILE).stat().st_size
    q_bytes = sum(r["bytes"] for r in layer_rows)
    report = {
        "tool": "cvxq-tui",
        "command": spec.batch_command(),
        "spec": spec.to_dict(),
        "model": dataclasses.asdict(loaded.info),
        "layers": layer_rows,
        "totals": {
            "quantized_weights": n_weights,
            "bits_per_weight": 8 * q_bytes / n_weights,
            "quantized_layer_bytes": q_bytes,
            "unquantized_bytes": rest_bytes,
            "model_bytes": model_bytes,
            "model_mb": model_bytes / 1e6,
            "budget": spec.budget_text(),
            "perplexity_before": ppl_before,
            "perplexity_after": ppl_after,
            "seconds_per_stage": stages.seconds,
            "seconds_total": time.perf_counter() - t_start,
            "peak_rss_mb": _peak_rss_mb(),
            "eval_windows": {k: list(v.shape) for k, v in evals.items()},
            "calib_windows": list(calib.shape),
        },
    }
    write_atomic(out / REPORT_FILE, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
    shutil.rmtree(work, ignore_errors=True)
    emit(Finished(report, str(out)))
    return report


def allocate_cvxq(plans, layers, spec: JobSpec, budget_bits: float, n_weights: int, fixed: int,
                  rest_bytes: int):
    """One allocation over every group of every layer; returns depths per layer."""
    from .methods.cvxq import SIDE_BITS_PER_GROUP

    names = [n for n, _ in layers]
    counts = np.concatenate([plans[n].layout.cluster_counts() for n in names])
    curve = np.ascontiguousarray(np.concatenate([plans[n].curve for n in names]))
    pinned = np.concatenate([np.full(plans[n].n_groups, -1 if (p := pinned_depth(n, spec)) is None else p, np.int8)
                             for n in names])
    side = np.full(9, float(SIDE_BITS_PER_GROUP))
    try:
        res = _core.allocate_bits(counts, float(budget_bits), curve=curve, side_bits=side,
                                  pinned=pinned if (pinned >= 0).any() else None)
    except _core.InfeasibleError as e:
        lo, hi = _feasible_range(counts, side, pinned)
        if spec.bits is not None:
            to_bpw = lambda bits: (bits + 8 * fixed) / n_weights
            raise BudgetError(f"--bits {spec.bits:g} cannot be met with these layers and settings: reachable is "
                              f"{to_bpw(lo):.3f} to {to_bpw(hi):.3f} bits/weight all-in") from None
        to_mb = lambda bits: (bits / 8 + fixed + rest_bytes) / 1e6
        raise BudgetError(f"--size {spec.size / 1e6:.2f}MB cannot be met: reachable is {to_mb(lo):.2f}MB to "
                          f"{to_mb(hi):.2f}MB (unquantized tensors alone take {rest_bytes / 1e6:.2f}MB)") from None
    depth = res["depth"].astype(np.uint8)
    out, layer_bits, pos = {}, {}, 0
    for n in names:
        p = plans[n]
        d = depth[pos:pos + p.n_groups]
        pos += p.n_groups
        out[n] = d.reshape(p.layout.n_clusters, p.layout.cols)
        layer_bits[n] = float((d.astype(np.float64) * p.layout.cluster_counts()).sum() / (p.layout.rows * p.layout.cols))
    rd = _rd_curve(curve, counts, side, n_weights, fixed)
    return out, Allocation(layer_bits, float(res["log2_lambda"]), rd)


def _feasible_range(counts, side, pinned):
    lo_d = np.where(pinned >= 0, pinned, 0)
    hi_d = np.where(pinned >= 0, pinned, 8)
    return float((counts * lo_d).sum() + side[0] * counts.size), float((counts * hi_d).sum() + side[8] * counts.size)


def _rd_curve(curve, counts, side, n_weights, fixed, points: int = 12):
    """Predicted distortion against all-in bits/weight, from the solved curves (cheap: the
    solver is re-run on the same curves)."""
    res = []
    lo = (side[0] * counts.size + 8 * fixed) / n_weights
    for bpw in np.linspace(max(lo + 0.3, 1.5), 6.0, points):
        try:
            r = _core.allocate_bits(counts, float(bpw * n_weights - 8 * fixed), curve=curve, side_bits=side)
            res.append((float(bpw), float(r["distortion"])))
        except Exception:
            continue
    return res


def _save_checkpoint(path: Path, name: str, layer: PackedLinear, distortion: float) -> None:
    t = layer.to_tensors("layer")
    t["distortion"] = np.array([distortion])
    write_atomic(path, lambda tmp: np.savez(open(tmp, "wb"), **t))


def _load_checkpoint(path: Path, name: str) -> Optional[PackedLinear]:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            t = {k: z[k] for k in z.files}
        return PackedLinear.from_tensors("layer", t)
    except Exception:
        return None  # a damaged checkpoint is redone


def _checkpoint_distortion(path: Path) -> float:
    try:
        with np.load(path) as z:
            return float(z["distortion"][0])
    except Exception:
        return float("nan")
