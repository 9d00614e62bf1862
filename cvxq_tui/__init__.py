"""cvxq-tui: compress Hugging Face causal LMs with CVXQ (convex bit allocation)."""

__version__ = "0.1.0"
