"""How the annotator computes: which dtype runs by default, and bf16 matmuls over a float32 residual stream.

``dtype=None`` (auto) is bfloat16 where the device computes it natively (a CUDA GPU with bf16 support, a CPU
with AMX-BF16 or AVX512-BF16: oneDNN runs bf16 matmuls there at ~7x float32's speed) and float32 elsewhere,
where emulated bf16 is no faster. ``float32`` is exact.

A half-precision model (bfloat16, float16) on the packed path (:mod:`legend_hf.packing`) is *mixed*: the
matmul layers' weights and outputs are half precision, while the residual stream, the embeddings and the
norms stay float32. Rounding the residual stream to bf16 after every block is what costs margins most
(bench/README.md: Spearman to float32 0.988 -> 0.998 on 48 HH-RLHF pairs at no cost in speed). Models
that cannot pack run wholly in the dtype asked for. On a CPU with native bf16, gated SiLU MLPs (Llama, Mistral,
Qwen) run the activation and the product inside the gate and up matmuls (:func:`fuse_gated_mlp`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

HALF_DTYPES = ("bfloat16", "float16")
ROW_BUCKET = 64  # CPU half-precision matmuls run on a multiple of this many rows (see _bucketed)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matmuls natively (faster than float32, not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """The dtype a run uses: ``dtype`` when given, else bfloat16 where native (:func:`native_bf16`), else float32."""
    if dtype not in (None, "auto"):
        return str(dtype)
    return "bfloat16" if native_bf16(device) else "float32"


def matmul_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose weight feeds a matmul: ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    return [m for m in model.modules() if isinstance(m, (nn.Linear, Conv1D))]


def mixed_precision(model: nn.Module, dtype: str) -> nn.Module:
    """Matmul layers in ``dtype`` (their inputs cast on the way in), every other parameter float32.

    The residual stream then stays float32 (a float32 stream plus a half-precision block output is float32),
    as do the norms that read it. The cast of a layer's input is reused by the next layer reading the same
    tensor (q/k/v, gate/up), and rotary position tables are cast once, so the speed is that of a pure
    half-precision model. Attention inputs of mixed dtypes are harmonised by the packed attention function.
    """
    from torch.utils.weak import WeakIdKeyDictionary

    half = getattr(torch, dtype)
    model.float()
    casts = WeakIdKeyDictionary()  # input tensor -> its cast, dropped with the input
    shapes = WeakIdKeyDictionary()  # a cast padded to whole buckets of rows -> the input's leading shape

    def cast(x: torch.Tensor) -> torch.Tensor:
        if x not in casts:
            rows = x.numel() // x.shape[-1]
            if x.is_cuda or rows % ROW_BUCKET == 0:
                if x.dtype == half:
                    return x
                casts[x] = x.to(half)
            else:
                casts[x] = _bucketed(x, half, rows)
                shapes[casts[x]] = x.shape[:-1]
        return casts[x]

    def cast_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = cast(args[0])
        return None if x is args[0] else (x, *args[1:])

    def unpad_output(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        shape = shapes.get(args[0])
        if shape is None:
            return None
        return out[: shape.numel()].view(*shape, out.shape[-1])

    for layer in matmul_layers(model):
        layer.to(half)
        layer.register_forward_pre_hook(cast_input)
        layer.register_forward_hook(unpad_output)
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            module.register_forward_hook(lambda m, a, out: tuple(t.to(half) for t in out))
    if half == torch.bfloat16 and native_bf16(torch.device("cpu")) and torch.backends.mkldnn.is_available():
        for module in model.modules():
            if is_gated_silu_mlp(module):
                fuse_gated_mlp(module, cast)
    return model


def is_gated_silu_mlp(module: nn.Module) -> bool:
    """``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with SiLU: the MLP of Llama, Mistral, Qwen, SmolLM."""
    from transformers.activations import SiLUActivation

    return all(
        isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")
    ) and (isinstance(getattr(module, "act_fn", None), (nn.SiLU, SiLUActivation)))


def fuse_gated_mlp(mlp: nn.Module, cast: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """On a CPU, run a bf16 gated SiLU MLP as two oneDNN matmuls whose epilogues apply the SiLU (gate) and the
    product (up) to the float32 accumulators: one bf16 rounding instead of three, and no separate passes over
    the ``intermediate_size``-wide activations (bench/README.md: faster, and closer to float32).

    ``cast`` makes the half-precision input (whole buckets of rows, see :func:`_bucketed`); other devices run
    the module's own forward.
    """
    forward = mlp.forward
    linear = torch.ops.mkldnn._linear_pointwise
    gate, up, down = (getattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))

    def fused(x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return forward(x)
        rows = x.numel() // x.shape[-1]
        h = cast(x).reshape(-1, x.shape[-1])
        h = linear.binary(h, linear(h, gate.weight, gate.bias, "swish", [], ""), up.weight, up.bias, "mul")
        return down(h)[:rows].view(*x.shape[:-1], down.out_features)

    mlp.forward = fused


def _bucketed(x: torch.Tensor, half: torch.dtype, rows: int) -> torch.Tensor:
    """``x`` in ``half`` as a 2-d matrix of ``rows`` rows padded with zeros to a multiple of :data:`ROW_BUCKET`.

    oneDNN compiles and caches a half-precision kernel for every matmul shape it meets; packed rows of every
    length make that cache (up to 1,024 kernels) grow RSS by hundreds of MiB over a long run (bench/memory.py).
    Whole buckets of rows keep the shapes few.
    """
    out = x.new_empty(-(-rows // ROW_BUCKET) * ROW_BUCKET, x.shape[-1], dtype=half)
    out[:rows] = x.reshape(rows, x.shape[-1])
    out[rows:] = 0
    return out


def compute_dtypes(model: nn.Module) -> tuple[str, str]:
    """(matmul dtype, residual-stream dtype) of a model: equal unless it is :func:`mixed_precision`."""
    layers = matmul_layers(model)
    matmul = layers[0].weight.dtype if layers else next(model.parameters()).dtype
    get_embeddings: Any = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    residual = embeddings.weight.dtype if isinstance(embeddings, nn.Embedding) else matmul
    return str(matmul).removeprefix("torch."), str(residual).removeprefix("torch.")
