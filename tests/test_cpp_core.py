"""Builds the C++ core with its C++ tests (no Python module) and runs them on both
instruction-set paths, so `pytest` also covers what only C++ can check; then again under
AddressSanitizer + UBSan, with the packed-file fuzz harness run against the sanitized
Python module."""

import json
import os
import shutil
import subprocess
import sys
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


def _has_nanobind() -> bool:
    try:
        import nanobind  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.fixture(scope="module")
def sanitized_build(tmp_path_factory):
    """The core, its C++ tests and (when nanobind is installed) the Python module, built with
    AddressSanitizer + UBSan (-fno-sanitize-recover: any finding aborts)."""
    cmake = _tool("cmake")
    if cmake is None or not (ROOT / "core").is_dir():
        pytest.skip("cmake or the source tree is not available")
    build = tmp_path_factory.mktemp("cpp-asan")
    gen = ["-G", "Ninja"] if _tool("ninja") else []
    python = "ON" if _has_nanobind() else "OFF"
    r = subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), *gen, f"-DCVXQ_BUILD_PYTHON={python}",
                        "-DCVXQ_BUILD_TESTS=ON", "-DCVXQ_SANITIZE=ON", "-DCMAKE_BUILD_TYPE=RelWithDebInfo"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = subprocess.run([cmake, "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return build


SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"}


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_cpp_core_tests_pass_under_sanitizers(sanitized_build, isa):
    env = dict(os.environ, CVXQ_ISA=isa, **SANITIZER_ENV)
    r = subprocess.run([str(sanitized_build / "cvxq_core_tests")], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "ERROR: AddressSanitizer" not in r.stderr and "runtime error:" not in r.stderr, r.stderr[-6000:]
    assert " 0 failed" in r.stdout


def test_mutated_model_files_under_sanitizers(sanitized_build):
    """The loader fuzz harness (tools/fuzz_loader.py) against the sanitized core module."""
    module = list((sanitized_build / "cvxq_tui").glob("_core*.so"))
    if not module:
        pytest.skip("nanobind is not installed here: the sanitized Python module was not built")
    gcc = _tool("gcc") or _tool("cc")
    libs = [subprocess.run([gcc, f"-print-file-name={n}"], capture_output=True, text=True).stdout.strip()
            for n in ("libasan.so", "libubsan.so")]
    if not all(os.path.isabs(p) and os.path.exists(p) for p in libs):
        pytest.skip("the sanitizer runtimes are not found for LD_PRELOAD")
    env = dict(os.environ, **SANITIZER_ENV, LD_PRELOAD=" ".join(libs),
               CVXQ_DEV_CORE_DIR=str(sanitized_build / "cvxq_tui"))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz_loader.py"), "-n", "2000", "--seed", "3",
                        "--json"], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "ERROR: AddressSanitizer" not in r.stderr and "runtime error:" not in r.stderr, r.stderr[-6000:]
    res = json.loads(r.stdout)
    assert res["crashes"] == 0 and res["inputs"] == 2000
    assert "/cpp-asan" in subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, 'tools'); import fuzz_loader; print(fuzz_loader._core.__file__)"],
        env=env, capture_output=True, text=True, cwd=ROOT).stdout, "the sanitized module was the one loaded"
