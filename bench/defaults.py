"""How the CVXQ defaults were chosen: one variant per setting (sensitivity estimator, rows
per group, bias correction, error feedback, re-estimation rounds) against a reference, all at
the same all-in budget on the default model, with the same calibration and evaluation
windows for every variant. The calibration (input statistics, and the sensitivities of each
estimator) is measured once and shared; plans are shared where they can be.

Perplexity is exp(mean NLL) over every predicted token of the windows. Since every variant
sees the same windows, the table also gives the paired standard error of each variant's
log-perplexity difference to the reference (per-window NLL differences), as +-% of the
perplexity: differences well inside it are noise.

    python bench/defaults.py                                    # the table in the README
    python bench/defaults.py --variants "sensitivity=grad,group_rows=128"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time

import torch
import torch.nn.functional as F

from cvxq_tui import calibrate
from cvxq_tui.pipeline import Job
from cvxq_tui.spec import JobSpec

DEFAULT_VARIANTS = [
    "",  # the reference: the spec's defaults (variants equal to it are skipped)
    "sensitivity=grad",
    "sensitivity=hessian",
    "sensitivity=fisher",
    "group_rows=128",
    "group_rows=64",
    "bias_correction=0",
    "bias_correction=1",
    "error_feedback=0",
    "error_feedback=1",
    "rounds=2",
]


def window_nlls(model, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Mean next-token NLL of each window (float64 [n])."""
    out = []
    with torch.inference_mode():
        for i in range(0, windows.shape[0], batch_size):
            b = windows[i:i + batch_size]
            logits = model(input_ids=b, use_cache=False).logits
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), b[:, 1:].reshape(-1),
                                  reduction="none").view(b.shape[0], -1)
            out.append(nll.double().mean(1))
    return torch.cat(out)


def parse_variant(text: str) -> dict:
    kw = {}
    for part in filter(None, text.split(",")):
        k, _, v = part.partition("=")
        k = k.strip()
        field = {f.name: f for f in dataclasses.fields(JobSpec)}[k]
        kw[k] = (v not in ("0", "false", "off")) if field.type in ("bool", bool) else \
            int(v) if field.type in ("int", int) else v
    return kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, default=3.0)
    ap.add_argument("--calib-samples", type=int, default=JobSpec.calib_samples)
    ap.add_argument("--seq-len", type=int, default=JobSpec.seq_len)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                    help="comma-separated spec overrides, e.g. sensitivity=grad,group_rows=128; '' = defaults")
    ap.add_argument("--include", nargs="*", default=[], help="only these layer globs (quick checks)")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()

    base = JobSpec(bits=a.bits, calib_samples=a.calib_samples, seq_len=a.seq_len, eval_samples=a.eval_samples,
                   eval_seq_len=a.eval_seq_len, include=a.include).validate()
    job = Job(base)
    job.load()
    t0 = time.process_time()
    stats = calibrate.collect_input_stats(job.model, job.layers, job.calib, need_hessian=True)
    cpu_stats = time.process_time() - t0
    g2s, cpu_sens = {}, {}
    ref_nll: dict[str, torch.Tensor] = {}
    fp = {k: window_nlls(job.model, w) for k, w in job.evals.items()}
    ppl = lambda nll: math.exp(float(nll.mean()))
    print(f"settings: {a.bits:g} bits/weight all-in, {a.calib_samples} calibration windows x {a.seq_len} tokens, "
          f"{a.eval_samples} evaluation windows x {a.eval_seq_len} tokens per text (eval: held-out Python docs, "
          "ood: Jane Austen)")
    print(f"{'variant':<34} {'eval ppl':>9} {'+-%':>5} {'ood ppl':>9} {'+-%':>5} {'cpu s':>6}  (first row: reference;"
          " cpu s: calibration + plan + quantize, no evaluation)")
    print(f"{'fp32':<34} {ppl(fp['eval']):>9.3f} {'':>5} {ppl(fp['ood']):>9.3f}")
    rows = [{"variant": "fp32", "eval": ppl(fp["eval"]), "ood": ppl(fp["ood"])}]
    plans, done = {}, set()
    for text in a.variants:
        kw = parse_variant(text)
        spec = dataclasses.replace(base, **kw).validate()
        name = (f"{spec.sensitivity} g{spec.group_rows} bc={'on' if spec.bias_correction else 'off'} "
                f"ef={'on' if spec.error_feedback else 'off'} rounds={spec.rounds}")
        if name in done:
            continue
        done.add(name)
        job.spec = spec
        job.restore()
        est = spec.sensitivity
        if est not in g2s:
            c = time.process_time()
            g2s[est] = calibrate.collect_sensitivity(job.model, job.layers, job.calib, estimator=est,
                                                     input_stats=stats, seed=spec.seed)
            cpu_sens[est] = time.process_time() - c
        c0 = time.process_time()
        job.stats, job.g2 = stats, g2s[est]
        key = (est, spec.group_rows)
        if key not in plans:
            job.plans = {}
            job.plan()
            plans[key] = dict(job.plans)
        job.plans = dict(plans[key])
        job.allocate()
        job.quantize(checkpoints=False)
        for r in range(1, spec.rounds):
            job.reestimate()  # sensitivities at the quantized weights, re-plan, re-allocate
            job.quantize(checkpoints=False)
        job.apply()
        # CPU of the job without evaluation; the shared calibration is charged to each
        # variant: its estimator's pass plus the input statistics. A plan shared with an
        # earlier variant is charged to the first only.
        cpu = time.process_time() - c0 + cpu_sens[est] + cpu_stats
        nll = {k: window_nlls(job.model, w) for k, w in job.evals.items()}
        if not ref_nll:
            ref_nll = nll
        se = {k: 100 * float((nll[k] - ref_nll[k]).std() / math.sqrt(len(nll[k]))) for k in nll}
        row = {"variant": name, **{k: ppl(v) for k, v in nll.items()}, **{f"{k}_se_pct": v for k, v in se.items()},
               "cpu_seconds": cpu, "bits": job.totals()["bits_per_weight"]}
        rows.append(row)
        print(f"{name:<34} {row['eval']:>9.3f} {se['eval']:>5.1f} {row['ood']:>9.3f} {se['ood']:>5.1f} {cpu:>6.0f}",
              flush=True)
    print("calibration cpu s: input statistics pass " + f"{cpu_stats:.0f}, " +
          ", ".join(f"{k} sensitivity pass {v:.0f}" for k, v in cpu_sens.items()))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
