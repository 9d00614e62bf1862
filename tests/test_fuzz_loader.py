"""The packed-model loader and the core's decoders under mutated model files (see
tools/fuzz_loader.py, which runs the same harness at 10^5 inputs and more): every damaged file
is either read (and then decodes without error) or refused with a FormatError; never another
exception, never a crash."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import fuzz_loader  # noqa: E402


def test_mutated_model_files_fail_cleanly():
    res = fuzz_loader.run(3000, seed=1)
    assert res["crashes"] == 0, res["findings"]
    outcomes = res["outcomes"]
    # Every line of defence is reached: the safetensors parser, the checksums, the
    # structural checks of the packed layers and the core's validation.
    for kind in ("not safetensors", "checksum", "structure", "core validation"):
        assert outcomes.get(f"rejected: {kind}", 0) > 50, outcomes
    assert outcomes.get("accepted", 0) > 100, outcomes


def test_unmutated_seed_round_trips(tmp_path):
    from cvxq_tui.packed import read_model_file

    layers, rest = fuzz_loader.seed_model(0)
    path = tmp_path / "model.safetensors"
    path.write_bytes(fuzz_loader.seed_bytes(0))
    got, got_rest, meta = read_model_file(path)
    assert got.keys() == layers.keys() and got_rest.keys() == rest.keys()
    for name, layer in layers.items():
        assert (got[name].dequantize() == layer.dequantize()).all()
