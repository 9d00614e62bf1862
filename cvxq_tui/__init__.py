"""cvxq-tui: compress Hugging Face causal LMs with CVXQ (convex bit allocation)."""

__version__ = "0.1.0"

__all__ = ["load_quantized", "export", "run", "JobSpec", "__version__"]


def __getattr__(name):
    # Lazy, so `import cvxq_tui` (and the TUI's imports) do not pull in torch/transformers.
    if name in ("load_quantized", "export"):
        from . import runtime

        return getattr(runtime, name)
    if name == "run":
        from .pipeline import run

        return run
    if name == "JobSpec":
        from .spec import JobSpec

        return JobSpec
    raise AttributeError(f"module 'cvxq_tui' has no attribute {name!r}")
