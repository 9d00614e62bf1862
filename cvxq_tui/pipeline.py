"""The one pipeline both front ends run: load -> calibrate -> allocate -> quantize -> save ->
evaluate, emitting events (cvxq_tui.events) and honouring a cancel token between work units.
Never imports textual."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import resource
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import _core, checkpoints, faults
from .errors import BudgetError, InputError, JobCancelled, OutputError
from .events import (Allocation, Finished, LayerDone, LayerInfo, LazyList, Log, StageFinished,
                     StageProgress, StageStarted, abandoned_loads)
from .packed import MODEL_FILE, PackedLinear, save_model_file, write_atomic
from .spec import JobSpec

JOB_FILE = "job.json"
REPORT_FILE = "report.json"
WORK_DIR = ".work"
PER_TENSOR_HEADER_BYTES = 96  # safetensors JSON entry per tensor, besides the name
# The header's checksum table adds, per tensor, the name again and an escaped JSON entry
# (\"name\":\"crc32hex\",): 18 bytes besides the name.
CHECKSUM_ENTRY_BYTES = 18


def _header_bytes(tensor_name_len: int) -> int:
    """Header bytes one tensor costs in the model file (its entry and its checksum)."""
    return PER_TENSOR_HEADER_BYTES + CHECKSUM_ENTRY_BYTES + 2 * tensor_name_len


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
        self.cpu_seconds: dict[str, float] = {}  # process CPU time (all threads)

    def run(self, stage: str, fn, total: int = 0, detail: str = ""):
        self.emit(StageStarted(stage, total, detail))
        t0 = time.perf_counter()
        c0 = time.process_time()
        try:
            out = fn()
        except _core.Cancelled:
            # The core saw the cancel flag between two work units.
            raise JobCancelled("job cancelled; finished layers are kept: rerun with --resume to continue") from None
        dt = time.perf_counter() - t0
        self.seconds[stage] = self.seconds.get(stage, 0.0) + dt
        self.cpu_seconds[stage] = self.cpu_seconds.get(stage, 0.0) + time.process_time() - c0
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
    started = None
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
                checkpoints.remove_stale_temporaries(out)
                started = old.get("started")
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
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    record = {"identity": spec.identity(), "job_id": job_id(spec), "spec": spec.to_dict(),
              "command": spec.batch_command(), "tool": "cvxq-tui", "started": started or now}
    if started:
        record["resumed"] = now
    write_atomic(job_file, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2)))
    return out


def job_id(spec: JobSpec) -> str:
    """A short name of the job (its identity hashed), recorded in job.json, in the packed
    model's metadata and in report.json, so each output file says which job made it."""
    return hashlib.sha256(spec.identity().encode()).hexdigest()[:16]


# --- budget ----------------------------------------------------------------------------------
def _layer_fixed_bytes(name: str, rows: int, out_features: int, has_perm: bool, has_bias: bool,
                       has_table: bool = False) -> int:
    """Bytes of a packed layer that do not depend on the depths: metadata, permutation,
    bias, a Lloyd table and the file header entries of exactly the tensors
    PackedLinear.to_tensors writes (meta, depth, payload, loc, scale, then the optional ones)."""
    b = 8 * 8
    if has_perm:
        b += rows * (2 if rows < 32768 else 4)
    if has_bias:
        b += 2 * out_features
    if has_table:
        b += 4 * _core.TABLE_SIZE
    n_tensors = 5 + int(has_perm) + int(has_bias) + int(has_table)
    return b + n_tensors * _header_bytes(len(name) + 14)


