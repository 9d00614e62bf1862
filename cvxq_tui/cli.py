"""The `cvxq-tui` command. With --batch it runs the job headless; without, it opens the
Textual workstation (imported lazily, so batch mode never loads textual)."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from . import events
from .errors import CvxqError, ExitCode, InputError, JobCancelled
from .spec import JobSpec  # plain Python: the option defaults are the spec's

app = typer.Typer(add_completion=False, no_args_is_help=False, pretty_exceptions_enable=False,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Compress a Hugging Face causal LM with CVXQ: every group of weights gets "
                       "its own bit depth, chosen by a convex allocation under your size budget.")


def _spec_from_options(**kw):
    from .spec import JobSpec, parse_pin, parse_size

    size = kw.pop("size")
    pins = kw.pop("pin")
    spec = JobSpec(**kw)
    spec.size = parse_size(size) if size else None
    spec.pin = [parse_pin(p) for p in pins]
    return spec.validate()


@app.callback(invoke_without_command=True)
def main_command(
    ctx: typer.Context,
    batch: Annotated[bool, typer.Option("--batch", help="Run headless (no TUI): progress on stderr, report at the end.")] = False,
    model: Annotated[Optional[str], typer.Option(help="HF model folder (safetensors/.bin) or .gguf file. Default: the built-in SmolLM2-135M.")] = None,
    bits: Annotated[Optional[float], typer.Option(help="Budget: average bits per quantized weight, all-in (payload + every byte of side information). Default 3.0. RTN/GPTQ use their standard B bits + a float16 scale and zero per group (B + 32/group), plus under 0.02 bits of per-layer metadata.")] = None,
    size: Annotated[Optional[str], typer.Option(help="Budget as the model file size instead, e.g. 60MB or 58MiB.")] = None,
    method: Annotated[str, typer.Option(help="cvxq (default), or the baselines rtn / gptq at the same all-in budget.")] = "cvxq",
    text: Annotated[Optional[str], typer.Option(help="Calibration text: a file or a folder of text files. Default: built-in Python docs.")] = None,
    eval_text: Annotated[Optional[str], typer.Option("--eval-text", help="Evaluation text file/folder. Default: built-in (disjoint from calibration).")] = None,
    out: Annotated[str, typer.Option(help="Output folder for the packed model and report.json.")] = "cvxq-out",
    include: Annotated[List[str], typer.Option(help="Quantize only layers matching this glob (repeatable).")] = [],
    exclude: Annotated[List[str], typer.Option(help="Leave layers matching this glob unquantized (repeatable).")] = [],
    pin: Annotated[List[str], typer.Option(help="GLOB=BITS: fix the depth of matching layers (repeatable).")] = [],
    quantizer: Annotated[str, typer.Option(help="CVXQ codebook: laplace (companded), uniform or lloyd.")] = JobSpec.quantizer,
    sensitivity: Annotated[str, typer.Option(help="Sensitivity estimator: fisher, grad (CVXQ paper) or hessian (no backprop).")] = JobSpec.sensitivity,
    group_rows: Annotated[int, typer.Option("--group-rows", help="Rows per CVXQ group (multiple of 32). On a GPU 128, the default, runs fastest; 64 up to about 15% slower (more column records to read); 32 several times slower.")] = JobSpec.group_rows,
    gptq_group: Annotated[int, typer.Option("--gptq-group", help="RTN/GPTQ group size along inputs; 0 = largest depth the budget allows.")] = 0,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration sequences.")] = JobSpec.calib_samples,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration sequence.")] = JobSpec.seq_len,
    eval_samples: Annotated[int, typer.Option("--eval-samples", help="Evaluation windows per text.")] = JobSpec.eval_samples,
    eval_seq_len: Annotated[int, typer.Option("--eval-seq-len", help="Tokens per evaluation window.")] = JobSpec.eval_seq_len,
    rounds: Annotated[int, typer.Option(help="CVXQ rounds: each further round re-measures sensitivities at the quantized weights and re-allocates.")] = JobSpec.rounds,
    error_feedback: Annotated[bool, typer.Option("--error-feedback/--no-error-feedback", help="GPTQ-style error feedback inside CVXQ.")] = JobSpec.error_feedback,
    bias_correction: Annotated[bool, typer.Option("--bias-correction/--no-bias-correction", help="Correct biases for the mean quantization error.")] = JobSpec.bias_correction,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="Measure perplexity before and after.")] = True,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Random seed (calibration signs, sampling).")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted job in --out.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace whatever job --out holds.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the final report as JSON on stdout.")] = False,
):
    if ctx.invoked_subcommand:
        return
    spec = _spec_from_options(model=model, bits=bits, size=size, method=method, text=text, eval_text=eval_text,
                              out=out, include=list(include), exclude=list(exclude), pin=list(pin),
                              quantizer=quantizer, sensitivity=sensitivity, group_rows=group_rows,
                              gptq_group=gptq_group, calib_samples=calib_samples, seq_len=seq_len,
                              eval_samples=eval_samples, eval_seq_len=eval_seq_len, rounds=rounds,
                              error_feedback=error_feedback, bias_correction=bias_correction,
                              evaluate=evaluate, device=device, seed=seed, resume=resume, overwrite=overwrite)
    if not batch:
        from .tui.app import run_app  # lazily: batch mode never loads textual

        run_app(spec)
        return
    _run_batch(spec, json_out)


def _run_batch(spec, json_out: bool) -> None:
    from rich.console import Console

    from .batch import PlainRenderer, RichRenderer, summary_table
    from .pipeline import CancelToken, run

    console = Console(stderr=True)
    cancel = CancelToken()
    with _stop_on_signals(cancel):
        if console.is_terminal:
            with RichRenderer(console) as r:
                report = run(spec, r, cancel)
        else:
            report = run(spec, PlainRenderer(), cancel)
    if json_out:
        print(json.dumps(report, indent=2))
    else:
        Console().print(summary_table(report))


@contextmanager
def _stop_on_signals(cancel):
    """The first SIGINT (Ctrl-C) or SIGTERM asks the job to stop after its current work unit:
    what is finished stays in --out and the exit code is 130. A second one stops at once."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    seen = []

    def handler(signum, frame):
        if seen:
            raise KeyboardInterrupt
        seen.append(signum)
        print(f"\n{signal.Signals(signum).name}: stopping after the current step; finished work is kept "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
        cancel.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@app.command("eval")
def eval_command(
    folder: Annotated[Path, typer.Argument(help="A cvxq-tui output folder or a plain HF model folder.")],
    text: Annotated[Optional[str], typer.Option(help="Text file/folder. Default: the built-in evaluation text.")] = None,
    samples: Annotated[int, typer.Option(help="Evaluation windows.")] = JobSpec.eval_samples,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 512,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Perplexity of a packed (or plain) model on a text."""
    from . import evaluate, models
    from . import text as texts
    from .packed import MODEL_FILE

    if not folder.exists():
        raise InputError(f"{folder} does not exist")
    if (folder / MODEL_FILE).is_file() and (folder / "job.json").is_file():
        from .runtime import load_quantized, load_tokenizer
        model = load_quantized(folder)
        tok = load_tokenizer(folder)
    else:
        loaded = models.load_model(str(folder))
        model, tok = loaded.model, loaded.tokenizer
    body = texts.read_text(text) if text else texts.default_text("eval")
    windows = texts.token_windows(tok, body, seq_len, None, purpose="evaluation")[:samples]
    ppl = evaluate.perplexity(model, windows)
    if json_out:
        print(json.dumps({"perplexity": ppl, "windows": int(windows.shape[0]), "seq_len": seq_len}))
    else:
        print(f"perplexity {ppl:.4f} on {windows.shape[0]} windows of {seq_len} tokens")


@app.command("export")
def export_command(
    folder: Annotated[Path, typer.Argument(help="A cvxq-tui output folder.")],
    out: Annotated[Path, typer.Argument(help="Where to write the plain dequantized HF checkpoint.")],
):
    """Write a plain dequantized HF checkpoint that any runtime loads."""
    from .runtime import export

    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out} is not empty; choose a new folder")
    export(folder, out)
    print(f"wrote {out}")


def _exit(code: int) -> None:
    """sys.exit(code); but while a model load that a cancel abandoned still runs in its thread
    (pipeline._cancellable, inside from_pretrained), os._exit after flushing: Python's
    shutdown under that thread can abort in C++ ("terminate called without an active
    exception", exit status 134) instead of exiting with `code`. What the job keeps is on
    disk by then; the abandoned load's result was going to be dropped."""
    if any(t.is_alive() for t in events.abandoned_loads):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    else:
        sys.exit(code)


def main() -> None:
    try:
        app(standalone_mode=False)
    except JobCancelled as e:
        print(f"stopped: {e}", file=sys.stderr)
        _exit(int(e.exit_code))
    except CvxqError as e:
        print(f"error: {e}", file=sys.stderr)
        _exit(int(e.exit_code))
    except KeyboardInterrupt:
        print("interrupted; finished layers are kept: rerun with --resume to continue", file=sys.stderr)
        _exit(int(ExitCode.INTERRUPTED))
    except MemoryError:
        print("error: out of memory; finished layers are kept: quantize fewer layers at a time (--include), "
              "lower --calib-samples/--seq-len, or free memory, then rerun with --resume", file=sys.stderr)
        _exit(int(ExitCode.FAILURE))
    except Exception as e:  # click usage errors and anything unexpected
        if isinstance(e, typer.Exit):
            _exit(getattr(e, "exit_code", 0))
        if isinstance(e, _click_exception_types()):
            e.show()
            _exit(int(ExitCode.USAGE))
        if isinstance(e, typer.Abort):
            _exit(int(ExitCode.INTERRUPTED))
        raise
    _exit(0)


def _click_exception_types() -> tuple:
    """ClickException of click itself (older typer is built on it) and of the copy of click
    that newer typer carries (typer._click, typer >= 0.29): usage errors raise either."""
    import importlib

    types = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            types.append(importlib.import_module(module).ClickException)
        except (ImportError, AttributeError):
            pass
    return tuple(types)
