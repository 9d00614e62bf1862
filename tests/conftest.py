import os

import pytest

# Developers building the core by hand (cmake -B build/dev) can point the tests at that
# build instead of the installed package: CVXQ_DEV_CORE_DIR=build/dev/cvxq_tui.
_dev = os.environ.get("CVXQ_DEV_CORE_DIR")
if _dev:
    import cvxq_tui

    cvxq_tui.__path__.insert(0, os.path.abspath(_dev))


@pytest.fixture(params=["scalar", "avx2"])
def isa(request):
    """Runs a test once on the scalar reference path and once on AVX2 (skipped without it)."""
    from cvxq_tui import _core

    if request.param == "avx2" and not _core.cpu_has_avx2():
        pytest.skip("CPU has no AVX2")
    previous = _core.active_isa()
    _core.set_isa(request.param)
    yield request.param
    _core.set_isa(previous)
