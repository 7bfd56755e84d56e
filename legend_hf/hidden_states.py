"""Pooled hidden states of texts: the forward pass stops at the deepest layer needed.

Texts are batched by a token budget in length order (halved on out-of-memory), padded on the tokenizer's
side with position ids taken from the attention mask, so results do not depend on batch size, padding
side or row order. Decoders can run the prompt shared by two texts once and continue both from its KV
cache. :class:`TextReader` is what fitting and scoring read through.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .formatting import Conversation, TextTemplate
from .models import POOLINGS, context_length, find_layers, is_decoder, normalize_layer
from .options import RuntimeOptions

logger = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by a hook once the deepest layer needed has run."""


@dataclass
class Encoded:
    """Token ids of a list of texts, and which of them were truncated."""

    input_ids: list[list[int]]
    truncated: list[bool]


def tokenize(tokenizer: Any, texts: Sequence[str], *, max_length: int, add_special_tokens: bool) -> Encoded:
    """Tokenise once; over-long texts lose tokens from the *start* so the response end stays visible.

    A leading special token (BOS/CLS) is kept. Nothing is truncated silently: callers count and flag it.
    """
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    special = set(tokenizer.all_special_ids)
    out, truncated = [], []
    for row in ids:
        if len(row) <= max_length:
            out.append(list(row))
            truncated.append(False)
            continue
        head = [row[0]] if row and row[0] in special else []
        out.append(head + list(row[len(row) - (max_length - len(head)) :]))
        truncated.append(True)
    return Encoded(out, truncated)