def _rest_bytes(rest: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() + _header_bytes(len(k)) for k, t in rest.items())


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
class Job:
    """The stages of one job, callable one by one (the TUI re-solves the allocation for a new
    budget without recalibrating; benchmarks evaluate several budgets on one calibration).
    run() calls them in order."""

    def __init__(self, spec: JobSpec, on_event: Callable = lambda e: None,
                 cancel: Optional[CancelToken] = None):
        self.spec = spec.validate()
        self.emit = on_event
        self.cancel = cancel or CancelToken()
        self.stages = _Stages(on_event)
        self.t_start = time.perf_counter()
        self.c_start = time.process_time()
        self.out: Optional[Path] = None
        self.packed: dict[str, PackedLinear] = {}
        self.applied: set[str] = set()  # layers whose model weights are the packed ones
        self.layer_rows: list[dict] = []
        self.plans: dict = {}
        self.depths: dict = {}
        self.fixed_config = None
        self.ppl_before: dict[str, float] = {}
        self.ppl_after: dict[str, float] = {}
        self.round = 0
        # What --resume took from OUT/.work instead of recomputing (reported in report.json).
        self.reused = {"calibration": False, "perplexity_before": False, "plans": [], "layers": []}
        self.adopted = False    # load, calibrate and plan were taken over from another job
        self.window_nll: dict[str, dict[str, list[float]]] = {}  # tag -> text -> NLL per window
        torch.manual_seed(spec.seed)

    # -- load ----------------------------------------------------------------------------
    def load(self) -> None:
        from . import models, text

        spec = self.spec
        if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise InputError("--device cuda: no CUDA device is available; use --device cpu")
            self.emit(Log("CUDA calibration is not implemented yet; running on the CPU", "warning"))
        _check(self.cancel)
        self.loaded = self.stages.run("load", lambda: _cancellable(lambda: models.load_model(spec.model),
                                                                   self.cancel))
        self.model, self.tok = self.loaded.model, self.loaded.tokenizer
        self.model.eval()
        self.layers = select_layers(models.quantizable_linears(self.model), spec)
        self._announce_layers()
        self.n_weights = sum(mod.weight.numel() for _, mod in self.layers)
        self.original = {name: mod.weight.detach().clone() for name, mod in self.layers}
        self.original_bias = {name: (None if mod.bias is None else mod.bias.detach().clone())
                              for name, mod in self.layers}
        _check(self.cancel)
        calib_text = text.read_text(spec.text) if spec.text else text.default_text("calib")
        self.calib = text.token_windows(self.tok, calib_text, spec.seq_len, spec.calib_samples,
                                        purpose="calibration")
        _check(self.cancel)
        self.evals = self.eval_windows() if spec.evaluate else {}
        _check(self.cancel)
        rest = unquantized_tensors(self.model, {n for n, _ in self.layers})
        self.rest = rest
        self.rest_bytes = _rest_bytes(rest)

    def _announce_layers(self) -> None:
        for name, mod in self.layers:
            self.emit(LayerInfo(name, (mod.out_features, mod.in_features), mod.weight.numel()))

    def eval_windows(self) -> dict:
        """The evaluation windows of the spec (built-in or --eval-text; plus the other-domain
        text with ood_eval), whether or not the spec evaluates."""
        from . import text

        spec = self.spec
        eval_text = text.read_text(spec.eval_text) if spec.eval_text else text.default_text("eval")
        evals = {"eval": text.token_windows(self.tok, eval_text, spec.eval_seq_len, None,
                                            purpose="evaluation")[: spec.eval_samples]}
        if spec.ood_eval:
            evals["ood"] = text.token_windows(self.tok, text.default_text("ood"), spec.eval_seq_len,
                                              None, purpose="evaluation")[: spec.eval_samples]
        return evals

    # -- reuse --------------------------------------------------------------------------
    def adopt(self, donor: "Job") -> None:
        """Take over what `donor` (a job of the same calibration_key, taken at least as far
        as its plans) already computed: the loaded model, the calibration and the plans.
        run() then skips load, calibrate and plan; the model is shared, not copied, and is
        put back to its original weights here."""
        if calibration_key(donor.spec) != calibration_key(self.spec):
            raise ValueError("adopt: the donor job was calibrated for other settings")
        for attr in ("loaded", "model", "tok", "layers", "n_weights", "original", "original_bias",
                     "calib", "rest", "rest_bytes", "stats", "g2"):
            setattr(self, attr, getattr(donor, attr))
        self.plans = dict(donor.plans)  # re-estimation rounds replace plans: keep the donor's
        self.adopted = True
        self.restore()

    # -- evaluate ------------------------------------------------------------------------
    def perplexities(self, tag: str) -> dict[str, float]:
        """Perplexity on every evaluation text. The float model's (tag "float") is cached
        per model, torch version and exact token windows: it is the same for every job."""
        from . import evaluate

        cached = {}
        if tag == "float":
            cached = {k: v for k in self.evals if (v := _cached_nll(self._ppl_key(k), len(self.evals[k])))}
            if cached:
                self.emit(Log(f"float perplexity ({', '.join(cached)}) from the cache, measured before "
                              "on the same model and token windows"))

        def work():
            nll = dict(cached)
            for key, windows in self.evals.items():
                if key in nll:
                    continue
                def prog(done, total, key=key):
                    self.emit(StageProgress("evaluate", done, total, f"{tag} model, {key} text"))
                nll[key] = evaluate.window_nlls(self.model, windows, on_progress=prog, cancel=self.cancel)
                if tag == "float":
                    _store_nll(self._ppl_key(key), nll[key])
            self.window_nll[tag] = nll
            return {k: math.exp(sum(v) / len(v)) for k, v in nll.items()}
        return self.stages.run("evaluate", work) if self.evals else {}

    def _ppl_key(self, key: str) -> str:
        import hashlib

        h = hashlib.sha256()
        h.update(f"{self.loaded.info.fingerprint}\0{self.loaded.info.source}\0{torch.__version__}\0".encode())
        h.update(self.evals[key].numpy().tobytes())
        return h.hexdigest()[:32]

    # -- calibrate -----------------------------------------------------------------------
    @property
    def need_hessian(self) -> bool:
        s = self.spec
        return s.method == "gptq" or (s.method == "cvxq" and s.error_feedback)

    def calibrate(self) -> None:
        from . import calibrate

        spec = self.spec
        path = self._work_file(checkpoints.CALIBRATION_FILE)
        if path and spec.resume:
            got = checkpoints.load_calibration(path, [n for n, _ in self.layers])
            if got is not None and (got[1] is not None) == (spec.method == "cvxq"):
                self.stats, self.g2 = got
                self.reused["calibration"] = True
                self.emit(Log("calibration: reused from the interrupted run"))
                return

        def work():
            def prog(done, total, what):
                faults.point("calibrate")
                self.emit(StageProgress("calibrate", done, total, what))
            if spec.method == "cvxq" and spec.sensitivity != "hessian":
                # The input statistics come from the sensitivity pass's own forward passes.
                rec = calibrate.InputStatsRecorder(self.layers, self.need_hessian)
                g2 = calibrate.collect_sensitivity(self.model, self.layers, self.calib,
                                                   estimator=spec.sensitivity, seed=spec.seed,
                                                   on_progress=prog, cancel=self.cancel, record=rec)
                return rec.result(), g2
            stats = calibrate.collect_input_stats(self.model, self.layers, self.calib,
                                                  need_hessian=self.need_hessian, on_progress=prog,
                                                  cancel=self.cancel)
            g2 = None
            if spec.method == "cvxq":
                g2 = calibrate.collect_sensitivity(self.model, self.layers, self.calib,
                                                   estimator=spec.sensitivity, input_stats=stats,
                                                   seed=spec.seed, on_progress=prog, cancel=self.cancel)
            return stats, g2

        self.stats, self.g2 = self.stages.run("calibrate", work, total=self.calib.shape[0])
        faults.point("calibrated")
        if path:
            checkpoints.save_calibration(path, self.stats, self.g2)

    def _work_file(self, name: str) -> Optional[Path]:
        """A checkpoint in OUT/.work, or None when the job has no output folder (benchmarks
        and the TUI's previews run stages without one)."""
        return self.out / WORK_DIR / name if self.out is not None else None

    # -- plan + allocate -------------------------------------------------------------------
    def plan(self) -> None:
        """CVXQ only: cluster rows and measure distortion curves of every layer."""
        from .methods import cvxq as cvxq_method

        spec = self.spec

        def work():
            for i, (name, mod) in enumerate(self.layers):
                _check(self.cancel)
                path = checkpoints.plan_path(self.out / WORK_DIR, self.round, i) if self.out else None
                plan = None
                if path and spec.resume:
                    plan = checkpoints.load_plan(path, name, mod.out_features, mod.in_features,
                                                 spec.group_rows, spec.quantizer)
                    if plan is not None:
                        self.reused["plans"].append(name)
                if plan is None:
                    w = self.original[name].numpy()
                    plan = cvxq_method.plan_layer(
                        name, w, self.g2[name].numpy(), group_rows=spec.group_rows, kind=spec.quantizer,
                        cancel=self.cancel.core, seed=spec.seed)
                    faults.point("plan")
                    if path:
                        checkpoints.save_plan(path, plan)
                self.plans[name] = plan
                self.emit(StageProgress("plan", i + 1, len(self.layers), name))

        self.stages.run("plan", work, total=len(self.layers))

    @property
    def corrects_bias(self) -> bool:
        # Bias correction is part of CVXQ; the baselines stay as their authors define them.
        return self.spec.bias_correction and self.spec.method == "cvxq"

    def has_bias(self, name: str, mod) -> bool:
        return self.corrects_bias or mod.bias is not None

    def allocate(self, bits: Optional[float] = None, size: Optional[int] = None) -> Allocation | None:
        """Solve the budget (default: the spec's). CVXQ: depths per group from the plans;
        baselines: one (depth, group) configuration."""
        from .methods import baselines

        spec = self.spec
        if bits is None and size is None:
            bits, size = spec.bits, spec.size
        if spec.method == "cvxq":
            fixed = sum(_layer_fixed_bytes(n, mod.out_features, mod.out_features, True, self.has_bias(n, mod),
                                            spec.quantizer == "lloyd")
                        for n, mod in self.layers)
            budget_bits = bits * self.n_weights - 8 * fixed if bits is not None else \
                8 * (size - self.rest_bytes - fixed)
            self.depths, alloc = self.stages.run(
                "allocate", lambda: allocate_cvxq(self.plans, self.layers, spec, budget_bits, self.n_weights,
                                                  fixed, self.rest_bytes, bits, size))
            self.emit(alloc)
            return alloc
        # RTN/GPTQ use their standard configurations: B bits with a float16 scale and zero per
        # group of inputs, B + 32 / group bits per weight; the per-layer metadata (under 0.02
        # bits/weight) comes on top. With --size it is subtracted first.
        fixed = sum(_layer_fixed_bytes(n, mod.in_features, mod.out_features, False, self.has_bias(n, mod))
                    for n, mod in self.layers)
        from_size = bits is None
        if from_size:
            bits = 8 * (size - self.rest_bytes - fixed) / self.n_weights
        try:
            b, group = baselines.fixed_config(bits, [m.in_features for _, m in self.layers], spec.gptq_group)
        except BudgetError:
            if not from_size:
                raise
            # Say it in the unit the user asked in, not as a (possibly negative) bits figure.
            least = 1 + baselines.SIDE_BITS_PER_GROUP / (spec.gptq_group or 4096)
            least_mb = (self.rest_bytes + fixed + least * self.n_weights / 8) / 1e6
            raise BudgetError(f"--size {size / 1e6:.2f}MB cannot be met by {spec.method.upper()}: it needs at "
                              f"least {least_mb:.2f}MB (unquantized tensors alone take {self.rest_bytes / 1e6:.2f}MB); "
                              "raise --size or use --method cvxq") from None
        self.fixed_config = (b, group)
        self.emit(Log(f"{spec.method.upper()}: {b} bits, groups of {group} inputs "
                      f"({b + baselines.SIDE_BITS_PER_GROUP / group:.3f} bits/weight before per-layer overhead)"))
        return None

    # -- quantize -----------------------------------------------------------------------
    def quantize(self, checkpoints: bool = True) -> None:
        self.packed, self.layer_rows = {}, []
        self.applied.clear()
        self._hinv_u = (None, None)  # (id of the InputStats, its factor): the last one only
        try:
            self.stages.run("quantize", lambda: self._quantize_all(checkpoints), total=len(self.layers))
        finally:
            self._hinv_u = (None, None)

    def _quantize_all(self, checkpoints: bool) -> None:
        for i, (name, mod) in enumerate(self.layers):
            _check(self.cancel)
            t0 = time.perf_counter()
            ckpt = self.out / WORK_DIR / f"layer-{i:04d}.npz" if (checkpoints and self.out) else None
            layer = _load_checkpoint(ckpt) if (ckpt and self.spec.resume) else None
            if layer is not None and not self._checkpoint_fits(name, mod, layer):
                layer = None  # made under another allocation: redo it
            if layer is None:
                layer, distortion = self.quantize_layer(name, mod)
                faults.point("quantize")
                if ckpt:
                    _save_checkpoint(ckpt, layer, distortion)
            else:
                distortion = _checkpoint_distortion(ckpt)
                self.reused["layers"].append(name)
                self.emit(Log(f"{name}: reused from the interrupted run"))
            self.packed[name] = layer
            dt = time.perf_counter() - t0
            w = self.original[name].numpy()
            nbytes = layer.nbytes() + len(layer.to_tensors(name)) * _header_bytes(len(name) + 14)
            # Dequantized once: for the error and straight into the model (apply() then has
            # nothing left to do for this layer).
            wq = layer.dequantize()
            mse = float(np.mean((wq - w) ** 2))
            self._set_layer(name, mod, wq, layer)
            row = {"name": name, "shape": [mod.out_features, mod.in_features], "bits": 8 * nbytes / w.size,
                   "bytes": nbytes, "seconds": dt, "distortion": distortion, "mse": mse,
                   "mean_depth": float(layer.depth.mean())}
            self.layer_rows.append(row)
            self.emit(LayerDone(name, (mod.out_features, mod.in_features), row["bits"], nbytes, dt, distortion, mse))
            self.emit(StageProgress("quantize", i + 1, len(self.layers), name))

    def _checkpoint_fits(self, name: str, mod, layer: PackedLinear) -> bool:
        """A layer checkpoint is used only if it has this layer's shape and the depths this
        run's allocation gives it."""
        if (layer.out_features, layer.in_features) != (mod.out_features, mod.in_features):
            return False
        if self.spec.method == "cvxq":
            return np.array_equal(layer.depth, self.depths[name])
        b, group = self.fixed_config
        pin = pinned_depth(name, self.spec)
        return layer.group_rows == group and bool((layer.depth == (pin if pin is not None else b)).all())

    def quantize_layer(self, name: str, mod) -> tuple[PackedLinear, float]:
        from .methods import baselines
        from .methods import cvxq as cvxq_method
        from .methods.gptq import inverse_cholesky

        spec = self.spec
        w = self.original[name].numpy()
        h = self.stats[name].hessian if self.need_hessian else None
        if spec.method == "cvxq":
            plan, d = self.plans[name], self.depths[name]
            u = None
            if h is not None:
                # q/k/v (and gate/up) share one InputStats, hence one factor of H^-1.
                key = id(self.stats[name])
                if self._hinv_u[0] != key:
                    self._hinv_u = (key, inverse_cholesky(h).numpy())
                u = self._hinv_u[1]
            q = cvxq_method.quantize_layer(plan, w, d, h, cancel=self.cancel.core, hinv_u=u)
            recon = q.recon
            args = dict(transposed=False, group_rows=spec.group_rows, kind=spec.quantizer, depth=d,
                        idx=q.idx, loc=q.loc, scale=q.scale, table=plan.table, perm=plan.perm)
            distortion = float(plan.curve[np.arange(plan.n_groups), d.reshape(-1)].sum())
        else:
            b, group = self.fixed_config
            pin = pinned_depth(name, spec)
            bl = pin if pin is not None else b
            r = baselines.quantize_fixed(w, bl, group, h, cancel=self.cancel)
            recon = r.recon
            args = dict(transposed=True, group_rows=group, kind="uniform",
                        depth=np.full((r.loc.shape[0], mod.out_features), bl, np.uint8), idx=r.idx_t,
                        loc=r.loc, scale=r.scale, table=_core.builtin_table("uniform"), perm=None)
            distortion = float("nan")
        bias = None
        if self.has_bias(name, mod):
            ob = self.original_bias[name]
            bias = ob.numpy().copy() if ob is not None else np.zeros(mod.out_features, np.float32)
            if self.corrects_bias:
                bias -= (recon - w) @ self.stats[name].x_mean.numpy()
        layer = PackedLinear.build(out_features=mod.out_features, in_features=mod.in_features, bias=bias, **args)
        return layer, distortion

    def reestimate(self) -> None:
        """CVXQ's re-estimation round: sensitivities measured at the quantized weights (the
        point the model will actually run at), then clustering, curves and allocation again
        from the original weights."""
        from . import calibrate

        self.apply()

        def work():
            def prog(done, total, what):
                self.emit(StageProgress("calibrate", done, total, what + " (re-estimate)"))
            return calibrate.collect_sensitivity(self.model, self.layers, self.calib,
                                                 estimator=self.spec.sensitivity, input_stats=self.stats,
                                                 seed=self.spec.seed + 1, on_progress=prog, cancel=self.cancel)

        self.g2 = self.stages.run("calibrate", work, total=self.calib.shape[0])
        self.restore()
        self.plan()
        self.allocate()

    # -- model state ------------------------------------------------------------------
    def apply(self) -> None:
        """The in-memory model computes exactly what the packed model computes."""
        for name, mod in self.layers:
            if name not in self.applied:
                self._set_layer(name, mod, self.packed[name].dequantize(), self.packed[name])

    def _set_layer(self, name: str, mod, wq: np.ndarray, layer: PackedLinear) -> None:
        with torch.no_grad():
            mod.weight.data = torch.from_numpy(wq)
            if layer.bias is not None:
                mod.bias = torch.nn.Parameter(torch.from_numpy(layer.bias.copy()), requires_grad=False)
        self.applied.add(name)

    def restore(self) -> None:
        self.applied.clear()
        with torch.no_grad():
            for name, mod in self.layers:
                mod.weight.data = self.original[name].clone()
                ob = self.original_bias[name]
                mod.bias = None if ob is None else torch.nn.Parameter(ob.clone(), requires_grad=False)

    # -- save + report ----------------------------------------------------------------
    def save(self) -> None:
        def work():
            meta = {"spec": json.dumps(self.spec.to_dict()), "method": self.spec.method,
                    "job_id": job_id(self.spec)}
            # Config and tokenizer first, the model file last: a folder holding a model
            # file holds everything it needs to load.
            _save_pretrained_atomic(self.out, self.model.config, self.tok)
            save_model_file(self.out / MODEL_FILE, self.packed, self.rest, meta)
        self.stages.run("save", work)

    def totals(self) -> dict:
        q_bytes = sum(r["bytes"] for r in self.layer_rows)
        return {
            "quantized_weights": self.n_weights,
            "bits_per_weight": 8 * q_bytes / self.n_weights,
            "quantized_layer_bytes": q_bytes,
            "unquantized_bytes": self.rest_bytes,
            "budget": self.spec.budget_text(),
            "perplexity_before": self.ppl_before,
            "perplexity_after": self.ppl_after,
            # Standard error (% of the ratio) of perplexity after / before, from the spread
            # of the per-window differences: differences between runs well inside it are noise.
            "perplexity_ratio_se_pct": self._ratio_se(),
            "seconds_per_stage": self.stages.seconds,
            "cpu_seconds_per_stage": self.stages.cpu_seconds,
            "seconds_total": time.perf_counter() - self.t_start,
            "cpu_seconds_total": time.process_time() - self.c_start,
            "peak_rss_mb": _peak_rss_mb(),
            "eval_windows": {k: list(v.shape) for k, v in self.evals.items()},
            "calib_windows": list(self.calib.shape),
        }

    def _ratio_se(self) -> dict[str, float]:
        from .evaluate import paired_se_pct

        a, b = self.window_nll.get("float", {}), self.window_nll.get("quantized", {})
        return {k: paired_se_pct(a[k], b[k]) for k in a if k in b}

    def report(self) -> dict:
        totals = self.totals()
        if self.out is not None and (self.out / MODEL_FILE).is_file():
            size = (self.out / MODEL_FILE).stat().st_size
            totals.update(model_bytes=size, model_mb=size / 1e6)
        return {"tool": "cvxq-tui", "job_id": job_id(self.spec), "resumed": self.reused,
                "command": self.spec.batch_command(), "spec": self.spec.to_dict(),
                "model": dataclasses.asdict(self.loaded.info), "layers": self.layer_rows, "totals": totals}

    def _perplexities_before(self) -> dict[str, float]:
        path = self._work_file(checkpoints.PERPLEXITY_FILE)
        if path and self.spec.resume and self.evals:
            got = checkpoints.load_json(path)
            if isinstance(got, dict) and set(got) == set(self.evals):
                self.reused["perplexity_before"] = True
                return got
        ppl = self.perplexities("float")
        if path and ppl:
            checkpoints.save_json(path, ppl)
        return ppl

    def check_resources(self) -> None:
        """Refuse a job this machine cannot finish (memory, disk) before the long stages."""
        from . import resources

        need = resources.check_memory(self)
        self.emit(Log(f"memory: about {need / 1e9:.2f} GB needed at the peak (estimate)"))
        if self.out is not None:
            resources.check_disk(self)

    def run(self) -> dict:
        existed = Path(self.spec.out).expanduser().exists()
        self.out = prepare_output(self.spec)
        try:
            return self._run()
        except (JobCancelled, KeyboardInterrupt):
            raise  # keep the folder: --resume continues from the finished work
        except BaseException:
            # A job that failed before finishing any layer leaves nothing behind, so the same
            # command can simply be run again.
            if not any((self.out / WORK_DIR).glob("layer-*.npz")):
                if existed:
                    (self.out / JOB_FILE).unlink(missing_ok=True)
                    shutil.rmtree(self.out / WORK_DIR, ignore_errors=True)
                else:
                    shutil.rmtree(self.out, ignore_errors=True)
            raise

    def _run(self) -> dict:
        if self.adopted:
            self.emit(Log("reusing the calibration and plans already computed for these settings"))
            self._announce_layers()
            self.evals = self.eval_windows() if self.spec.evaluate else {}
        else:
            self.load()
            _check(self.cancel)
            self.check_resources()
        self.ppl_before = self._perplexities_before()
        _check(self.cancel)
        if not self.adopted:
            self.calibrate()
            _check(self.cancel)
            if self.spec.method == "cvxq":
                self.plan()
        self.allocate()
        faults.point("allocate")
        rounds = self.spec.rounds if self.spec.method == "cvxq" else 1
        for r in range(rounds):
            self.round = r
            if r:
                self.reestimate()
            # Only the final round's layers are kept for --resume.
            self.quantize(checkpoints=r == rounds - 1)
        self.apply()
        _check(self.cancel)
        self.save()
        faults.point("saved")
        _check(self.cancel)
        self.ppl_after = self.perplexities("quantized")
        report = self.report()
        write_atomic(self.out / REPORT_FILE, lambda tmp: Path(tmp).write_text(json.dumps(report, indent=2)))
        shutil.rmtree(self.out / WORK_DIR, ignore_errors=True)
        self.emit(Finished(report, str(self.out)))
        return report

    # -- measured rate-distortion ---------------------------------------------------------
    def measure_budget(self, bits: float) -> dict:
        """CVXQ, on a job taken as far as its plans: allocate `bits`, quantize in memory
        (nothing is written), evaluate and put the original weights back. Returns the
        all-in bits/weight reached, the predicted distortion and the perplexities."""
        if not self.evals:
            self.evals = self.eval_windows()
        self.allocate(bits=bits)
        self.quantize(checkpoints=False)
        try:
            self.apply()
            ppl = self.perplexities(f"{bits:g}-bit")
        finally:
            self.restore()
        reached = self.totals()["bits_per_weight"]
        distortion = float(sum(r["distortion"] for r in self.layer_rows))
        return {"target_bits": float(bits), "bits": reached, "distortion": distortion, "perplexity": ppl}


