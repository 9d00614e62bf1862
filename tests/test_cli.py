"""The `cvxq-tui` command line: help, the eval and export subcommands, batch mode never
importing textual, and every bad input ending with a non-zero exit code, a message that names
the problem, no traceback and no half-written output.

The commands run in this process through cvxq_tui.cli.main (what the console script calls),
so the tests work on a dev build and on an installed package alike."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli

import cvxq_tui
from cvxq_tui.packed import MODEL_FILE, read_model_file

SMALL = ["--calib-samples", "1", "--seq-len", "16", "--no-eval"]
ONE_LAYER = ["--include", "model.layers.0.self_attn.k_proj"]


def assert_refused(out: Path, code: int, stdout: str, stderr: str, *words: str, exit_code: int | None = None):
    """A clean refusal: non-zero exit, one message holding every word, no traceback, and no
    model file or report in the output folder."""
    text = stdout + stderr
    assert code != 0, text
    if exit_code is not None:
        assert code == exit_code, (code, text)
    assert "Traceback" not in text and 'File "' not in text, text
    assert "error: " in stderr, stderr
    for w in words:
        assert w.lower() in stderr.lower(), (w, stderr)
    assert not (out / MODEL_FILE).exists() and not (out / "report.json").exists()
    assert not list(out.glob(f".{MODEL_FILE}.*")), "no temporary model file is left behind"


# ---------------------------------------------------------------- cheap checks


def test_help_lists_the_main_options():
    code, stdout, stderr = run_cli("--help")
    assert code == 0, stderr
    for opt in ("--batch", "--bits", "--size", "--method", "--include", "--out"):
        assert opt in stdout, opt
    code, stdout, _ = run_cli("eval", "--help")
    assert code == 0 and "--samples" in stdout and "--seq-len" in stdout


def test_batch_modules_do_not_import_textual(tmp_path):
    """Headless use must not pay for (or depend on) the TUI toolkit."""
    env = dict(os.environ)
    pkg_parent = str(Path(cvxq_tui.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH")) if p)
    if env.get("CVXQ_DEV_CORE_DIR"):
        env["CVXQ_DEV_CORE_DIR"] = os.path.abspath(env["CVXQ_DEV_CORE_DIR"])
    code = (
        "import os, sys\n"
        "import cvxq_tui\n"
        "dev = os.environ.get('CVXQ_DEV_CORE_DIR')\n"
        "if dev: cvxq_tui.__path__.insert(0, dev)\n"
        "import cvxq_tui.pipeline, cvxq_tui.cli, cvxq_tui.batch, cvxq_tui.runtime\n"
        "assert 'cvxq_tui._core' in sys.modules\n"
        "bad = sorted(m for m in sys.modules if m == 'textual' or m.startswith('textual.'))\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    # cwd elsewhere: `python -c` puts the cwd first on sys.path, which in a source checkout
    # would shadow the installed package (and its compiled core).
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
    import importlib.util
    assert importlib.util.find_spec("textual") is not None, "textual is a dependency: the check above must be able to fail"


@pytest.mark.parametrize("args, words", [
    (["--method", "awq"], ["--method 'awq'", "cvxq, rtn, gptq"]),
    (["--size", "lots"], ["--size 'lots'", "is not a size", "60MB"]),
    (["--size", "12XB"], ["--size '12XB'"]),
    (["--bits", "3", "--size", "60MB"], ["either --bits or --size"]),
    (["--bits", "-1"], ["--bits", "outside"]),
    (["--seq-len", "4"], ["--seq-len", "at least 16"]),
    (["--pin", "model.layers.0.*=9"], ["--pin", "between 0 and 8"]),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, args, words):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("--batch", "--out", out, *args)
    assert_refused(out, code, stdout, stderr, *words, exit_code=2)
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--bitz", "3"], ["No such option: --bitz", "--bits"]),
    (["--bits", "three"], ["Invalid value for '--bits'"]),
    (["--calib-samples", "2.5"], ["Invalid value for '--calib-samples'"]),
])
def test_usage_errors_show_usage_not_a_traceback(tmp_path, args, words):
    """Parsing errors raised by typer's click (its own copy since typer 0.29) are shown as
    usage errors, exit code 2."""
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("--batch", "--out", out, *args)
    text = stdout + stderr
    assert code == 2, text
    assert "Traceback" not in text and "Usage:" in text
    for w in words:
        assert w in text, (w, text)
    assert not out.exists()


# ---------------------------------------------------------------- bad models


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=64))


def _missing(tmp):
    return tmp / "no-such-model"


def _no_config(tmp):
    (tmp / "empty-model").mkdir()
    (tmp / "empty-model" / "README.md").write_text("weights coming soon")
    return tmp / "empty-model"


def _gpt2(tmp):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)).save_pretrained(
        tmp / "gpt2")
    return tmp / "gpt2"


def _corrupt(tmp):
    _tiny_llama().save_pretrained(tmp / "corrupt")
    weights = tmp / "corrupt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return tmp / "corrupt"


def _nan(tmp):
    model = _tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[1, 2] = float("nan")
    model.save_pretrained(tmp / "nan")
    return tmp / "nan"


@pytest.mark.parametrize("make, words", [
    (_missing, ["no-such-model", "does not exist"]),
    (_no_config, ["no config.json"]),
    (_gpt2, ["'gpt2'", "not supported", "nn.Linear"]),
    (_corrupt, ["model.safetensors", "corrupt"]),
    (_nan, ["model.layers.0.self_attn.q_proj.weight", "NaN"]),
], ids=["missing", "no-config", "gpt2", "corrupt", "nan"])
def test_bad_model_is_refused(tmp_path, make, words):
    model = make(tmp_path)
    out = tmp_path / "out"
    code, stdout, stderr = run_cli("--batch", "--model", model, "--out", out, *SMALL)
    assert_refused(out, code, stdout, stderr, *words, "Fix", exit_code=1)
    # A job that failed before quantizing anything leaves no folder behind, so the same
    # command gives the same answer again (not "already holds a job").
    assert not out.exists()
    code2, _, stderr2 = run_cli("--batch", "--model", model, "--out", out, *SMALL)
    assert code2 == code and "already holds" not in stderr2


# ---------------------------------------------------------------- bad inputs on the default model


@pytest.mark.slow
@pytest.mark.parametrize("case", ["empty-text", "short-text", "cvxq-bits", "rtn-bits", "size", "rtn-size",
                                  "include"])
def test_bad_input_on_default_model(tmp_path, case):
    out = tmp_path / "out"
    if case == "empty-text":
        (tmp_path / "empty.txt").write_text("  \n\n")
        args, words, exit_code = ["--text", tmp_path / "empty.txt", *ONE_LAYER], ["empty.txt", "empty"], 1
    elif case == "short-text":
        (tmp_path / "short.txt").write_text("A few words of calibration text. " * 4)
        args = ["--text", tmp_path / "short.txt", "--calib-samples", "4", "--seq-len", "64", *ONE_LAYER]
        words, exit_code = ["calibration text is too short", "4 windows of 64 tokens", "--calib-samples"], 1
    elif case == "cvxq-bits":
        args, words, exit_code = ["--bits", "0.2", *ONE_LAYER], ["--bits 0.2", "reachable is"], 2
    elif case == "rtn-bits":
        args, words, exit_code = ["--method", "rtn", "--bits", "1.0", *ONE_LAYER], ["budget of 1", "--method cvxq"], 2
    elif case == "size":
        args, words, exit_code = ["--size", "100MB", *ONE_LAYER], ["--size 100.00MB", "reachable is",
                                                                  "unquantized tensors alone"], 2
    elif case == "rtn-size":
        args, words, exit_code = ["--method", "rtn", "--size", "100MB", *ONE_LAYER], [
            "--size 100.00MB cannot be met by RTN", "needs at least", "unquantized tensors alone"], 2
    else:
        args, words, exit_code = ["--include", "model.layers.0.attn.*"], ["'model.layers.0.attn.*'",
                                                                          "matches no quantizable layer"], 2
    code, stdout, stderr = run_cli("--batch", "--out", out, *SMALL, *args)
    assert_refused(out, code, stdout, stderr, *words, exit_code=exit_code)
    if case == "cvxq-bits":
        # The message gives the reachable range in all-in bits/weight, and 0.2 is below it
        # (all depths 0: the side information alone, 36 bits per group of 128 rows).
        m = re.search(r"reachable is (\d+\.\d+) to (\d+\.\d+) bits/weight", stderr)
        assert m, stderr
        lo, hi = float(m.group(1)), float(m.group(2))
        assert 0.2 < lo < 1.0 and 8.0 < hi < 9.0, (lo, hi)
    if case == "size":
        m = re.search(r"reachable is (\d+\.\d+)MB to (\d+\.\d+)MB", stderr)
        assert m, stderr
        assert 100 < float(m.group(1)) < float(m.group(2))
    if case == "rtn-size":
        assert "bits/weight" not in stderr, "a --size request is answered in MB"
        least = float(re.search(r"needs at least (\d+\.\d+)MB", stderr).group(1))
        rest = float(re.search(r"alone take (\d+\.\d+)MB", stderr).group(1))
        assert 500 < rest < least < rest + 0.1, (rest, least)


# ---------------------------------------------------------------- output folders


def test_out_under_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    out = tmp_path / "notes.txt" / "job"
    code, stdout, stderr = run_cli("--batch", "--out", out, *SMALL)
    assert_refused(tmp_path, code, stdout, stderr, "cannot write to", "--out", exit_code=1)
    assert (tmp_path / "notes.txt").read_text() == "not a folder"


def test_out_that_is_a_file_is_refused(tmp_path):
    out = tmp_path / "result"
    out.write_text("keep me")
    code, stdout, stderr = run_cli("--batch", "--out", out, *SMALL)
    assert_refused(tmp_path, code, stdout, stderr, "is a file", exit_code=1)
    assert out.read_text() == "keep me"


def test_out_not_made_by_cvxq_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("\\documentclass{article}")
    code, stdout, stderr = run_cli("--batch", "--out", out, *SMALL)
    assert_refused(out, code, stdout, stderr, "not empty", "not made by cvxq-tui", exit_code=1)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


# ---------------------------------------------------------------- a finished job: eval, export, reuse


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A small CVXQ job with evaluation: the 4 attention projections of block 0."""
    out = tmp_path_factory.mktemp("cli") / "job"
    code, stdout, stderr = run_cli("--batch", "--out", out, "--bits", "3", "--include", "model.layers.0.self_attn.*",
                                   "--no-error-feedback", "--calib-samples", "1", "--seq-len", "32",
                                   "--eval-samples", "2", "--eval-seq-len", "64", "--json")
    assert code == 0, stderr[-4000:]
    report = json.loads(stdout)  # --json: the report on stdout, the same as report.json
    assert report == json.loads((out / "report.json").read_text())
    return out, report


