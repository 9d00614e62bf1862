"""The key bindings, per screen (? or F1 from anywhere)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

HELP = """\
[b]Everywhere[/b]
  F1 / ?        this help            ctrl+q   quit (asks while a job runs)
  tab / S-tab   next / previous field
[b]Start[/b]
  type          model path, texts, budget (3.25 = bits/weight, 60MB = size), output
  F2            layers screen        F5 / ctrl+r   run the job
[b]Layers[/b]
  space         include / exclude    p then 0-8    pin bits (p then - unpins)
  /             filter by glob       esc           back to the table / start
  + / -         budget ±0.25 bits    c             calibrate + plan (CVXQ preview)
  a             include all          F5            run
[b]Run[/b]
  esc / x       cancel (asks)        r             resume after a cancel
  enter         results when done
[b]Results[/b]
  esc           back to the options  n             new job (start screen)
  m             measure: quantize + evaluate budgets around this one (CVXQ),
                perplexity vs bits plotted next to the predicted curve
  (F5 after c reuses the preview's calibration; a finished CVXQ job's is kept)
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,f1,question_mark,q", "close", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog-box help"):
            yield Static("cvxq-tui keys", classes="dialog-title")
            yield Static(HELP, id="help-text")

    def action_close(self) -> None:
        self.dismiss(None)