def calibration_key(spec: JobSpec) -> str:
    """What load + calibrate + plan depend on: two specs with the same key can share one
    calibration and one set of plans (budget, pins, output and evaluation do not enter)."""
    d = spec.to_dict()
    for k in ("bits", "size", "pin", "out", "resume", "overwrite", "evaluate", "eval_text", "eval_samples",
              "eval_seq_len", "ood_eval", "rounds", "bias_correction", "gptq_group"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True)


def _cancellable(fn, cancel, poll_s: float = 0.05):
    """fn() in a helper thread, polling `cancel` meanwhile: a cancel raises JobCancelled at
    once (for work without cancel points of its own, such as loading a checkpoint). The
    abandoned call finishes in the background and its result is dropped."""
    if cancel is None:
        return fn()
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="cvxq-load", daemon=True)
    t.start()
    while t.is_alive():
        t.join(poll_s)
        if cancel.is_set() and t.is_alive():
            abandoned_loads[:] = [a for a in abandoned_loads if a.is_alive()] + [t]
            raise JobCancelled("job cancelled while loading the model; nothing was computed yet")
    if "error" in box:
        raise box["error"]
    return box["value"]


def run(spec: JobSpec, on_event: Callable = lambda e: None, cancel: Optional[CancelToken] = None) -> dict:
    """Run a whole job; returns the report (also written to OUT/report.json)."""
    return Job(spec, on_event, cancel).run()


