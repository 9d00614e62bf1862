"""Quality table: perplexity of fp32, CVXQ at several all-in budgets, and RTN / GPTQ at
matched all-in sizes, on the default model, on the held-out default text (same domain as
calibration) and on a text of another domain. One calibration per method is shared by all
budgets (Job.allocate re-solves without recalibrating).

    python bench/quality.py                      # the table of the README / closing note
    python bench/quality.py --bits 3.0 --methods cvxq --calib-samples 64 --sensitivity grad
"""

from __future__ import annotations

import argparse
import json
import time

from cvxq_tui.pipeline import Job
from cvxq_tui.spec import JobSpec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.0, 3.5, 4.0])
    ap.add_argument("--methods", nargs="+", default=["cvxq", "rtn", "gptq"])
    ap.add_argument("--calib-samples", type=int, default=JobSpec.calib_samples)
    ap.add_argument("--seq-len", type=int, default=JobSpec.seq_len)
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--sensitivity", default=JobSpec.sensitivity)
    ap.add_argument("--quantizer", default=JobSpec.quantizer)
    ap.add_argument("--group-rows", type=int, default=JobSpec.group_rows)
    ap.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=JobSpec.error_feedback)
    ap.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=JobSpec.bias_correction)
    ap.add_argument("--gptq-group", type=int, default=0)
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()

    rows = []
    fp = None
    for method in a.methods:
        spec = JobSpec(method=method, bits=a.bits[0], calib_samples=a.calib_samples, seq_len=a.seq_len,
                       eval_samples=a.eval_samples, eval_seq_len=a.eval_seq_len, sensitivity=a.sensitivity,
                       quantizer=a.quantizer, group_rows=a.group_rows, error_feedback=a.error_feedback,
                       bias_correction=a.bias_correction, gptq_group=a.gptq_group)
        job = Job(spec)
        job.load()
        if fp is None:
            fp = job.perplexities("float")
            rows.append({"method": "fp32", "bits": 32.0, **fp, "seconds": 0.0})
            print(f"{'method':<6} {'budget':>6} {'all-in':>7} {'eval ppl':>9} {'x fp32':>7} {'ood ppl':>9} {'x fp32':>7} {'time':>6}")
            print(f"{'fp32':<6} {'':>6} {32.0:>7.3f} {fp['eval']:>9.3f} {1.0:>7.2f} {fp['ood']:>9.3f} {1.0:>7.2f}")
        t0 = time.perf_counter()
        job.calibrate()
        if method == "cvxq":
            job.plan()
        t_shared = time.perf_counter() - t0
        for bits in a.bits:
            t1 = time.perf_counter()
            job.restore()
            try:
                job.allocate(bits=bits)
            except Exception as e:  # a baseline may have no configuration for this budget
                print(f"{method:<6} {bits:>6.2f}  skipped: {e}")
                continue
            job.quantize(checkpoints=False)
            job.apply()
            ppl = job.perplexities("quantized")
            bpw = job.totals()["bits_per_weight"]
            row = {"method": method, "budget": bits, "bits": bpw, **ppl,
                   "seconds": time.perf_counter() - t1 + t_shared, "config": job.fixed_config}
            rows.append(row)
            print(f"{method:<6} {bits:>6.2f} {bpw:>7.3f} {ppl['eval']:>9.3f} {ppl['eval'] / fp['eval']:>7.2f} "
                  f"{ppl['ood']:>9.3f} {ppl['ood'] / fp['ood']:>7.2f} {row['seconds']:>6.0f}"
                  + (f"  (B={job.fixed_config[0]}, group {job.fixed_config[1]})" if job.fixed_config else ""),
                  flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
