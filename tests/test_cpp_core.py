"""Builds the C++ core with its C++ tests (no Python module) and runs them on both
instruction-set paths, so `pytest` also covers what only C++ can check."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name):
    path = shutil.which(name)
    if path is None:
        try:
            mod = __import__(name)
            path = str(Path(mod.BIN_DIR) / name) if hasattr(mod, "BIN_DIR") else None
        except ImportError:
            path = None
    return path


@pytest.fixture(scope="module")
def core_tests(tmp_path_factory):
    cmake = _tool("cmake")
    if cmake is None or not (ROOT / "core").is_dir():
        pytest.skip("cmake or the source tree is not available")
    build = tmp_path_factory.mktemp("cpp-build")
    gen = ["-G", "Ninja"] if _tool("ninja") else []
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), *gen, "-DCVXQ_BUILD_PYTHON=OFF",
                    "-DCVXQ_BUILD_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release"], check=True,
                   capture_output=True)
    subprocess.run([cmake, "--build", str(build), "-j", "2"], check=True, capture_output=True)
    exe = build / "cvxq_core_tests"
    assert exe.is_file()
    return exe


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_cpp_core_tests_pass(core_tests, isa):
    env = dict(os.environ, CVXQ_ISA=isa)
    r = subprocess.run([str(core_tests)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    passed = int(r.stdout.strip().splitlines()[-1].split()[0])
    assert passed >= 30 and " 0 failed" in r.stdout
