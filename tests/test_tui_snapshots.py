"""Snapshot tests of the workstation's screens at 80x24 and 120x40 (pytest-textual-snapshot:
SVG screenshots compared with the files in tests/__snapshots__/; after an intended change,
look at the report and rerun with --snapshot-update).

Everything on screen is fixed: the layer layout is SmolLM2-135M's, written out (no model is
loaded), the output folder is relative and new, the run screen is fed a fixed sequence of
events instead of a job, the results screen shows a fixed report, and the two things that
move with time (the input cursor's blink, the progress bar's ETA) are switched off."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("pytest_textual_snapshot")

from cvxq_tui.errors import JobCancelled  # noqa: E402
from cvxq_tui.events import (Allocation, LayerDone, LayerInfo, Log, StageFinished,  # noqa: E402
                             StageProgress, StageStarted)
from cvxq_tui.spec import JobSpec  # noqa: E402
from cvxq_tui.tui import backend  # noqa: E402
from cvxq_tui.tui.app import CvxqApp  # noqa: E402
from cvxq_tui.tui.messages import MeasuredPoint  # noqa: E402
from cvxq_tui.tui.screens.results import ResultsScreen  # noqa: E402
from cvxq_tui.tui.screens.run import RunScreen  # noqa: E402
from cvxq_tui.tui.state import LayerMeta, ModelLayout  # noqa: E402

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]
SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
          "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
          "mlp.down_proj": (576, 1536)}
OUT = "snap-out"


def smollm2_layout() -> ModelLayout:
    layers = tuple(LayerMeta(f"model.layers.{b}.{k}", s, s[0] * s[1], 4 * s[0] * s[1])
                   for b in range(30) for k, s in SHAPES.items())
    return ModelLayout("SmolLM2-135M-Instruct", layers, 113_246_976)


@pytest.fixture
def app(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the relative output folder is new, whatever the machine
    return CvxqApp(JobSpec(out=OUT), layout=smollm2_layout())


async def settle(pilot) -> None:
    """No blinking cursor in any input, nothing pending."""
    from textual.widgets import Input

    for field in pilot.app.screen.query(Input):
        field.cursor_blink = False
    await pilot.pause()


@pytest.mark.parametrize("size", SIZES)
def test_start_screen(snap_compare, app, size):
    assert snap_compare(app, terminal_size=size, run_before=settle)


@pytest.mark.parametrize("size", SIZES)
def test_layers_screen(snap_compare, app, size):
    async def run_before(pilot):
        # k_proj of block 0 left out and pinned at 5 bits, then the cursor moves on.
        await pilot.press("f2", "down", "space", "p", "5", "down")
        await settle(pilot)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


@pytest.mark.parametrize("size", SIZES)
def test_help_screen(snap_compare, app, size):
    async def run_before(pilot):
        await pilot.press("f1")
        await settle(pilot)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


def fake_events(spec: JobSpec):
    """A job 3 layers into quantization, as the pipeline reports it."""
    names = [f"model.layers.0.{k}" for k in SHAPES]
    yield StageStarted("load")
    yield StageFinished("load", 1.2)
    for n in names:
        yield LayerInfo(n, SHAPES[n.split(".", 3)[3]], 0)
    for stage, secs in (("calibrate", 30.5), ("plan", 12.25)):
        yield StageStarted(stage)
        yield StageFinished(stage, secs)
    yield StageStarted("allocate")
    yield Allocation({n: 3.0 for n in names}, -12.5)
    yield StageFinished("allocate", 0.4)
    yield Log("a line from the pipeline")
    yield StageStarted("quantize", len(names))
    for i, (n, bits) in enumerate(zip(names[:3], (3.25, 2.5, 2.75))):
        shape = SHAPES[n.split(".", 3)[3]]
        yield LayerDone(n, shape, bits, int(bits * shape[0] * shape[1] / 8), 0.5 + i, 0.01 * (i + 1), 1e-4 * (i + 1))
        yield StageProgress("quantize", i + 1, len(names), n)


@pytest.mark.parametrize("size", SIZES)
def test_run_screen(snap_compare, app, size, monkeypatch):
    def fake_run_job(spec, on_event, cancel, preview=None):
        for e in fake_events(spec):
            on_event(e)
        t0 = time.monotonic()
        while not cancel.is_set() and app.return_value is None and time.monotonic() - t0 < 30:
            time.sleep(0.02)
        raise JobCancelled("cancelled")

    monkeypatch.setattr(backend, "run_job", fake_run_job)

    async def run_before(pilot):
        from textual.widgets import ProgressBar

        await pilot.press("f5")
        for _ in range(200):
            await pilot.pause(0.05)
            if isinstance(app.screen, RunScreen) and len(app.screen.seconds) == 3:
                break
        assert isinstance(app.screen, RunScreen) and len(app.screen.seconds) == 3
        app.screen.query_one(ProgressBar).show_eta = False  # the one figure that depends on time
        await settle(pilot)
    assert snap_compare(app, terminal_size=size, run_before=run_before)


def fixed_report(spec: JobSpec) -> dict:
    rows = []
    for b in range(2):
        for k, (o, i) in SHAPES.items():
            bits = {"mlp.down_proj": 3.6, "mlp.up_proj": 2.9}.get(k, 3.1 - 0.2 * b)
            rows.append({"name": f"model.layers.{b}.{k}", "shape": [o, i], "bits": bits,
                         "bytes": int(bits * o * i / 8), "seconds": 1.0, "distortion": 0.05, "mse": 1e-4,
                         "mean_depth": bits - 0.1})
    n = sum(r["shape"][0] * r["shape"][1] for r in rows)
    return {"command": spec.batch_command(), "layers": rows, "totals": {
        "bits_per_weight": 3.004, "quantized_weights": n, "unquantized_bytes": 113_246_976,
        "model_bytes": 116_000_000, "model_mb": 116.0, "perplexity_before": {"eval": 17.512, "ood": 30.25},
        "perplexity_after": {"eval": 19.875, "ood": 35.5}, "seconds_total": 1234.0}}


@pytest.mark.parametrize("size", SIZES)
def test_results_screen(snap_compare, app, size):
    spec = JobSpec(out=OUT).validate()
    curve = [(1.5 + 0.5 * i, 10.0 / (1 + i) ** 2) for i in range(10)]
    allocation = Allocation({}, -12.0, curve)

    async def run_before(pilot):
        await app.push_screen(ResultsScreen(spec, fixed_report(spec), OUT, allocation))
        screen = app.screen
        for bits, ppl in ((2.0, (45.5, 80.25)), (2.5, (25.125, 44.0)), (3.5, (18.5, 32.0)), (4.0, (17.875, 30.75))):
            screen.post_message(MeasuredPoint({"target_bits": bits, "bits": bits, "distortion": 1 / bits,
                                               "perplexity": {"eval": ppl[0], "ood": ppl[1]}}))
        await settle(pilot)
        assert len(screen.points) == 5
        screen.query_one("#results").scroll_end(animate=False)  # down to the measured points
        await pilot.pause()
    assert snap_compare(app, terminal_size=size, run_before=run_before)
