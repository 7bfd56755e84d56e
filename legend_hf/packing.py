"""Padding-free packing: the texts of a token budget run as one row, each text attending only to itself.

Texts are concatenated into a single row with position ids restarting at every text, and the model's
attention is swapped (through transformers' ``AttentionInterface``) for a variable-length one: flash-attention's
varlen kernel on a GPU when ``flash-attn`` is installed, else torch's (``torch.nn.attention.varlen``), else one
``scaled_dot_product_attention`` call per text (CPUs, float32 on GPUs). No token is padding, and no mask
quadratic in the row's length is ever built.

A pack can also *continue* the texts of an earlier pack (prompt sharing): each text of the continuation pack
attends to the cached keys and values of its prefix in the earlier pack, then to itself, as a KV cache would.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = "legend_packed"
# On a CPU, masked half-precision attention runs on each text's keys padded (and masked) to a multiple of this.
KEY_BUCKET = 64


@dataclass
class Pack:
    """One packed row: the token range of each text, and, for a continuation, the prefix each text continues.

    ``keep=True`` keeps every layer's keys and values (a prefix pack); ``prefix``/``prefix_of`` make text ``i``
    continue text ``prefix_of[i]`` of the pack ``prefix``, which may itself continue another pack (a system
    prompt, then a user prompt, then a response): a kept continuation keeps its prefix's keys with its own.
    """

    lengths: list[int]
    keep: bool = False
    prefix: Pack | None = None
    prefix_of: list[int] | None = None
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _device_cache: dict[tuple[str, str], Any] = field(default_factory=dict)

    @property
    def starts(self) -> list[int]:
        """Token offsets of the texts, plus the row's length at the end (``cu_seqlens``)."""
        return _offsets(self.lengths)

    def prefix_lengths(self) -> list[int]:
        """Tokens before each text: all of its prefix's (0 without one)."""
        if self.prefix is None or self.prefix_of is None:
            return [0] * len(self.lengths)
        before = self.prefix.key_lengths()
        return [before[p] for p in self.prefix_of]

    def key_lengths(self) -> list[int]:
        """Tokens each text attends to: its prefix's and its own."""
        return [p + n for p, n in zip(self.prefix_lengths(), self.lengths, strict=True)]

    def position_ids(self) -> torch.Tensor:
        """Positions restart at every text (continuations start after their prefix)."""
        offsets = self.prefix_lengths()
        return torch.cat([torch.arange(o, o + n) for o, n in zip(offsets, self.lengths, strict=True)])[None]

    def _cached(self, name: str, device: torch.device, make: Any) -> Any:
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = make()
        return self._device_cache[key]

    def key_index(self, device: torch.device) -> torch.Tensor:
        """Where each attended key sits in ``cat([prefix keys, own keys])``, text after text."""

        def make() -> torch.Tensor:
            assert self.prefix is not None and self.prefix_of is not None
            own, pre = self.starts, _offsets(self.prefix.key_lengths())
            offset = pre[-1]
            parts = [
                torch.cat(
                    [torch.arange(pre[p], pre[p + 1]), torch.arange(offset + own[i], offset + own[i + 1])]
                )
                for i, p in enumerate(self.prefix_of)
            ]
            return to_device(torch.cat(parts), device)

        return self._cached("key_index", device, make)

    def masks(
        self,
        key_lengths: Sequence[int],
        causal: bool,
        window: int | None,
        dtype: torch.dtype,
        device: torch.device,
        bucket: int = 1,
    ) -> list[torch.Tensor | None]:
        """Additive masks (0 or -inf, in ``dtype``) of the keys each query of a text sees: queries are the last of
        its keys, as in a KV cache, within ``window``; ``None`` where plain causal attention (or full attention,
        for encoders) is exact. A mask spans the text's keys padded to a multiple of ``bucket`` (padding masked)."""

        def make() -> list[torch.Tensor | None]:
            out: list[torch.Tensor | None] = []
            for q_len, k_len in zip(self.lengths, key_lengths, strict=True):
                if not causal or (q_len == k_len and (window is None or k_len <= window)):
                    out.append(None)
                    continue
                at = torch.arange(k_len - q_len, k_len)[:, None]
                keys = torch.arange(_round_up(k_len, bucket))[None, :]
                allowed = keys <= at
                if window is not None:
                    allowed &= keys > at - window
                additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, float("-inf"))
                out.append(to_device(additive, device))
            return out

        return self._cached(f"masks {causal} {window} {dtype} {bucket}", device, make)

    def padded_key_index(
        self, key_lengths: Sequence[int], widths: Sequence[int], device: torch.device
    ) -> torch.Tensor:
        """Each text's keys (consecutive runs of ``key_lengths``) repeated at their last to ``widths``."""

        def make() -> torch.Tensor:
            starts = _offsets(key_lengths)
            parts = [
                torch.arange(start, start + width).clamp(max=start + n - 1)
                for start, n, width in zip(starts, key_lengths, widths, strict=False)
            ]
            return to_device(torch.cat(parts), device)

        return self._cached(f"padded keys {list(widths)}", device, make)

    def cu_seqlens(self, lengths: Sequence[int], name: str, device: torch.device) -> torch.Tensor:
        def make() -> torch.Tensor:
            out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
            out[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
            return to_device(out, device)

        return self._cached(name, device, make)


def _round_up(n: int, bucket: int) -> int:
    return -(-n // bucket) * bucket


def _offsets(lengths: Sequence[int]) -> list[int]:
    """Where each of consecutive runs of ``lengths`` starts, plus their total at the end."""
    return [0, *itertools.accumulate(lengths)]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device without waiting for a GPU's queue (pinned memory, non-blocking copy)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def supports_packing(model: nn.Module) -> bool:
    """Models whose attention goes through transformers' attention interface and that take position ids."""
    config: Any = getattr(model, "config", None)
    return (
        bool(getattr(model, "_supports_attention_backend", False))
        and "position_ids" in inspect.signature(model.forward).parameters
        and getattr(config, "attn_logit_softcapping", None) is None
        and not getattr(config, "is_encoder_decoder", False)
    )


@contextmanager
def packed_attention(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with the packed attention function, restoring its own implementation afterwards."""
    from transformers import AttentionInterface, PretrainedConfig

    if ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION, attention)
    configs = {
        id(c): c for m in model.modules() if isinstance(c := getattr(m, "config", None), PretrainedConfig)
    }
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = ATTENTION
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    legend_pack: Pack | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Variable-length attention over a :class:`Pack`: ``query``/``key``/``value`` are ``(1, heads, tokens,
    head_dim)``; returns ``(1, tokens, heads, head_dim)`` as transformers' attention functions do."""
    if legend_pack is None:
        raise ValueError(f"the {ATTENTION!r} attention runs packed rows only (legend_hf.packing)")
    dtype = value.dtype  # mixed precision: rotary tables may have made q/k float32
    query, key = query.to(dtype), key.to(dtype)
    key_lengths = legend_pack.key_lengths()
    if legend_pack.prefix is not None:
        prefix_key, prefix_value = legend_pack.prefix.kv[id(module)]
        index = legend_pack.key_index(query.device)
        key, value = _take(_cat(prefix_key, key), index), _take(_cat(prefix_value, value), index)
    if legend_pack.keep:  # each text's keys after its prefix's: what a continuation attends to
        legend_pack.kv[id(module)] = (key, value)
    causal = bool(getattr(module, "is_causal", True))
    window = sliding_window if causal else None
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _varlen_kernel() is not None:
        out = _varlen(query, key, value, legend_pack, key_lengths, causal, scaling, window)
    else:
        out = _per_text(query, key, value, legend_pack, key_lengths, causal, scaling, window)
    return out, None


def _cat(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``(1, heads, tokens, dim)`` keys or values joined along the tokens, token-major (see :func:`_take`)."""
    return torch.cat([before.transpose(1, 2), after.transpose(1, 2)], dim=1).transpose(1, 2)


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, :, index]`` for ``(1, heads, tokens, dim)`` keys or values, gathered a whole token at a time: the
    projections leave them token-major (a token's heads are one run in memory), where this is 4-6x faster on a
    CPU than indexing each head's tokens (a probe: 75 us against 451 us for 3,000 of SmolLM2's keys)."""
    return x.transpose(1, 2).index_select(1, index).transpose(1, 2)


def _per_text(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pack: Pack,
    key_lengths: Sequence[int],
    causal: bool,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    """One ``scaled_dot_product_attention`` call per text (CPUs, float32 on GPUs); masks are built once per
    pack. Measured on 2 CPU cores, this beats one call over the texts padded into a batch.

    On a CPU, half-precision attention with a mask (continuations, sliding windows) compiles and caches a oneDNN
    kernel for every (query, key) shape it meets, which grew RSS by hundreds of MiB over a long run: each masked
    text's keys are padded to a multiple of :data:`KEY_BUCKET` (the padding masked out), which keeps the shapes
    few. The attention then runs 1.8x faster than in float32 (SmolLM2 on one thread; bench/README.md).
    """
    gqa = query.shape[1] != key.shape[1]
    dtype = query.dtype
    half = query.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    bucket = KEY_BUCKET if half else 1
    masks = pack.masks(key_lengths, causal, window, dtype, query.device, bucket)
    widths = [k if mask is None else _round_up(k, bucket) for k, mask in zip(key_lengths, masks, strict=True)]
    if widths != list(key_lengths):
        index = pack.padded_key_index(key_lengths, widths, query.device)
        key, value = _take(key, index), _take(value, index)
    batch, heads, tokens, dim = query.shape
    out = query.new_empty(batch, tokens, heads, dim)  # written in the layout returned: no transposing copy
    q0 = k0 = 0
    for q_len, k_len, mask in zip(pack.lengths, widths, masks, strict=True):
        q, k, v = query[:, :, q0 : q0 + q_len], key[:, :, k0 : k0 + k_len], value[:, :, k0 : k0 + k_len]
        out[:, q0 : q0 + q_len] = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=causal and mask is None,
            scale=scaling,
            enable_gqa=gqa,
        ).transpose(1, 2)
        q0, k0 = q0 + q_len, k0 + k_len
    return out


@functools.cache
def _varlen_kernel() -> Any:
    """flash-attn's ``flash_attn_varlen_func`` when installed, else torch's ``varlen_attn``, else ``None``."""
    try:
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn
    except ImportError:
        return None


def _varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pack: Pack,
    key_lengths: Sequence[int],
    causal: bool,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    """A GPU varlen kernel over the whole row (bottom-right causal alignment, as in a KV cache)."""
    kernel = _varlen_kernel()
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, dim)
    cu_q = pack.cu_seqlens(pack.lengths, "cu_q", q.device)
    cu_k = pack.cu_seqlens(key_lengths, "cu_k", q.device)
    left = -1 if window is None else window - 1
    window_size = (left, 0) if causal else (-1, -1)
    max_q, max_k = max(pack.lengths), max(key_lengths)
    if kernel.__module__.startswith("flash_attn"):
        out = kernel(
            q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scaling, causal=causal, window_size=window_size
        )
    else:
        gqa = q.shape[1] != k.shape[1]
        out = kernel(
            q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, window_size=window_size, enable_gqa=gqa
        )
    return out.unsqueeze(0)
