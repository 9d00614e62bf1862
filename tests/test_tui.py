"""The Textual workstation driven through its pilot on the real default model, with tiny
settings (layer 0 only, 2 calibration windows of 64 tokens, no evaluation). The model is
probed once per module and handed to every app, so each test skips the layer probe."""

from __future__ import annotations

import asyncio
import html
import json
import re
import time

import pytest

from cvxq_tui.spec import JobSpec

textual = pytest.importorskip("textual")

from cvxq_tui.tui import backend  # noqa: E402
from cvxq_tui.tui.app import CvxqApp  # noqa: E402
from cvxq_tui.tui.screens.dialogs import ConfirmDialog, ErrorDialog  # noqa: E402
from cvxq_tui.tui.screens.help import HelpScreen  # noqa: E402
from cvxq_tui.tui.screens.layers import LayersScreen  # noqa: E402
from cvxq_tui.tui.screens.results import ResultsScreen  # noqa: E402
from cvxq_tui.tui.screens.run import RunScreen  # noqa: E402
from cvxq_tui.tui.screens.start import StartScreen  # noqa: E402
from cvxq_tui.tui.state import Draft, parse_budget  # noqa: E402

K_PROJ = "model.layers.0.self_attn.k_proj"


def tiny_spec(out, **kw) -> JobSpec:
    kw = {"include": ["model.layers.0.*"], "calib_samples": 2, "seq_len": 64, "evaluate": False, **kw}
    return JobSpec(out=str(out), **kw)


@pytest.fixture(scope="module")
def layout(tmp_path_factory):
    return backend.probe_model(tiny_spec(tmp_path_factory.mktemp("probe") / "out"))


def screen_text(app) -> str:
    """What the terminal shows, as plain text rows (from the SVG screenshot, the one export
    that covers every widget including modals)."""
    rows: dict[float, list[str]] = {}
    for y, body in re.findall(r'<text[^>]*?y="([\d.]+)"[^>]*>(.*?)</text>', app.export_screenshot()):
        rows.setdefault(float(y), []).append(html.unescape(body).replace("\xa0", " "))
    return "\n".join("".join(parts) for _, parts in sorted(rows.items()))


