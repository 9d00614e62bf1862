"""What an unfinished job keeps in OUT/.work so that --resume redoes only unfinished work:
the calibration (input statistics and sensitivities), each layer's CVXQ plan, the
perplexities measured before quantizing, and each quantized layer. Every file is written
atomically (packed.write_atomic): a job killed at any moment leaves either the whole file or
none. A file that cannot be read back is treated as missing and its work is redone."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .packed import write_atomic

CALIBRATION_FILE = "calibration.pt"
PERPLEXITY_FILE = "perplexity-before.json"


def _round_tag(rnd: int) -> str:
    return "" if rnd == 0 else f"r{rnd}-"


def plan_path(work: Path, rnd: int, index: int) -> Path:
    return work / f"plan-{_round_tag(rnd)}{index:04d}.npz"


# --- calibration ---------------------------------------------------------------------------
def save_calibration(path: Path, stats: dict, g2: Optional[dict]) -> None:
    """stats: name -> calibrate.InputStats (layers fed the same input share one object;
    torch.save keeps the sharing, so the file holds each statistic once)."""
    # Not dataclasses.asdict: it deep-copies, which would store shared statistics once per layer.
    fields = lambda s: {f.name: getattr(s, f.name) for f in dataclasses.fields(s)}
    blob = {"stats": {n: fields(s) for n, s in stats.items()}, "g2": g2}
    write_atomic(path, lambda tmp: torch.save(blob, tmp))


def load_calibration(path: Path, names: list[str]):
    """(stats, g2) as calibrate() made them, or None when absent, unreadable or not for
    these layers."""
    from .calibrate import InputStats

    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        raw, g2 = blob["stats"], blob["g2"]
        if set(raw) != set(names) or (g2 is not None and set(g2) != set(names)):
            return None
        made: dict[int, InputStats] = {}
        stats = {}
        for n in names:
            key = id(raw[n]["x_mean"])
            if key not in made:
                made[key] = InputStats(**raw[n])
            stats[n] = made[key]
        return stats, g2
    except Exception:
        return None


# --- CVXQ plans ----------------------------------------------------------------------------
def save_plan(path: Path, plan) -> None:
    lay = plan.layout
    arrays = dict(perm=plan.perm, g2c=plan.g2c, curve=plan.curve, table=plan.table,
                  layout=np.array([lay.rows, lay.cols, lay.group_rows], np.int64),
                  kind=np.array(plan.kind))
    write_atomic(path, lambda tmp: np.savez(open(tmp, "wb"), **arrays))


def load_plan(path: Path, name: str, rows: int, cols: int, group_rows: int, kind: str):
    from .methods.cvxq import GroupLayout, LayerPlan

    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        layout = GroupLayout(*(int(v) for v in a["layout"]))
        plan = LayerPlan(name, layout, a["perm"], a["g2c"], a["curve"], a["table"], str(a["kind"]))
        if (layout.rows, layout.cols, layout.group_rows) != (rows, cols, group_rows) or plan.kind != kind \
                or plan.curve.shape != (plan.n_groups, 9) or plan.perm.shape != (rows,):
            return None
        return plan
    except Exception:
        return None


# --- small JSON records --------------------------------------------------------------------
def save_json(path: Path, value) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(value)))


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --- stale temporary files -----------------------------------------------------------------
def remove_stale_temporaries(out: Path) -> list[str]:
    """Temporary files a killed job left: write_atomic's .NAME.XXXX.tmp and the scratch
    folders of save_pretrained (.work/pretrained-XXXX)."""
    import shutil

    gone = []
    for folder in (out, out / ".work"):
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):
                p.unlink(missing_ok=True)
                gone.append(p.name)
    for p in (out / ".work").glob("pretrained-*"):
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p.name)
    return gone