def length_batches(
    lengths: Sequence[int], *, max_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Indices grouped longest first, each batch's padded size (rows x longest) within ``max_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * longest > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad(input_ids: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in input_ids)
    ids = torch.full((len(input_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), width), dtype=torch.long)
    for r, row in enumerate(input_ids):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[r, span] = torch.tensor(row, dtype=torch.long)
        mask[r, span] = 1
    return ids, mask


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


class LayerReader:
    """Reads pooled hidden states at a set of layers, running blocks only up to the deepest one."""

    def __init__(self, model: nn.Module, layers: Sequence[int], pooling: str) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model = model
        self.blocks = find_layers(model)
        self.n_layers = len(self.blocks)
        self.layers = sorted({normalize_layer(x, self.n_layers) for x in layers})
        self.pooling = pooling
        params = inspect.signature(model.forward).parameters
        self._extra_inputs = {"position_ids", "use_cache"} & set(params)
        # transformers renamed the KV-cache argument from ``past_key_values`` to ``cache`` (5.2x).
        self._cache_input = next((k for k in ("cache", "past_key_values") if k in params), None)
        self.can_share_prefix = (
            is_decoder(model) and "position_ids" in self._extra_inputs and self._cache_input is not None
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        cache: Any = None,
    ) -> dict[int, torch.Tensor]:
        """Unpooled states ``{layer: (batch, seq, hidden)}``; blocks past the deepest layer never run.

        ``attention_mask`` covers cached and new tokens; with ``cache`` (a ``DynamicCache``) the new
        tokens continue the cached ones and the cache is extended in place.
        """
        captured: dict[int, torch.Tensor] = {}
        deepest = self.layers[-1]
        handles = []

        def capture(index: int) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                captured[index] = output[0] if isinstance(output, tuple) else output
                if index == deepest:
                    raise _StopForward

            return hook

        def capture_input(module: nn.Module, args: Any, kwargs: Any) -> None:
            captured[0] = args[0] if args else kwargs["hidden_states"]
            if deepest == 0:
                raise _StopForward

        for index in self.layers:
            if index == 0:
                handles.append(self.blocks[0].register_forward_pre_hook(capture_input, with_kwargs=True))
            elif index < self.n_layers:
                handles.append(self.blocks[index - 1].register_forward_hook(capture(index)))
        device = self.device
        attention_mask = attention_mask.to(device)
        kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "attention_mask": attention_mask}
        if "position_ids" in self._extra_inputs:
            if position_ids is None:
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            kwargs["position_ids"] = position_ids.to(device)
        if cache is not None:
            kwargs.update({self._cache_input or "past_key_values": cache, "use_cache": True})
        elif "use_cache" in self._extra_inputs:
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
        """Pooled fp32 states ``{layer: (batch, hidden)}`` for one padded batch."""
        states = self.hidden(input_ids, attention_mask)
        mask = attention_mask.to(self.device)
        return {k: pool(v, mask, self.pooling).cpu() for k, v in states.items()}

    def _empty(self, n: int) -> dict[int, torch.Tensor]:
        config: Any = self.model.config
        return {k: torch.empty((n, int(config.hidden_size)), dtype=torch.float32) for k in self.layers}

    def read(
        self,
        input_ids: Sequence[Sequence[int]],
        *,
        pad_id: int,
        padding_side: str = "right",
        max_tokens: int = 8192,
        max_batch_size: int | None = None,
        on_batch: Callable[[int], object] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Pooled states of every text, in input order, batched by ``max_tokens`` in length order.

        ``on_batch(n)`` is called after each batch of ``n`` texts (a progress bar's ``update``)."""
        out = self._empty(len(input_ids))
        for i, row in enumerate(input_ids):
            if not row:
                raise ValueError(f"text {i} has no tokens: give it a template or a non-empty prompt/response")

        def run(batch: list[int]) -> None:
            ids, mask = pad([input_ids[i] for i in batch], pad_id, padding_side)
            states = self(ids, mask)
            for k in self.layers:
                out[k][batch] = states[k]
            if on_batch is not None:
                on_batch(len(batch))

        self._run_batches([len(x) for x in input_ids], run, max_tokens, max_batch_size)
        return out

    def read_pairs(
        self,
        first: Sequence[Sequence[int]],
        second: Sequence[Sequence[int]],
        *,
        pad_id: int,
        max_tokens: int = 8192,
        max_batch_size: int | None = None,
        on_batch: Callable[[int], object] | None = None,
    ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Pooled states of text pairs that share a token prefix (a prompt), running the prefix once.

        The shared prefix goes through the model once with a KV cache; both continuations run from it.
        For a causal model this equals reading each text in full (within float noise). The prefix is the
        longest common token prefix, so any template works and the boundary never needs to be known.
        """
        if len(first) != len(second):
            raise ValueError(
                f"read_pairs needs as many first as second texts ({len(first)} != {len(second)})"
            )
        for i, (a, b) in enumerate(zip(first, second, strict=True)):
            if not a or not b:
                raise ValueError(f"pair {i} has a text with no tokens")
        shared = [
            min(_common_prefix(a, b), len(a) - 1, len(b) - 1) for a, b in zip(first, second, strict=True)
        ]
        out_first, out_second = self._empty(len(first)), self._empty(len(second))
        alone = [i for i, n in enumerate(shared) if n == 0]  # nothing to share: read in full
        if alone:
            texts = [first[i] for i in alone] + [second[i] for i in alone]
            states = self.read(
                texts, pad_id=pad_id, max_tokens=max_tokens, max_batch_size=max_batch_size, on_batch=on_batch
            )
            for k in self.layers:
                out_first[k][alone], out_second[k][alone] = states[k][: len(alone)], states[k][len(alone) :]
        sharing = [i for i, n in enumerate(shared) if n > 0]
        # The continuation pass holds 2 rows of (prefix + suffix) per pair: budget on that.
        cost = [2 * max(len(first[i]), len(second[i])) for i in sharing]

        def run(group: list[int]) -> None:
            batch = [sharing[j] for j in group]
            prefixes = [list(first[i][: shared[i]]) for i in batch]
            suffixes = [list(first[i][shared[i] :]) for i in batch] + [
                list(second[i][shared[i] :]) for i in batch
            ]
            states = self._read_continuations(prefixes, suffixes, pad_id)
            for k in self.layers:
                out_first[k][batch] = states[k][: len(batch)]
                out_second[k][batch] = states[k][len(batch) :]
            if on_batch is not None:
                on_batch(2 * len(batch))

        self._run_batches(cost, run, max_tokens, max_batch_size)
        return out_first, out_second

    def _run_batches(
        self,
        costs: Sequence[int],
        run: Callable[[list[int]], None],
        max_tokens: int,
        max_batch_size: int | None,
    ) -> None:
        """``run`` each length-sorted batch of item indices; on out-of-memory, halve the budget and go on.

        A batch that fails writes nothing, so its items are simply batched again under the smaller
        budget (with a warning naming the budget to pass next time). One item alone that does not fit
        re-raises, naming its size.
        """
        pending = length_batches(costs, max_tokens=max_tokens, max_batch_size=max_batch_size)
        while pending:
            batch = pending.pop(0)
            try:
                run(batch)
                continue
            except torch.OutOfMemoryError as error:
                if len(batch) == 1:
                    raise torch.OutOfMemoryError(
                        f"out of memory on a single text or pair ({costs[batch[0]]} padded tokens): lower "
                        f"max_length, use a smaller dtype or a device with more memory ({error})"
                    ) from error
            # Outside the handler, whose traceback still holds the failed batch's tensors.
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            padded = len(batch) * max(costs[i] for i in batch)
            max_tokens = max(1, padded // 2)
            logger.warning(
                "out of memory on a batch of %d (%d padded tokens): retrying with max_tokens_per_batch=%d "
                "(pass that to avoid the retries)",
                len(batch),
                padded,
                max_tokens,
            )
            left = batch + [i for b in pending for i in b]
            regrouped = length_batches(
                [costs[i] for i in left], max_tokens=max_tokens, max_batch_size=max_batch_size
            )
            pending = [[left[j] for j in b] for b in regrouped]

    def _read_continuations(
        self, prefixes: list[list[int]], suffixes: list[list[int]], pad_id: int
    ) -> dict[int, torch.Tensor]:
        """Pool ``2B`` texts: suffix ``j`` continues (non-empty) prefix ``j % B``."""
        from transformers import DynamicCache

        repeat = torch.arange(len(suffixes)) % len(prefixes)
        suffix_ids, suffix_mask = pad(suffixes, pad_id, "right")
        prefix_ids, prefix_mask = pad(prefixes, pad_id, "right")
        prefix_len = prefix_mask.sum(1)
        device = self.device
        config: Any = self.model.config
        cache = DynamicCache(config=config)
        prefix_states = self.hidden(prefix_ids, prefix_mask, cache=cache)
        prefix_sums = {}
        if self.pooling == "mean":  # the prompt's part of each mean pool
            keep = prefix_mask.to(device).bool().unsqueeze(-1)
            prefix_sums = {k: torch.where(keep, v.float(), 0.0).sum(1) for k, v in prefix_states.items()}
        cache.reorder_cache(repeat.to(device))  # type: ignore[arg-type]
        full_mask = torch.cat([prefix_mask[repeat], suffix_mask], dim=1)
        positions = prefix_len[repeat].unsqueeze(1) + torch.arange(suffix_ids.shape[1]).unsqueeze(0)
        states = self.hidden(suffix_ids, full_mask, position_ids=positions, cache=cache)
        mask = suffix_mask.to(device)
        out = {}
        for k, v in states.items():
            if self.pooling == "last":
                out[k] = pool(v, mask, "last")
            else:
                total = torch.where(mask.bool().unsqueeze(-1), v.float(), 0.0).sum(1)
                total = total + prefix_sums[k][repeat.to(device)]
                count = mask.sum(1) + prefix_len[repeat].to(device)
                out[k] = total / count.unsqueeze(1).float()
        return {k: v.cpu() for k, v in out.items()}


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class TextReader:
    """Format, tokenise and read (prompt messages, response) pairs at ``layers``: pooled fp32 states."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        layers: Sequence[int],
        pooling: str,
        template: TextTemplate,
        runtime: RuntimeOptions | None = None,
        max_length: int | None = None,
        progress: str | None = None,
    ) -> None:
        runtime = runtime or RuntimeOptions()
        self.tokenizer = tokenizer
        self.template = template
        self.layer_reader = LayerReader(model, layers, pooling)
        self.max_length = max_length or runtime.max_length or context_length(model, tokenizer)
        self.max_tokens_per_batch = runtime.max_tokens_per_batch
        on_cpu = self.layer_reader.device.type == "cpu"
        # On a CPU one text (or pair) per forward beats padded batches (bench/README.md: ~2x on 2 cores).
        self.max_batch_size = (
            runtime.max_batch_size if runtime.max_batch_size is not None else (1 if on_cpu else None)
        )
        # Prompt sharing pays on a CPU (1.26x) but cost 26% on an H200, where the prefix and continuation
        # passes pad more than one full pass (bench/README.md): default on for CPUs only.
        share = on_cpu if runtime.share_prompt is None else runtime.share_prompt
        self.share_prompt = share and self.layer_reader.can_share_prefix
        # A progress bar's description (texts/s, ETA; shown on terminals), or none.
        self.progress = progress if runtime.progress else None
        pad_id = tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else (tokenizer.eos_token_id or 0)

    @property
    def layers(self) -> list[int]:
        return self.layer_reader.layers

    def _bar(self, total: int) -> Any:
        from tqdm.auto import tqdm

        # disable=None: shown on a terminal, silent in logs and CI; disable=True without a description.
        return tqdm(total=total, desc=self.progress, unit="text", disable=None if self.progress else True)

    def texts(self, conversations: Sequence[Conversation]) -> list[str]:
        return [self.template.render(self.tokenizer, prompt, response) for prompt, response in conversations]

    def _encode(self, conversations: Sequence[Conversation]) -> Encoded:
        return tokenize(
            self.tokenizer,
            self.texts(conversations),
            max_length=self.max_length,
            add_special_tokens=self.template.adds_special_tokens,
        )

    def read(self, conversations: Sequence[Conversation]) -> tuple[dict[int, torch.Tensor], list[bool]]:
        """Pooled fp32 states ``{layer: (n, hidden)}`` in input order, and a truncated flag per text."""
        encoded = self._encode(conversations)
        with self._bar(len(conversations)) as bar:
            states = self.layer_reader.read(
                encoded.input_ids,
                pad_id=self.pad_id,
                padding_side=getattr(self.tokenizer, "padding_side", "right") or "right",
                max_tokens=self.max_tokens_per_batch,
                max_batch_size=self.max_batch_size,
                on_batch=bar.update,
            )
        return states, encoded.truncated

    def read_pairs(
        self,
        first: Sequence[Conversation],
        second: Sequence[Conversation],
    ) -> tuple[dict[int, torch.Tensor], list[bool]]:
        """States of ``first + second`` (in that order) where ``first[i]`` and ``second[i]`` usually share a
        prompt: decoders run each shared prompt once (``share_prompt``); other models read every text in full.
        """
        if not self.share_prompt:
            return self.read([*first, *second])
        a, b = self._encode(first), self._encode(second)
        with self._bar(len(first) + len(second)) as bar:
            states_a, states_b = self.layer_reader.read_pairs(
                a.input_ids,
                b.input_ids,
                pad_id=self.pad_id,
                max_tokens=self.max_tokens_per_batch,
                max_batch_size=self.max_batch_size,
                on_batch=bar.update,
            )
        return {k: torch.cat([states_a[k], states_b[k]]) for k in states_a}, a.truncated + b.truncated
