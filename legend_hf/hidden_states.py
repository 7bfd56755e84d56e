"""Pooled hidden states of token ids at a set of layers: the forward pass stops at the deepest layer needed.

:class:`LayerReader` runs batches (:mod:`legend_hf.batching`) as packed rows without padding
(:mod:`legend_hf.packing`), or, for models that cannot pack, as padded batches with position ids taken from
the attention mask; results do not depend on batch size, padding side or row order. Decoders run the prompt
shared by two texts once and continue both from its keys and values. :class:`legend_hf.reader.TextReader`
formats and tokenises the texts it reads.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .batching import pad, run_batches
from .models import POOLINGS, find_layers, is_decoder, normalize_layer
from .packing import Pack, packed_attention, supports_packing, to_device

# A beginning shared by every text of a read (a system prompt) runs once when it has at least this many tokens.
ROOT_TOKENS = 8


class _StopForward(Exception):
    """Raised by a hook once the deepest layer needed has run."""


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool in fp32 over real tokens only (pad positions may hold garbage, even NaN)."""
    hidden = hidden.float()
    keep = mask.bool().unsqueeze(-1)
    if pooling == "mean":
        summed = torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(1)
        return summed / mask.sum(1, keepdim=True).clamp(min=1).to(hidden.dtype)
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = torch.where(mask.bool(), positions, -1).max(dim=1).values
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