@pytest.mark.slow
def test_eval_prints_the_reports_perplexity(job):
    out, report = job
    code, stdout, stderr = run_cli("eval", out, "--samples", "2", "--seq-len", "64")
    assert code == 0, stderr
    m = re.fullmatch(r"perplexity (\d+\.\d+) on 2 windows of 64 tokens\s*", stdout)
    assert m, stdout
    assert abs(float(m.group(1)) / report["totals"]["perplexity_after"]["eval"] - 1) < 1e-3
    code, stdout, stderr = run_cli("eval", out.parent / "missing")
    assert code == 2 and "does not exist" in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_export_command(job, tmp_path):
    out, _ = job
    dest = tmp_path / "plain"
    code, stdout, stderr = run_cli("export", out, dest)
    assert code == 0, stderr
    assert f"wrote {dest}" in stdout
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (dest / name).is_file(), name
    from safetensors import safe_open

    packed, _, _ = read_model_file(out / MODEL_FILE)
    with safe_open(str(dest / "model.safetensors"), framework="numpy") as f:
        np.testing.assert_array_equal(f.get_tensor("model.layers.0.self_attn.v_proj.weight"),
                                      packed["model.layers.0.self_attn.v_proj"].dequantize())
    # A second export into the same (now non-empty) folder is refused, and leaves it alone.
    before = (dest / "model.safetensors").stat().st_mtime_ns
    code, stdout, stderr = run_cli("export", out, dest)
    assert code == 2 and "not empty" in stderr and "Traceback" not in stdout + stderr
    assert (dest / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_finished_job_is_not_redone(job):
    out, report = job
    argv = shlex.split(report["command"])[1:]  # the exact command that made it
    stamp = (out / MODEL_FILE).stat().st_mtime_ns
    code, stdout, stderr = run_cli(*argv)
    assert code == 1 and "already holds this finished job" in stderr and "--overwrite" in stderr
    assert "Traceback" not in stdout + stderr
    assert (out / MODEL_FILE).stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_out_holding_another_job(job, tmp_path):
    """An --out with another job's job.json is refused (its files untouched) unless --overwrite."""
    src, _ = job
    out = tmp_path / "other"
    out.mkdir()
    for name in ("job.json", "config.json"):
        (out / name).write_bytes((src / name).read_bytes())
    job_json = (out / "job.json").read_text()
    args = ["--batch", "--out", out, "--method", "rtn", "--bits", "4", *ONE_LAYER, *SMALL]
    code, stdout, stderr = run_cli(*args)
    assert_refused(out, code, stdout, stderr, "already holds a job", "--resume", "--overwrite", exit_code=1)
    assert (out / "job.json").read_text() == job_json
    code, stdout, stderr = run_cli(*args, "--resume")
    assert_refused(out, code, stdout, stderr, "holds a different job", exit_code=1)

    code, stdout, stderr = run_cli(*args, "--overwrite")
    assert code == 0, stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["spec"]["method"] == "rtn" and [r["name"] for r in report["layers"]] == [
        "model.layers.0.self_attn.k_proj"]
    assert json.loads((out / "job.json").read_text())["spec"]["method"] == "rtn"
    assert report["totals"]["model_bytes"] == (out / MODEL_FILE).stat().st_size


def test_exit_skips_python_shutdown_while_an_abandoned_load_runs(monkeypatch):
    # A cancel during loading leaves the load running in its thread (pipeline._cancellable);
    # Python's shutdown under it can abort in C++ (exit status 134), so the CLI then leaves
    # with os._exit and the job's own exit code. Without such a thread: a normal sys.exit.
    import threading

    from cvxq_tui import cli, events

    monkeypatch.setattr(events, "abandoned_loads", [])
    hard = []
    monkeypatch.setattr(cli.os, "_exit", lambda code: hard.append(code))
    with pytest.raises(SystemExit) as e:
        cli._exit(3)
    assert e.value.code == 3 and hard == []
    release = threading.Event()
    t = threading.Thread(target=release.wait, daemon=True)
    t.start()
    events.abandoned_loads.append(t)
    try:
        cli._exit(4)  # the patched os._exit returns; the real one does not
        assert hard == [4]
    finally:
        release.set()
        t.join()
    with pytest.raises(SystemExit) as e:  # that load has ended since
        cli._exit(5)
    assert e.value.code == 5 and hard == [4]
