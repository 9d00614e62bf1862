"""Helpers shared by the test files."""

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock

from cvxq_tui import cli


def run_cli(*args) -> tuple[int, str, str]:
    """`cvxq-tui ARGS` in this process, as the console script runs it: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with mock.patch.object(sys, "argv", ["cvxq-tui", *map(str, args)]), redirect_stdout(out), \
            redirect_stderr(err):
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue(), err.getvalue()
