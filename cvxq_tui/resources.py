"""Memory and disk a job needs, estimated once the model is loaded and before the long
stages, so that a job this machine cannot finish is refused with the numbers instead of
being killed by the OOM killer or failing on a full disk hours later.

The estimates are deliberately simple sums of the big allocations (weights, per-weight
statistics, Hessians, activations of one calibration batch, the copy safetensors makes
while writing); they are upper-ish bounds, not measurements."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import OutputError, ResourceError

MB = 1e6
RUNTIME_BYTES = 400 * MB        # interpreter, torch, transformers, the core
CALIB_BATCH = 4                 # windows per forward pass (calibrate.collect_input_stats)
EVAL_BATCH = 4                  # windows per forward pass (evaluate.perplexity)


def _config_sizes(model) -> tuple[int, int, int, int, int]:
    cfg = model.config
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 1024)
    inter = int(getattr(cfg, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 1)
    heads = int(getattr(cfg, "num_attention_heads", 0) or 1)
    vocab = int(getattr(cfg, "vocab_size", 0) or 32000)
    return hidden, inter, layers, heads, vocab


def _activation_bytes(model, batch: int, seq: int, backward: bool) -> float:
    hidden, inter, layers, heads, vocab = _config_sizes(model)
    tokens = batch * seq
    logits = tokens * vocab * 4 * (3 if backward else 2)      # logits, float copy, softmax/grad
    per_layer = tokens * (6 * hidden + 3 * inter) * 4 + batch * heads * seq * seq * 4 * 2
    kept = layers if backward else 2                           # backward keeps every block's
    return logits + per_layer * kept


def estimate_memory(job) -> dict[str, float]:
    """Peak resident bytes of the job, by part."""
    spec = job.spec
    n_params = sum(p.numel() for p in job.model.parameters())
    n_w = job.n_weights
    layers = job.layers
    parts = {"runtime": RUNTIME_BYTES, "model": 4.0 * n_params, "original weights": 4.0 * n_w}
    if spec.method == "cvxq":
        # sensitivities + their gradients while measuring + plans (curves, per group) + the
        # packed result and one layer's dequantized copy.
        parts["sensitivities"] = 4.0 * n_w * 2 + 40.0 * n_w / spec.group_rows
    if job.need_hessian:
        # One float32 [in, in] per layer (layers fed the same input share one, which this
        # bound ignores; the division at the end makes one more copy of each).
        parts["hessians"] = 4.0 * sum(mod.in_features ** 2 for _, mod in layers)
    backward = spec.method == "cvxq" and spec.sensitivity in ("fisher", "grad")
    calib = _activation_bytes(job.model, 1 if backward else CALIB_BATCH, spec.seq_len, backward)
    evals = _activation_bytes(job.model, EVAL_BATCH, spec.eval_seq_len, False) if spec.evaluate else 0.0
    parts["activations"] = max(calib, evals)
    # safetensors' numpy writer copies every tensor into one buffer before writing.
    parts["writing the model file"] = float(estimate_model_file(job))
    return parts


def estimate_model_file(job) -> int:
    bits = job.spec.bits if job.spec.bits is not None else 8.0
    if job.spec.size is not None:
        return int(job.spec.size)
    return int(job.rest_bytes + bits * job.n_weights / 8)


def memory_available() -> tuple[float, str]:
    """Bytes this process may still use: the system's available memory, or the container's
    limit when that is lower; CVXQ_MEMORY_AVAILABLE_MB overrides (tests, or a user who knows
    better)."""
    override = os.environ.get("CVXQ_MEMORY_AVAILABLE_MB")
    if override:
        return float(override) * MB, "CVXQ_MEMORY_AVAILABLE_MB"
    import psutil

    avail, where = float(psutil.virtual_memory().available), "available memory"
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
        if limit != "max":
            left = float(limit) - float(used)
            if left < avail:
                avail, where = left, "the container's memory limit"
    except (OSError, ValueError):
        pass
    return avail, where


def _rss() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss)


def check_memory(job) -> float:
    """Raises ResourceError when the estimate does not fit; returns the estimate in bytes."""
    parts = estimate_memory(job)
    need = sum(parts.values())
    avail, where = memory_available()
    have = avail + _rss()  # what is already resident (the loaded model) counts on both sides
    if os.environ.get("CVXQ_SKIP_MEMORY_CHECK") or need <= have:
        return need
    big = ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:4])
    raise ResourceError(
        f"this job needs about {need / 1e9:.2f} GB of memory ({big}) but {where} allows "
        f"{have / 1e9:.2f} GB; quantize fewer layers at a time (--include), lower --calib-samples/"
        f"--seq-len/--eval-seq-len, use --sensitivity hessian, or free memory "
        "(CVXQ_SKIP_MEMORY_CHECK=1 skips this check)")


def check_disk(job) -> None:
    """The model file, its temporary copy being written next to the old one on a resume, and
    the checkpoints in OUT/.work (about one more copy of the quantized layers plus the
    calibration) must fit."""
    out = job.out
    model_file = estimate_model_file(job)
    work = 4.0 * job.n_weights * (2 if job.spec.method == "cvxq" else 0) + job.n_weights + 1 * MB
    need = model_file + work + 20 * MB  # tokenizer, config, report
    try:
        free = float(shutil.disk_usage(out).free)
    except OSError:
        return
    override = os.environ.get("CVXQ_DISK_FREE_MB")
    if override:
        free = float(override) * MB
    if need > free:
        raise OutputError(
            f"{out} is on a disk with {free / MB:.0f} MB free but this job needs about {need / MB:.0f} MB "
            f"(model file {model_file / MB:.0f} MB, checkpoints {work / MB:.0f} MB); free some space or "
            "choose an --out on another disk")
