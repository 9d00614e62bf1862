"""Summarise the per-SASS-instruction page that tools/device_profile.sh exports
(sass_<shape>.csv): stall samples by reason, the instructions with most samples of the
top reasons, executed instructions by opcode, and shared-memory wavefronts (with bank
conflicts, "excessive").

    python tools/ncu_sass_summary.py sass_12288x49152.csv
"""
import collections
import csv
import sys


def main(path: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 3:
        sys.exit(f"{path}: no source page in this file (was the profile run?)")
    hdr, data = rows[1], rows[2:]
    ix = {h: i for i, h in enumerate(hdr)}

    def val(r, k):
        try:
            return float(r[ix[k]].replace(",", ""))
        except (KeyError, ValueError, IndexError):
            return 0.0

    reasons = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    tot = collections.Counter({k: sum(val(r, k) for r in data) for k in reasons})
    n = sum(tot.values()) or 1
    print("stall samples:", int(n), " ".join(f"{k[6:]}={100 * c / n:.0f}%" for k, c in tot.most_common(8)))
    for k, _ in tot.most_common(3):
        top = sorted(((val(r, k), i, r[ix["Source"]].strip()) for i, r in enumerate(data)), reverse=True)[:5]
        print(f"  top {k[6:]}:", "; ".join(f"#{i} {s[:48]} ({int(c)})" for c, i, s in top))
    ops, sh, ex = collections.Counter(), 0.0, 0.0
    for r in data:
        src = r[ix["Source"]].strip().split()
        if src:
            ops[(src[1] if src[0].startswith("@") else src[0]).split(".")[0]] += val(r, "Instructions Executed")
        sh += val(r, "L1 Wavefronts Shared")
        ex += val(r, "L1 Wavefronts Shared Excessive")
    e = sum(ops.values()) or 1
    print("executed:", int(e), " ".join(f"{k}={100 * c / e:.1f}%" for k, c in ops.most_common(10)))
    print(f"shared wavefronts: {int(sh)} (excessive {int(ex)})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
