"""The Textual workstation (`cvxq-tui` without --batch). The only package that imports
textual; it drives cvxq_tui.pipeline through cvxq_tui.tui.backend from worker threads."""
