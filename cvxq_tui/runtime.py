"""Running packed models: a Linear that computes from the packed data, loading an output
folder back into a transformers model, and exporting a plain dequantized checkpoint."""

from __future__ import annotations

import contextlib

from pathlib import Path

import numpy as np
import torch

from . import _core
from .errors import FormatError, InputError
from .packed import MODEL_FILE, PackedLinear, read_model_file

# Up to this many rows of activations, the packed kernels decode weights on the fly; above
# it one dense copy of this layer's weights is made for the product and dropped at once.
KERNEL_MAX_BATCH = 16
# The same on the CPU (the tiled AVX2 kernel): measured on 2 cores at 64 rows it still beat
# dequantizing + torch's fp32 product on 4096x4096 (15 vs 21 ms) and was within 15% on the
# default model's 576-wide layers; torch's AVX-512 GEMM wins on larger batches.
CPU_KERNEL_MAX_BATCH = 64
# Job size of the GPU tiling, in units of 1024 weights. Small jobs (one batch of the decode
# path) let the kernel give every warp an even share of a layer in one wave; a warp streams
# consecutive jobs of the same rows as one run, so small jobs cost no restarts.
GPU_UNITS_PER_JOB = 4


class CudaPacked:
    """One packed layer's arrays on a GPU. Layers stored as W (all CVXQ layers) are re-tiled
    once on the host into the GPU tiling (core/include/cvxq/gpu_layout.hpp: the same index
    bits, ordered for the tensor-core kernel) and only that is copied; layers stored as W^T
    (the RTN/GPTQ baselines) keep the packed arrays and the transposed kernels. Made from a
    layer that has passed the host-side validation, which the kernels rely on."""

    def __init__(self, packed: PackedLinear, device):
        core = packed.core()  # validates (raises FormatError) before anything reaches the GPU
        self.device = torch.device(device)

        def put(a, dtype):
            return torch.from_numpy(np.ascontiguousarray(a).reshape(-1).view(dtype)).to(self.device)

        self.tiled = not packed.transposed
        if self.tiled:
            lay = core.gpu_layout(units_per_job=GPU_UNITS_PER_JOB)
            self.args = dict(
                rows=packed.rows, cols=packed.cols, payload=put(lay["payload"], np.int32),
                jobs=put(lay["jobs"], np.int32), records=put(lay["records"], np.int32),
                pairs=put(lay["pairs"], np.int32), singles=put(lay["singles"], np.int16),
                table=put(packed.table, np.float32),
                perm=None if packed.perm is None else put(packed.perm, np.int32),
                seg_begin=list(lay["seg_begin"]))
        else:
            offsets = _core.tile_offsets(packed.rows, packed.cols, packed.group_rows, packed.depth)
            self.args = dict(
                rows=packed.rows, cols=packed.cols, group_rows=packed.group_rows, transposed=True,
                depth=put(packed.depth, np.uint8), tile_offset=put(offsets, np.int32),
                payload=put(packed.payload, np.int32), loc=put(packed.loc, np.int16),
                scale=put(packed.scale, np.int16), table=put(packed.table, np.float32),
                perm=None if packed.perm is None else put(packed.perm, np.int32))
        self.shape = (packed.out_features, packed.in_features)

    def nbytes(self) -> int:
        """Bytes this layer holds on the GPU."""
        return sum(v.numel() * v.element_size() for v in self.args.values() if isinstance(v, torch.Tensor))

    def _stream(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    def _launch(self, fn, **kw) -> None:
        """Runs a core kernel launch with this layer's GPU current: the core launches on the
        current device, on this GPU's stream."""
        elsewhere = self.device.index is not None and self.device.index != torch.cuda.current_device()
        with torch.cuda.device(self.device) if elsewhere else contextlib.nullcontext():
            fn(**self.args, **kw, stream=self._stream())

    def matmul_(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y += W^ x for float32 x [n, in_features], y [n, out_features] on this GPU."""
        self._launch(_core.cuda_tiled_matmul if self.tiled else _core.cuda_matmul, x=x, y=y)
        return y

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=dtype, device=self.device)
        self._launch(_core.cuda_tiled_dequantize if self.tiled else _core.cuda_dequantize, out=out)
        return out


class QuantLinear(torch.nn.Module):
    """A Linear whose weight is the packed layer: on the CPU the core's AVX2 kernels on the
    CPU tiling (up to CPU_KERNEL_MAX_BATCH rows), on a GPU the CUDA kernels (up to
    KERNEL_MAX_BATCH rows), both decoding the weights on the fly; larger batches decode this
    one layer transiently."""

    def __init__(self, packed: PackedLinear):
        super().__init__()
        self.packed = packed
        self.in_features = packed.in_features
        self.out_features = packed.out_features
        b = packed.bias
        self.bias = None if b is None else torch.nn.Parameter(torch.from_numpy(b.copy()), requires_grad=False)
        self._gpu: dict[torch.device, CudaPacked] = {}

    def to_device(self, device) -> "QuantLinear":
        """Copies the packed arrays to a GPU (once) and the bias with them."""
        device = torch.device(device)
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            if device not in self._gpu:
                self._gpu[device] = CudaPacked(self.packed, device)
        if self.bias is not None:
            self.bias.data = self.bias.data.to(device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.float32).contiguous()
        if x2.is_cuda:
            y = self._forward_cuda(x2)
        else:
            y = self._forward_cpu(x2)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _forward_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] <= CPU_KERNEL_MAX_BATCH and not self.packed.transposed:
            y = torch.from_numpy(self.packed.matmul(x2.detach().numpy()))
        else:
            w = torch.from_numpy(self.packed.dequantize())
            y = x2 @ w.T
        if self.bias is not None:
            y = y + self.bias.to(y.device)
        return y

    def _forward_cuda(self, x2: torch.Tensor) -> torch.Tensor:
        self.to_device(x2.device)
        gpu = self._gpu[x2.device if x2.device.index is not None else torch.device("cuda", 0)]
        n = x2.shape[0]
        bias = None if self.bias is None else self.bias.to(device=x2.device, dtype=torch.float32)
        if n <= KERNEL_MAX_BATCH:
            if bias is None:
                y = torch.zeros(n, self.out_features, dtype=torch.float32, device=x2.device)
            else:
                y = bias.expand(n, -1).contiguous()
            return gpu.matmul_(x2, y)
        return torch.nn.functional.linear(x2, gpu.dequantize(torch.float32), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"kind={self.packed.kind}, bits={8 * self.packed.nbytes() / (self.in_features * self.out_features):.3f}")


def resolve_device(device: str) -> str:
    """'cpu', 'cuda' or 'auto' -> the device packed layers run on, with a clear error when
    CUDA is asked for and cannot be used."""
    if device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:"):
        raise InputError(f"device {device!r}: use cpu, cuda, cuda:N or auto")
    gpu_ok = torch.cuda.is_available() and _core.cuda_available()
    if device == "auto":
        return "cuda" if gpu_ok else "cpu"
    if device.startswith("cuda") and not gpu_ok:
        if not _core.cuda_available() and not getattr(_core, "with_cuda", False):
            raise InputError("device 'cuda': this build of cvxq-tui has no CUDA kernels; reinstall with "
                             "CVXQ_CUDA=ON bash tools/install.sh (needs nvcc), or use --device cpu")
        raise InputError("device 'cuda': no CUDA GPU is visible to torch and the CUDA runtime; "
                         "use --device cpu")
    return device


def _set_module(model, name: str, module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def load_quantized(folder, device: str = "cpu"):
    """A transformers model whose quantized layers run from the packed data."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    device = resolve_device(device)
    if not (folder / "config.json").is_file():
        raise FormatError(f"{folder} has no config.json: is it a cvxq-tui output folder?")
    packed, rest, _meta = read_model_file(folder / MODEL_FILE)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, JSONDecodeError...
        raise FormatError(f"{folder}/config.json cannot be read ({_brief(e)}); the folder is damaged: "
                          "re-run the job or copy config.json from the original model") from None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # as models.py loads
    for name, layer in packed.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            old = None
        if not isinstance(old, torch.nn.Linear) or (old.out_features, old.in_features) != (
                layer.out_features, layer.in_features):
            want = "no such layer" if old is None else f"{getattr(old, 'out_features', '?')}x{getattr(old, 'in_features', '?')}"
            raise FormatError(f"{folder}: packed layer {name} is {layer.out_features}x{layer.in_features} but "
                              f"config.json's model has {want}; the folder's files do not belong together")
        _set_module(model, name, QuantLinear(layer))
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in rest.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # size mismatches
        raise FormatError(f"{folder}: {MODEL_FILE} does not fit config.json ({str(e).strip()[:300]}); "
                          "the folder's files do not belong together") from None
    if unexpected:
        raise FormatError(f"{folder}: tensors the model does not have: {unexpected[:3]}")
    model.tie_weights()
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if left:
        # Buffers such as rotary inverse frequencies are not saved; rebuild them on the CPU.
        _materialize_buffers(model, config)
        left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if left:
            raise FormatError(f"{folder}: weights missing from {MODEL_FILE}: {left[:3]}")
    model.eval()
    if device == "cpu":
        # The CPU tiling replaces the packed payload in memory (it holds the same bits).
        for mod in model.modules():
            if isinstance(mod, QuantLinear) and not mod.packed.transposed:
                mod.packed.keep_only_cpu_layout()
    else:
        model.to(device)
        for mod in model.modules():
            if isinstance(mod, QuantLinear):
                mod.to_device(device)
    return model


def _materialize_buffers(model, config) -> None:
    from transformers import AutoModelForCausalLM

    fresh = None
    for name, buf in list(model.named_buffers()):
        if buf.device.type != "meta":
            continue
        if fresh is None:
            fresh = dict(AutoModelForCausalLM.from_config(config).named_buffers())
        mod_name, _, attr = name.rpartition(".")
        model.get_submodule(mod_name).register_buffer(attr, fresh[name].clone(), persistent=False)


def dequantized_model(folder):
    """A plain transformers model with every packed layer replaced by an nn.Linear."""
    model = load_quantized(folder)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = torch.from_numpy(mod.packed.dequantize())
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.clone()
            _set_module(model, name, lin)
    return model


def export(folder, out) -> Path:
    """Write a plain dequantized HF checkpoint that any runtime loads."""
    out = Path(out)
    model = dequantized_model(folder)
    has_bias = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    cfg = model.config
    if has_bias and getattr(cfg, "model_type", "") in ("llama", "mistral", "qwen2"):
        # Bias correction created biases; Llama-family configs say where biases exist.
        if hasattr(cfg, "attention_bias"):
            cfg.attention_bias = True
        if hasattr(cfg, "mlp_bias") or cfg.model_type == "llama":
            cfg.mlp_bias = True
        _zero_fill_biases(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(folder).save_pretrained(out)
    return out


def load_tokenizer(folder):
    """The tokenizer an output folder holds, or a FormatError saying it is missing."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # missing files raise OSError or ValueError, damaged ones others
        raise FormatError(f"{folder}: the tokenizer files are missing or damaged ({_brief(e)}); re-run "
                          "the job or copy tokenizer.json and tokenizer_config.json from the original model") from None


def _zero_fill_biases(model) -> None:
    """Give every Linear inside the decoder a bias (zeros where none was made) so the
    config's bias flags hold for all of them."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.bias is None and not name.endswith("lm_head"):
            mod.bias = torch.nn.Parameter(torch.zeros(mod.out_features))


def _brief(e: Exception, limit: int = 160) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."
