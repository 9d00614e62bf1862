"""Modal dialogs: a yes/no confirmation and an error message. Errors are shown as the
message of the CvxqError that carries them, never as a traceback."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmDialog(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str, yes: str = "Yes", no: str = "No"):
        super().__init__(classes="dialog")
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box"):
            yield Static(self.question, classes="dialog-text")
            with Horizontal(classes="dialog-buttons"):
                yield Button(f"{self.yes} (y)", id="yes", variant="error", compact=True)
                yield Button(f"{self.no} (n)", id="no", variant="primary", compact=True)

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()  # the safe answer is the default

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


class ErrorDialog(ModalScreen[None]):
    BINDINGS = [Binding("escape,enter,space", "close", "Close")]

    def __init__(self, title: str, message: str):
        super().__init__(classes="dialog")
        self.title_text, self.message = title, message

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog-box error"):
            yield Static(self.title_text, classes="dialog-title")
            yield Static(self.message, classes="dialog-text", id="error-message")
            yield Static("enter / esc: close", classes="dim")

    def action_close(self) -> None:
        self.dismiss(None)
