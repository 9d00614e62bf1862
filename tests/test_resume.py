"""Crash safety on the real default model: a job killed at any moment (SIGKILL at a fault
point of cvxq_tui.faults, or stopped by SIGINT/SIGTERM) and rerun with --resume ends with the
same packed model an uninterrupted run gives, redoing only what was not finished; a reader
never sees a half-written model or report; a full or read-only disk and too little memory
are refused with a message, keeping what was finished.

Each job runs in a child process (SIGKILL must not take pytest with it) on two small layers
with tiny calibration and evaluation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

import cvxq_tui
from cvxq_tui.packed import MODEL_FILE, read_model_file

pytestmark = pytest.mark.slow

JOB = ["--batch", "--include", "model.layers.0.self_attn.k_proj", "--include", "model.layers.0.self_attn.v_proj",
       "--bits", "3", "--calib-samples", "2", "--seq-len", "32", "--no-error-feedback",
       "--eval-samples", "1", "--eval-seq-len", "32"]
LAYERS = ["model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]

_CHILD = (
    "import os, sys\n"
    "import cvxq_tui\n"
    "dev = os.environ.get('CVXQ_DEV_CORE_DIR')\n"
    "if dev: cvxq_tui.__path__.insert(0, dev)\n"
    "from cvxq_tui.cli import main\n"
    "sys.argv = ['cvxq-tui', *sys.argv[1:]]\n"
    "main()\n"
)


def run_child(out: Path, *args, kill_at: str | None = None, env_extra: dict | None = None):
    """The CLI in a child process: (return code, stderr). A SIGKILLed child returns -9."""
    env = dict(os.environ)
    env.pop("CVXQ_TEST_KILL_AT", None)
    pkg_parent = str(Path(cvxq_tui.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    if env.get("CVXQ_DEV_CORE_DIR"):
        env["CVXQ_DEV_CORE_DIR"] = os.path.abspath(env["CVXQ_DEV_CORE_DIR"])
    if kill_at:
        env["CVXQ_TEST_KILL_AT"] = kill_at
    env.update(env_extra or {})
    r = subprocess.run([sys.executable, "-c", _CHILD, *JOB, "--out", str(out), *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=900, cwd=out.parent)
    return r.returncode, r.stderr


def work_files(out: Path) -> dict[str, tuple[int, int]]:
    work = out / ".work"
    if not work.is_dir():
        return {}
    # Temporary files (.NAME.XXXX.tmp) of a killed write are not finished work.
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.iterdir()
            if p.is_file() and not p.name.startswith(".")}


def assert_readers_see_whole_files(out: Path) -> None:
    """Whatever the moment of the kill: a model file present is complete and valid, a report
    present is complete JSON, and no temporary file has a final name."""
    if (out / MODEL_FILE).exists():
        read_model_file(out / MODEL_FILE)
    if (out / "report.json").exists():
        json.loads((out / "report.json").read_text())
    for name in ("config.json", "tokenizer.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())


def model_tensors(out: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    with safe_open(str(out / MODEL_FILE), framework="numpy") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "reference"
    code, err = run_child(out)
    assert code == 0, err[-4000:]
    return out


# (fault point, expected return code, what the next run must reuse: calibration, plans, layers)
CHAIN = [
    ("calibrate:1=TERM", 130, (False, 0, 0)),     # clean stop at the next calibration window
    ("calibrated", -9, (False, 0, 0)),            # killed before the calibration was saved
    ("plan:2", -9, (True, 1, 0)),                 # killed between the two layers' plans
    ("quantize:1=INT", 130, (True, 2, 1)),        # Ctrl-C while quantizing layer 1: it is kept
    ("write:layer-0001.npz", -9, (True, 2, 1)),   # killed while writing layer 2's checkpoint
    ("write:model.safetensors", -9, (True, 2, 2)),  # killed while writing the packed model
    ("write:report.json", -9, (True, 2, 2)),      # killed while writing the report
]


def test_killed_job_resumes_to_the_same_result(reference, tmp_path):
    out = tmp_path / "job"
    reused_by_next = None
    for i, (point, want_code, reuse_next) in enumerate(CHAIN):
        before = work_files(out)
        code, err = run_child(out, *(["--resume"] if i else []), kill_at=point)
        assert code == want_code, (point, code, err[-3000:])
        assert "Traceback" not in err, err[-3000:]
        if want_code == 130:
            assert "stopped:" in err and "--resume" in err, err[-2000:]
        if reused_by_next is not None:
            calib, n_plans, n_layers = reused_by_next
            assert err.count("calibration: reused") == int(calib), (point, err[-3000:])
            assert err.count(": reused from the interrupted run") - int(calib) == n_layers, (point, err[-3000:])
        # Only unfinished work is redone: no checkpoint of an earlier run is rewritten.
        after = work_files(out)
        for name, stamp in before.items():
            assert after.get(name) == stamp, (point, name, "a finished checkpoint was redone or lost")
        assert_readers_see_whole_files(out)
        reused_by_next = reuse_next

    code, err = run_child(out, "--resume")
    assert code == 0, err[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"] == {"calibration": True, "perplexity_before": True, "plans": LAYERS,
                                 "layers": LAYERS}
    assert not (out / ".work").exists() and not list(out.glob(".*.tmp"))

    # Same result as the uninterrupted run: every tensor (depths, payload, loc/scale, perm,
    # biases, the unquantized tensors) bit for bit, the same per-layer sizes.
    got, want = model_tensors(out), model_tensors(reference)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    packed, _, meta = read_model_file(out / MODEL_FILE)
    ref_packed, _, ref_meta = read_model_file(reference / MODEL_FILE)
    for name in LAYERS:
        np.testing.assert_array_equal(packed[name].depth, ref_packed[name].depth)
    # The output folder says which job made it (the job id hashes the options, --out included).
    assert meta["job_id"] == report["job_id"] == json.loads((out / "job.json").read_text())["job_id"]
    assert "resumed" in json.loads((out / "job.json").read_text())
    ref_report = json.loads((reference / "report.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert strip(report["layers"]) == strip(ref_report["layers"])
    assert report["totals"]["perplexity_after"] == ref_report["totals"]["perplexity_after"]


def test_full_disk_keeps_finished_layers(reference, tmp_path):
    """ENOSPC while writing the packed model: a message with the fix, exit 1, no model file,
    the finished layers kept; --resume then finishes without quantizing again."""
    out = tmp_path / "job"
    code, err = run_child(out, env_extra={"CVXQ_TEST_FAIL_WRITE": "ENOSPC:model.safetensors"})
    assert code == 1, err[-3000:]
    assert "Traceback" not in err
    assert "error: the disk holding" in err and "is full" in err and "--resume" in err, err[-2000:]
    assert not (out / MODEL_FILE).exists() and not list(out.glob(".*.tmp"))
    assert len(list((out / ".work").glob("layer-*.npz"))) == 2
    code, err = run_child(out, "--resume")
    assert code == 0, err[-3000:]
    assert err.count(": reused from the interrupted run") == 3  # calibration + 2 layers
    np.testing.assert_array_equal(model_tensors(out)[f"{LAYERS[1]}.cvxq.payload"],
                                  model_tensors(reference)[f"{LAYERS[1]}.cvxq.payload"])


@pytest.mark.parametrize("case", ["memory", "disk", "read-only"])
def test_resources_refused_up_front(tmp_path, case):
    out = tmp_path / "job"
    env = {"memory": {"CVXQ_MEMORY_AVAILABLE_MB": "100"}, "disk": {"CVXQ_DISK_FREE_MB": "50"},
           "read-only": {"CVXQ_TEST_FAIL_WRITE": "EROFS:calibration.pt"}}[case]
    code, err = run_child(out, env_extra=env)
    assert code == 1 and "Traceback" not in err, err[-3000:]
    if case == "memory":
        assert "needs about" in err and "GB of memory" in err and "--include" in err, err[-2000:]
    elif case == "disk":
        assert "50 MB free" in err and "needs about" in err, err[-2000:]
    else:
        assert "cannot write calibration.pt" in err and "Read-only file system" in err, err[-2000:]
    assert not (out / MODEL_FILE).exists()
    # Nothing was finished, so nothing is kept: the same command can simply be run again.
    assert not out.exists()


def test_resume_after_stop_needs_resume_flag(tmp_path):
    """A stopped job's folder is not silently reused or overwritten without --resume."""
    out = tmp_path / "job"
    code, err = run_child(out, kill_at="allocate=TERM")
    assert code == 130 and "stopped:" in err, err[-3000:]
    code, stdout, stderr = run_cli("--batch", "--out", out, "--bits", "3", "--include", LAYERS[0],
                                   "--calib-samples", "2", "--seq-len", "32")
    assert code == 1 and "already holds a job" in stderr and "--resume" in stderr