async def wait_for(pilot, condition, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s; screen:\n{screen_text(pilot.app)}")
        await pilot.pause(0.2)


def drive(scenario):
    """Run an async pilot scenario from a plain test (no asyncio plugin needed)."""
    asyncio.run(scenario())


async def start_job(pilot) -> RunScreen:
    """F5 from the start screen: the run screen opens on the draft's job."""
    await pilot.press("f5")
    await pilot.pause(0.2)
    assert isinstance(pilot.app.screen, RunScreen)
    return pilot.app.screen


async def type_into(pilot, selector: str, text: str) -> None:
    field = pilot.app.screen.query_one(selector)
    field.focus()
    field.value = ""
    await pilot.press(*list(text))
    await pilot.pause(0.1)


# -- pure state -----------------------------------------------------------------------------
def test_budget_parsing_and_spec_globs(layout):
    assert parse_budget("3.25") == (3.25, None)
    assert parse_budget("60MB") == (None, 60_000_000)
    draft = Draft(tiny_spec("x"))
    draft.set_layout(layout)
    assert sum(draft.included.values()) == 7
    assert draft.to_spec().include == ["model.layers.0.*"]      # the user's glob is kept
    draft.toggle(K_PROJ)
    draft.pin("model.layers.0.mlp.up_proj", 4)
    spec = draft.to_spec()
    assert spec.exclude == [] and K_PROJ not in spec.include and len(spec.include) == 6
    assert spec.pin == [("model.layers.0.mlp.up_proj", 4)]


# -- start screen ---------------------------------------------------------------------------
def test_budget_updates_live_size(layout, tmp_path):
    async def scenario():
        app = CvxqApp(tiny_spec(tmp_path / "out"), layout=layout)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause(0.2)
            assert isinstance(app.screen, StartScreen)
            before = str(app.screen.query_one("#estimate").render())
            assert "3.00 bits/w" in before and "7 layers" in before
            await type_into(pilot, "#budget", "2")
            after = str(app.screen.query_one("#estimate").render())
            assert "2.00 bits/w" in after and after != before
            size_3, size_2 = app.draft.estimate().size_bytes, None
            await type_into(pilot, "#budget", "525MB")
            est = app.draft.estimate()
            assert app.draft.spec.size == 525_000_000 and est.bits is not None and 0 < est.bits < 16
            size_2 = est.size_bytes
            assert size_2 != size_3
            await type_into(pilot, "#budget", "1MB")     # below the unquantized tensors
            assert "below the unquantized part" in str(app.screen.query_one("#estimate").render())
            await type_into(pilot, "#budget", "abc")
            assert "✗" in str(app.screen.query_one("#budget-note").render())
    drive(scenario)


def test_missing_model_path_is_reported(tmp_path):
    async def scenario():
        app = CvxqApp(JobSpec(model=str(tmp_path / "no-such-model"), out=str(tmp_path / "out")))
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_for(pilot, lambda: app.layout_status.startswith("cannot load"), 60)
            assert "no-such-model" in app.layout_status
            assert "cannot load the model" in screen_text(app)
            # Typing a bad path is flagged at once, and running refuses with the reason.
            await type_into(pilot, "#model", str(tmp_path / "nope"))
            assert "no such path" in str(app.screen.query_one("#model-note").render())
            await pilot.press("f5")
            await pilot.pause(0.2)
            assert isinstance(app.screen, ErrorDialog)
            assert "model: no such path" in screen_text(app)
            await pilot.press("escape")
            assert isinstance(app.screen, StartScreen)
    drive(scenario)


# -- layers screen --------------------------------------------------------------------------
def test_layers_toggle_pin_filter_and_replan(layout, tmp_path):
    async def scenario():
        app = CvxqApp(tiny_spec(tmp_path / "out"), layout=layout)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("f2")
            await pilot.pause(0.2)
            assert isinstance(app.screen, LayersScreen)
            table = app.screen.query_one("#layers")
            assert table.row_count == 210
            params_before = app.draft.estimate().quantized_params
            await pilot.press("down", "space")                # k_proj out
            assert app.draft.included[K_PROJ] is False
            assert app.draft.estimate().quantized_params == params_before - 192 * 576
            assert str(table.get_cell(K_PROJ, "inc")) == "·"
            await pilot.press("p", "5")                         # pin it
            assert app.draft.pins == {K_PROJ: 5}
            await pilot.press("p", "escape")                    # p then esc: nothing, stays here
            assert app.draft.pins == {K_PROJ: 5} and isinstance(app.screen, LayersScreen)
            await pilot.press("p", "minus", "space")            # unpin, back in
            assert app.draft.pins == {} and app.draft.included[K_PROJ] is True
            await pilot.press("slash", *"*.mlp.down*", "enter")
            assert table.row_count == 30
            await type_into(pilot, "#filter", "")
            assert table.row_count == 210
            table.focus()
            # CVXQ preview: calibrate + plan once, then a budget change only re-solves.
            await pilot.press("c")
            await wait_for(pilot, lambda: app.draft.allocation is not None, 120)
            first = dict(app.draft.allocation.layer_bits)
            assert app.screen.query_one("#bits-spark").data
            assert table.get_cell("model.layers.0.mlp.up_proj", "bits") != ""
            await pilot.press("minus", "minus")
            assert app.draft.spec.bits == 2.5
            # Each press starts a solve; only the one for the current budget is shown.
            await wait_for(pilot, lambda: app.preview_status == "allocation for 2.5 bits/weight", 60)
            assert sum(app.draft.allocation.layer_bits.values()) < sum(first.values())
            assert "allocation for 2.5" in screen_text(app)
    drive(scenario)


# -- run, results, cancel -------------------------------------------------------------------
def test_run_to_results(layout, tmp_path):
    out = tmp_path / "out"

    async def scenario():
        app = CvxqApp(tiny_spec(out), layout=layout)
        async with app.run_test(size=(80, 24)) as pilot:
            await start_job(pilot)
            await wait_for(pilot, lambda: isinstance(app.screen, ResultsScreen), 240)
            await pilot.pause(0.3)
            text = screen_text(app)
            assert "3.000" in text and "bits/weight" in text and "Layers per bits/weight" in text
            assert "Predicted distortion" in text
            assert len(app.draft.run_layers) == 7
            await pilot.resize_terminal(120, 40)
            await pilot.pause(0.3)
            wide = screen_text(app)
            assert str(out) in wide and "cvxq-tui --batch" in wide
            await pilot.press("escape")
            assert isinstance(app.screen, StartScreen)
    drive(scenario)
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 7 and abs(report["totals"]["bits_per_weight"] - 3.0) < 0.05


def test_cancel_then_resume(layout, tmp_path):
    out = tmp_path / "out"

    async def scenario():
        # 16 calibration windows of 256 tokens: a calibration of several seconds, so the
        # job is still running when the keys below arrive (a 2 x 64 one can finish first).
        app = CvxqApp(tiny_spec(out, calib_samples=16, seq_len=256), layout=layout)
        async with app.run_test(size=(80, 24)) as pilot:
            run = await start_job(pilot)
            await wait_for(pilot, lambda: run.progress.index >= 1, 120)   # past loading
            await pilot.press("ctrl+q")                       # quitting asks while a job runs
            await pilot.pause(0.2)
            assert isinstance(app.screen, ConfirmDialog)
            await pilot.press("n")
            await pilot.press("escape")                       # cancel asks too
            await pilot.pause(0.2)
            assert isinstance(app.screen, ConfirmDialog)
            await pilot.press("y")
            await wait_for(pilot, lambda: run.state == "cancelled", 120)
            await pilot.pause(0.2)
            assert "cancelled" in str(run.query_one("#stage").render())
            assert (out / "job.json").is_file() and not (out / "report.json").exists()
            await pilot.press("r")                            # resumable, from the same screen
            await wait_for(pilot, lambda: isinstance(app.screen, ResultsScreen), 240)
            await pilot.pause(0.3)  # let the new screen finish mounting before the app exits
    drive(scenario)
    assert (out / "report.json").is_file()


def test_failed_job_shows_message(layout, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "somebody-elses-file").write_text("x")

    async def scenario():
        app = CvxqApp(tiny_spec(out), layout=layout)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("f5")
            await wait_for(pilot, lambda: isinstance(app.screen, ErrorDialog), 60)
            text = screen_text(app)
            assert "not empty" in text and "Traceback" not in text
            await pilot.press("escape")
            assert "failed" in str(app.screen.query_one("#stage").render())
    drive(scenario)


# -- layouts at two sizes -------------------------------------------------------------------
@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
def test_screens_render(layout, tmp_path, size):
    async def scenario():
        app = CvxqApp(tiny_spec(tmp_path / "out"), layout=layout)
        async with app.run_test(size=size) as pilot:
            await pilot.pause(0.2)
            start = screen_text(app)
            for key in ("Model", "Budget", "Output", "Method", "bits/w", "vs fp32", "F5"):
                assert key in start, key
            await pilot.press("f2")
            await pilot.pause(0.2)
            layers = screen_text(app)
            for key in ("layer", "shape", "params", "0.self_attn.q_proj", "bits/layer"):
                assert key in layers, key
            await pilot.press("f1")
            await pilot.pause(0.2)
            assert isinstance(app.screen, HelpScreen) and "pin bits" in screen_text(app)
            await pilot.press("escape", "escape")
            assert isinstance(app.screen, StartScreen)
    drive(scenario)


# -- cancel while the model loads -------------------------------------------------------------
def test_cancel_during_load_is_prompt(layout, tmp_path, monkeypatch):
    """Loading has no cancel points of its own (from_pretrained): a load that would take a
    minute must still end the job within a moment of the cancel, resumable."""
    import threading

    from cvxq_tui import events, models

    release = threading.Event()
    real_load = models.load_model

    def slow_load(*args, **kw):
        release.wait(60)                      # a load that ignores cancel, like from_pretrained
        return real_load(*args, **kw)

    monkeypatch.setattr(models, "load_model", slow_load)
    out = tmp_path / "out"

    async def scenario():
        app = CvxqApp(tiny_spec(out), layout=layout)
        async with app.run_test(size=(80, 24)) as pilot:
            run = await start_job(pilot)
            await wait_for(pilot, lambda: run.progress.index == 0, 30)    # in the load stage
            assert "load" in str(run.query_one("#stage").render())
            await pilot.press("escape")
            await pilot.pause(0.1)
            assert isinstance(app.screen, ConfirmDialog)
            t0 = time.monotonic()
            await pilot.press("y")
            await wait_for(pilot, lambda: run.state == "cancelled", 10)
            assert time.monotonic() - t0 < 3.0
            assert "cancelled" in str(run.query_one("#stage").render())
            assert (out / "job.json").is_file() and not (out / "report.json").exists()
    try:
        drive(scenario)
        assert any(t.is_alive() for t in events.abandoned_loads)  # what cli._exit looks for
    finally:
        release.set()
        for t in events.abandoned_loads:  # it ends before the test does (else, as the last test
            t.join(60)                    # of a run, Python's shutdown under it could abort)


# -- F5 reuses the preview; measured rate-distortion -------------------------------------------
def test_calibration_key_ignores_budget_and_output():
    from cvxq_tui.pipeline import calibration_key

    base = tiny_spec("a")
    same = tiny_spec("b", bits=2.5, pin=[("model.layers.0.mlp.up_proj", 4)], evaluate=True, rounds=2)
    assert calibration_key(base) == calibration_key(same)
    for other in (tiny_spec("a", calib_samples=3), tiny_spec("a", text="x.txt"), tiny_spec("a", seed=1),
                  tiny_spec("a", group_rows=2 * base.group_rows), JobSpec(out="a", calib_samples=2, seq_len=64)):
        assert calibration_key(other) != calibration_key(base)


def test_run_reuses_preview_then_measures_rd(layout, tmp_path, monkeypatch):
    """c plans the preview; F5 runs from its calibration (no second load); on the results
    screen m quantizes + evaluates budgets around the job's own on that same calibration and
    plots perplexity against bits."""
    from cvxq_tui import models, pipeline

    loads, adopted = [], []
    real_load, real_adopt = models.load_model, pipeline.Job.adopt
    monkeypatch.setattr(models, "load_model", lambda *a, **kw: loads.append(1) or real_load(*a, **kw))
    monkeypatch.setattr(pipeline.Job, "adopt", lambda job, donor: adopted.append(job.spec.out) or
                        real_adopt(job, donor))
    out = tmp_path / "out"
    spec = tiny_spec(out, evaluate=True, eval_samples=2, eval_seq_len=64, ood_eval=False)

    async def scenario():
        app = CvxqApp(spec, layout=layout)
        async with app.run_test(size=(100, 40)) as pilot:
            await pilot.press("f2")
            await pilot.press("c")
            await wait_for(pilot, lambda: app.draft.allocation is not None, 120)
            preview = app.preview
            assert len(loads) == 1
            run = await pilot.press("f5") or app.screen
            assert isinstance(run, RunScreen)
            await wait_for(pilot, lambda: isinstance(app.screen, ResultsScreen), 240)
            await pilot.pause(0.3)
            assert len(loads) == 1 and app.preview is preview        # nothing loaded or calibrated again
            assert adopted == [str(out)]
            results = app.screen
            assert len(results.points) == 1                           # the job's own, evaluated
            await pilot.press("m")
            await wait_for(pilot, lambda: not results.measuring, 240)
            await pilot.pause(0.3)
            assert len(loads) == 1 and len(adopted) == 2              # the measurement too
            bits = sorted(p["bits"] for p in results.points)
            assert len(bits) == 5 and bits[0] < 2.2 and bits[-1] > 3.8, bits
            ppl = {round(p["bits"]): p["perplexity"]["eval"] for p in results.points}
            assert ppl[2] > ppl[4] > 0
            results.query_one("#results").scroll_end(animate=False)   # the last section
            await pilot.pause(0.3)
            text = screen_text(app)
            assert "Measured perplexity" in text and "measured: 5 quantized points" in text
            assert "◆" in text and "●" in text and "fp32" in text
    drive(scenario)
    report = json.loads((out / "report.json").read_text())
    assert "calibrate" not in report["totals"]["seconds_per_stage"]
    assert "load" not in report["totals"]["seconds_per_stage"]
