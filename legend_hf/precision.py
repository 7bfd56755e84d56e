"""How the annotator computes: which dtype runs by default, and bf16 matmuls over a float32 residual stream.

``dtype=None`` (auto) is bfloat16 where the device computes it natively (a CUDA GPU with bf16 support, a CPU
with AMX-BF16 or AVX512-BF16: oneDNN runs bf16 matmuls there at ~7x float32's speed) and float32 elsewhere,
where emulated bf16 is no faster. ``float32`` is exact.

A half-precision model (bfloat16, float16) on the packed path (:mod:`legend_hf.packing`) is *mixed*: the
matmul layers' weights and outputs are half precision, while the residual stream, the embeddings and the
norms stay float32. Rounding the residual stream to bf16 after every block is what costs margins most
(bench/README.md: Spearman to float32 0.988 -> 0.998 on 48 HH-RLHF pairs at no cost in speed). Models
that cannot pack run wholly in the dtype asked for.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

HALF_DTYPES = ("bfloat16", "float16")
ROW_BUCKET = 64  # CPU half-precision matmuls run on a multiple of this many rows (see _bucketed)
# Sibling linear layers that read the same input (attention projections, gated-MLP inputs): fused into one matmul.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"))


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
    as do the norms that read it. Sibling layers reading one input run as one matmul (:func:`fuse_siblings`),
    the cast of a layer's input is reused by any other layer reading the same tensor, and rotary position
    tables are cast once, so the speed is that of a pure half-precision model. Attention inputs of mixed
    dtypes are harmonised by the packed attention function. The model is changed in place.
    """
    from torch.utils.weak import WeakIdKeyDictionary

    half = getattr(torch, dtype)
    model.float()
    fuse_siblings(model)
    casts = WeakIdKeyDictionary()  # input tensor -> its cast, dropped with the input
    shapes = WeakIdKeyDictionary()  # a cast padded to whole buckets of rows -> the input's leading shape

    def cast_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        if x not in casts:
            rows = x.numel() // x.shape[-1]
            if x.is_cuda or rows % ROW_BUCKET == 0:
                if x.dtype == half:
                    return None
                casts[x] = x.to(half)
            else:
                casts[x] = _bucketed(x, half, rows)
                shapes[casts[x]] = x.shape[:-1]
        return (casts[x], *args[1:])

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
    return model


class FusedLinear(nn.Linear):
    """Sibling linear layers reading the same input (:data:`SIBLINGS`) as one matmul over their stacked weights.

    One wide matmul runs faster than two or three narrow ones (bench/README.md: gate and up projections fused
    take ~0.3-0.6x the time of the two); each sibling is replaced by a :class:`LinearPart` returning its columns.
    """

    def __init__(self, layers: list[nn.Linear]) -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and initialise a weight first
        first = layers[0]
        self.in_features, self.out_features = first.in_features, sum(layer.out_features for layer in layers)
        self.weight = nn.Parameter(
            torch.cat([layer.weight.detach() for layer in layers]), requires_grad=False
        )
        biases = [layer.bias.detach() for layer in layers if layer.bias is not None]
        self.register_parameter(
            "bias", nn.Parameter(torch.cat(biases), requires_grad=False) if biases else None
        )
        self.sizes = [layer.out_features for layer in layers]
        self._input: torch.Tensor | None = None  # the input whose parts are not all taken yet
        self._parts: tuple[torch.Tensor, ...] = ()
        self._left = 0

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Sibling ``index``'s output for ``x``; the fused matmul runs once per input."""
        if self._input is not x:
            self._input, self._parts, self._left = x, self(x).split(self.sizes, dim=-1), len(self.sizes)
        out = self._parts[index]
        self._left -= 1
        if self._left == 0:  # every sibling has its part: let the activations go
            self._input, self._parts = None, ()
        return out


class LinearPart(nn.Module):
    """One sibling of a :class:`FusedLinear`: behaves as the ``nn.Linear`` it replaced."""

    def __init__(self, fused: FusedLinear, index: int) -> None:
        super().__init__()
        self.fused = [fused]  # a list: the parent module registers the fused layer, not each part
        self.index = index
        self.in_features, self.out_features = fused.in_features, fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0].part(self.index, x)


def fuse_siblings(model: nn.Module) -> nn.Module:
    """Replace each group of :data:`SIBLINGS` linear layers by a :class:`FusedLinear` (in place)."""
    for parent in list(model.modules()):
        for names in SIBLINGS:
            layers = [getattr(parent, name, None) for name in names]
            if not all(type(layer) is nn.Linear for layer in layers):
                continue
            linears = [layer for layer in layers if isinstance(layer, nn.Linear)]
            if len({(x.in_features, x.bias is None, x.weight.dtype) for x in linears}) != 1:
                continue
            fused = FusedLinear(linears)
            parent.add_module("fused_" + "_".join(names), fused)
            for index, name in enumerate(names):
                setattr(parent, name, LinearPart(fused, index))
    return model


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