def _save_pretrained_atomic(out: Path, *objects) -> None:
    """save_pretrained of each object into a scratch folder, then every file moved into
    `out` with write_atomic, so a reader never sees a half-written config or tokenizer."""
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="pretrained-", dir=out / WORK_DIR))
    try:
        for obj in objects:
            obj.save_pretrained(scratch)
        for f in sorted(scratch.iterdir()):
            if f.is_file():
                write_atomic(out / f.name, lambda tmp, f=f: shutil.copyfile(f, tmp))
    except OSError as e:
        from .packed import write_error_message
        raise OutputError(write_error_message(e, out / "config.json")) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def allocate_cvxq(plans, layers, spec: JobSpec, budget_bits: float, n_weights: int, fixed: int,
                  rest_bytes: int, bits: Optional[float], size: Optional[int]):
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
    except _core.InfeasibleError:
        lo, hi = _feasible_range(counts, side, pinned)
        if bits is not None:
            to_bpw = lambda b: (b + 8 * fixed) / n_weights
            raise BudgetError(f"--bits {bits:g} cannot be met with these layers and settings: reachable is "
                              f"{to_bpw(lo):.3f} to {to_bpw(hi):.3f} bits/weight all-in") from None
        to_mb = lambda b: (b / 8 + fixed + rest_bytes) / 1e6
        raise BudgetError(f"--size {size / 1e6:.2f}MB cannot be met: reachable is {to_mb(lo):.2f}MB to "
                          f"{to_mb(hi):.2f}MB (unquantized tensors alone take {rest_bytes / 1e6:.2f}MB)") from None
    depth = res["depth"].astype(np.uint8)
    out, layer_bits, pos = {}, {}, 0
    for n in names:
        p = plans[n]
        d = depth[pos:pos + p.n_groups]
        pos += p.n_groups
        out[n] = d.reshape(p.layout.n_clusters, p.layout.cols)
        layer_bits[n] = float((d.astype(np.float64) * p.layout.cluster_counts()).sum() / (p.layout.rows * p.layout.cols))
    # The predicted RD curve re-runs the solver a dozen times: only when someone reads it.
    rd = LazyList(lambda: _rd_curve(curve, counts, side, n_weights, fixed))
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


def _ppl_cache_file(key: str) -> Path:
    from .models import cache_dir

    return cache_dir() / "perplexity" / f"{key}.json"


def _cached_nll(key: str, n: int) -> Optional[list[float]]:
    """Per-window NLLs of the float model from the cache, or None."""
    try:
        v = json.loads(_ppl_cache_file(key).read_text())["window_nll"]
        v = [float(x) for x in v]
        return v if len(v) == n and all(math.isfinite(x) for x in v) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_nll(key: str, nll: list[float]) -> None:
    path = _ppl_cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps({"window_nll": nll})))
    except OSError:
        pass  # a cache that cannot be written only costs time


def _save_checkpoint(path: Path, layer: PackedLinear, distortion: float) -> None:
    t = layer.to_tensors("layer")
    t["distortion"] = np.array([distortion])
    write_atomic(path, lambda tmp: np.savez(open(tmp, "wb"), **t))


def _load_checkpoint(path: Path) -> Optional[PackedLinear]:
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