@dataclass
class Reading:
    """Pooled states of ``n`` texts as batches finish, still on the model's device: :meth:`result` moves them
    to the host once, so a GPU runs every queued batch while the host prepares the next texts."""

    layers: list[int]
    n: int
    hidden_size: int
    batches: list[tuple[list[int], dict[int, torch.Tensor]]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(
        self, index: list[int], states: dict[int, torch.Tensor], on_batch: Callable[[int], object] | None
    ) -> None:
        """Keep a finished batch's states for texts ``index`` and report its size to ``on_batch``; batches may
        finish on several threads at once (:func:`legend_hf.batching.run_batches`)."""
        with self._lock:
            self.batches.append((index, states))
            if on_batch is not None:
                on_batch(len(index))

    def result(self) -> dict[int, torch.Tensor]:
        """``{layer: (n, hidden)}`` fp32 on the CPU, in text order."""
        out = {k: torch.empty((self.n, self.hidden_size), dtype=torch.float32) for k in self.layers}
        for index, states in self.batches:
            for k in self.layers:
                out[k][index] = states[k].cpu()
        return out


class LayerReader:
    """Reads pooled hidden states at a set of layers, running blocks only up to the deepest one.

    ``packing`` (default: where the model supports it, :func:`legend_hf.packing.supports_packing`) runs the
    texts of a token budget as one row without padding; otherwise texts are padded into length-sorted batches.
    Results stay on the model's device until a read ends, so a GPU never waits for the host between batches.
    """

    def __init__(
        self, model: nn.Module, layers: Sequence[int], pooling: str, *, packing: bool | None = None
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.blocks = find_layers(model)
        self.n_layers = len(self.blocks)
        self.layers = sorted({normalize_layer(x, self.n_layers) for x in layers})
        self.pooling = pooling
        params = inspect.signature(model.forward).parameters
        self._extra_inputs = {"position_ids", "use_cache"} & set(params)
        # BERT-style models default token types from a buffer as long as their context; a packed row is longer.
        self._token_types = any(name.endswith("token_type_ids") for name, _ in model.named_buffers())
        self.packing = supports_packing(model) if packing is None else packing and supports_packing(model)
        # A shared prompt runs once, its keys and values kept for both continuations (packed rows only).
        self.can_share_prefix = self.packing and is_decoder(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return to_device(tensor, self.device)

    def hidden(self, input_ids: torch.Tensor, **inputs: Any) -> dict[int, torch.Tensor]:
        """Unpooled states ``{layer: (batch, seq, hidden)}``; blocks past the deepest layer never run.

        ``inputs`` go to the model's forward as they are (``attention_mask``, ``position_ids``,
        ``legend_pack``...), on its device."""
        captured: dict[int, torch.Tensor] = {}
        deepest = self.layers[-1]
        handles = []
        thread = threading.get_ident()  # other threads may run the model at the same time (batching)

        def capture(index: int) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if threading.get_ident() != thread:
                    return
                captured[index] = output[0] if isinstance(output, tuple) else output
                if index == deepest:
                    raise _StopForward

            return hook

        def capture_input(module: nn.Module, args: Any, kwargs: Any) -> None:
            if threading.get_ident() != thread:
                return
            captured[0] = args[0] if args else kwargs["hidden_states"]
            if deepest == 0:
                raise _StopForward

        for index in self.layers:
            if index == 0:
                handles.append(self.blocks[0].register_forward_pre_hook(capture_input, with_kwargs=True))
            elif index < self.n_layers:
                handles.append(self.blocks[index - 1].register_forward_hook(capture(index)))
        kwargs = {
            "input_ids": self._to_device(input_ids),
            **{k: self._to_device(v) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()},
        }
        if "use_cache" in self._extra_inputs:
            kwargs["use_cache"] = False
        try:
            with torch.inference_mode():
                captured[self.n_layers] = self.model(**kwargs).last_hidden_state
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return {k: captured[k] for k in self.layers}

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, torch.Tensor]:
        """Pooled fp32 states ``{layer: (batch, hidden)}`` of one padded batch (position ids from the mask)."""
        inputs: dict[str, Any] = {"attention_mask": attention_mask}
        if "position_ids" in self._extra_inputs:
            inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        states = self.hidden(input_ids, **inputs)
        mask = self._to_device(attention_mask)
        return {k: pool(v, mask, self.pooling) for k, v in states.items()}

    def forward_pack(self, texts: Sequence[Sequence[int]], pack: Pack) -> dict[int, torch.Tensor]:
        """Unpooled states ``{layer: (tokens, hidden)}`` of ``texts`` run as one packed row, inside
        :meth:`_packed` (each read enters it once, for all its batches and threads)."""
        ids = torch.tensor([[t for text in texts for t in text]], dtype=torch.long)
        inputs: dict[str, Any] = {"position_ids": pack.position_ids(), "legend_pack": pack}
        if self._token_types:
            inputs["token_type_ids"] = torch.zeros_like(ids)
        states = self.hidden(ids, **inputs)
        return {k: v[0] for k, v in states.items()}

    def run_pack(
        self, texts: Sequence[Sequence[int]], pack: Pack, prefix_sums: dict[int, torch.Tensor] | None = None
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor] | None]:
        """Pooled fp32 states of each text of ``pack`` and, for mean pooling, each text's sums over every token
        it attends to (its prefix's included: ``prefix_sums`` are the prefix pack's)."""
        states = self.forward_pack(texts, pack)
        lengths = torch.tensor(pack.lengths)
        if self.pooling == "last":
            index = self._to_device(lengths.cumsum(0) - 1)
            return {k: v[index].float() for k, v in states.items()}, None
        text = self._to_device(torch.repeat_interleave(torch.arange(len(lengths)), lengths))
        sums = {
            k: torch.zeros(len(lengths), v.shape[-1], device=v.device).index_add_(0, text, v.float())
            for k, v in states.items()
        }
        if prefix_sums is not None and pack.prefix_of is not None:
            of = self._to_device(torch.tensor(pack.prefix_of))
            sums = {k: v + prefix_sums[k][of] for k, v in sums.items()}
        counts = self._to_device(torch.tensor(pack.key_lengths(), dtype=torch.float32).unsqueeze(1))
        return {k: v / counts for k, v in sums.items()}, sums

    def _root(
        self, texts: Sequence[Sequence[int]], limit: int
    ) -> tuple[Pack | None, dict[int, torch.Tensor] | None, int]:
        """The beginning every text shares (a chat template's system prompt, the Alpaca preamble), at most
        ``limit`` tokens, run once as a kept pack the texts continue; ``(None, None, 0)`` below ``ROOT_TOKENS``."""
        n = min(min(_common_prefix(texts[0], t) for t in texts), limit) if len(texts) > 1 else 0
        if n < ROOT_TOKENS:
            return None, None, 0
        root = Pack([n], keep=True)
        _, sums = self.run_pack([texts[0][:n]], root)
        return root, sums, n

    def _packed(self) -> AbstractContextManager[None]:
        return packed_attention(self.model) if self.packing else nullcontext()

    def reading(self, n: int) -> Reading:
        config: Any = self.model.config
        return Reading(self.layers, n, int(config.hidden_size))

    def read(
        self,
        input_ids: Sequence[Sequence[int]],
        *,
        pad_id: int,
        padding_side: str = "right",
        max_tokens: int = 2048,
        max_batch_size: int | None = None,
        on_batch: Callable[[int], object] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Pooled states of every text, in input order: packed rows of at most ``max_tokens`` tokens, or
        padded batches of at most ``max_tokens`` padded tokens, grouped in length order.

        ``on_batch(n)`` is called after each batch of ``n`` texts (a progress bar's ``update``)."""
        reading = self.reading(len(input_ids))
        self.start_read(
            input_ids,
            reading,
            list(range(len(input_ids))),
            pad_id,
            padding_side,
            max_tokens,
            max_batch_size,
            on_batch,
        )
        return reading.result()

    def start_read(
        self,
        input_ids: Sequence[Sequence[int]],
        reading: Reading,
        index: list[int],
        pad_id: int,
        padding_side: str,
        max_tokens: int,
        max_batch_size: int | None,
        on_batch: Callable[[int], object] | None,
    ) -> None:
        """Queue the reads of ``input_ids`` into ``reading`` at positions ``index`` (see :meth:`read`)."""
        for i, row in enumerate(input_ids):
            if not row:
                raise ValueError(
                    f"text {index[i]} has no tokens: give it a template or a non-empty prompt/response"
                )

        with self._packed():  # for the whole read: threads must not swap it back midway
            root, root_sums, skip = (None, None, 0)
            if self.can_share_prefix:
                root, root_sums, skip = self._root(input_ids, min(map(len, input_ids), default=1) - 1)

            def run(batch: list[int]) -> None:
                texts = [input_ids[i][skip:] for i in batch]
                if self.packing:
                    pack = Pack(
                        [len(x) for x in texts],
                        prefix=root,
                        prefix_of=None if root is None else [0] * len(batch),
                    )
                    states = self.run_pack(texts, pack, root_sums)[0]
                else:
                    states = self(*pad(texts, pad_id, padding_side))
                reading.add([index[i] for i in batch], states, on_batch)

            run_batches(
                [len(x) for x in input_ids],
                run,
                max_tokens,
                max_batch_size,
                packing=self.packing,
                device=self.device,
            )

    def read_pairs(
        self,
        first: Sequence[Sequence[int]],
        second: Sequence[Sequence[int]],
        *,
        pad_id: int,
        max_tokens: int = 2048,
        max_batch_size: int | None = None,
        on_batch: Callable[[int], object] | None = None,
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Pooled states of text pairs that share a token prefix (a prompt), running the prefix once.

        The shared prefixes of a batch run as one packed row whose keys and values are kept; both
        continuations of each pair then run as a second packed row attending to them. For a causal model
        this equals reading each text in full (within float noise). The prefix is the longest common token
        prefix, so any template works and the boundary never needs to be known. Without
        :attr:`can_share_prefix` every text is read in full.
        """
        n = len(first)
        reading = self.reading(2 * n)
        positions = (list(range(n)), list(range(n, 2 * n)))
        self.start_read_pairs(first, second, reading, positions, pad_id, max_tokens, max_batch_size, on_batch)
        states = reading.result()
        return {k: v[:n] for k, v in states.items()}, {k: v[n:] for k, v in states.items()}

    def start_read_pairs(
        self,
        first: Sequence[Sequence[int]],
        second: Sequence[Sequence[int]],
        reading: Reading,
        positions: tuple[list[int], list[int]],
        pad_id: int,
        max_tokens: int,
        max_batch_size: int | None,
        on_batch: Callable[[int], object] | None,
    ) -> None:
        """Queue :meth:`read_pairs` into ``reading``: ``first[i]`` at ``positions[0][i]``, ``second[i]`` at
        ``positions[1][i]``."""
        if len(first) != len(second):
            raise ValueError(
                f"read_pairs needs as many first as second texts ({len(first)} != {len(second)})"
            )
        at_first, at_second = positions
        for i, (a, b) in enumerate(zip(first, second, strict=True)):
            if not a or not b:
                raise ValueError(f"pair {at_first[i]} has a text with no tokens")
        options = (pad_id, "right", max_tokens, max_batch_size, on_batch)
        if not self.can_share_prefix:
            self.start_read([*first, *second], reading, [*at_first, *at_second], *options)
            return
        shared = [
            min(_common_prefix(a, b), len(a) - 1, len(b) - 1) for a, b in zip(first, second, strict=True)
        ]
        alone = [i for i, s in enumerate(shared) if s == 0]  # nothing to share: read in full
        if alone:
            texts = [first[i] for i in alone] + [second[i] for i in alone]
            index = [at_first[i] for i in alone] + [at_second[i] for i in alone]
            self.start_read(texts, reading, index, *options)
        sharing = [i for i, s in enumerate(shared) if s > 0]
        if not sharing:
            return
        with self._packed():  # for the whole read: threads must not swap it back midway
            # The beginning all prompts share runs once; each prompt keeps at least one token of its own.
            root, root_sums, skip = self._root(
                [first[i] for i in sharing], min(shared[i] for i in sharing) - 1
            )

            def run(group: list[int]) -> None:
                batch = [sharing[j] for j in group]
                prefixes = [first[i][skip : shared[i]] for i in batch]
                suffixes = [first[i][shared[i] :] for i in batch] + [second[i][shared[i] :] for i in batch]
                of_root = None if root is None else [0] * len(batch)
                prefix = Pack([len(p) for p in prefixes], keep=True, prefix=root, prefix_of=of_root)
                prefix_sums = self.run_pack(prefixes, prefix, root_sums)[1]
                continuation = Pack(
                    [len(s) for s in suffixes], prefix=prefix, prefix_of=[*range(len(batch))] * 2
                )
                states = self.run_pack(suffixes, continuation, prefix_sums)[0]
                reading.add([at_first[i] for i in batch] + [at_second[i] for i in batch], states, on_batch)

            # Tokens each pair computes: its prompt once, both continuations.
            cost = [len(first[i]) + len(second[i]) - shared[i] - skip for i in sharing]
            run_batches(cost, run, max_tokens, max_batch_size, packing=self.packing, device=self.device)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
