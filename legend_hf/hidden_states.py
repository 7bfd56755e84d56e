"""Pooled hidden states of texts: the forward pass stops at the deepest layer needed.

Texts are grouped by a token budget in length order (halved on out-of-memory) and run as packed rows
without padding (:mod:`legend_hf.packing`), or, for models that cannot pack, as padded batches with
position ids taken from the attention mask; results do not depend on batch size, padding side or row
order. Decoders run the prompt shared by two texts once and continue both from its keys and values.
:class:`TextReader` is what fitting and scoring read through.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .formatting import Conversation, TextTemplate
from .models import POOLINGS, context_length, find_layers, is_decoder, normalize_layer
from .options import RuntimeOptions
from .packing import Pack, packed_attention, supports_packing, to_device

logger = logging.getLogger(__name__)

# Default token budgets of a packed row: on 2 CPU cores bf16 matmuls reach ~90% of their best speed at 2048
# tokens (bench/README.md); GPUs want rows large enough to fill them. A GPU reads texts in chunks of pairs.
CPU_TOKENS = 2048
GPU_TOKENS = 16384
GPU_CHUNK = 256
# A beginning shared by every text of a read (a system prompt) runs once when it has at least this many tokens.
ROOT_TOKENS = 8


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


@dataclass
class Reading:
    """Pooled states of ``n`` texts as batches finish, still on the model's device: :meth:`result` moves them
    to the host once, so a GPU runs every queued batch while the host prepares the next texts."""

    layers: list[int]
    n: int
    hidden_size: int
    batches: list[tuple[list[int], dict[int, torch.Tensor]]] = field(default_factory=list)

    def result(self) -> dict[int, torch.Tensor]:
        """``{layer: (n, hidden)}`` fp32 on the CPU, in text order."""
        out = {k: torch.empty((self.n, self.hidden_size), dtype=torch.float32) for k in self.layers}
        for index, states in self.batches:
            for k in self.layers:
                out[k][index] = states[k].cpu()
        return out


def pack_batches(
    lengths: Sequence[int], *, max_tokens: int, max_batch_size: int | None = None
) -> list[list[int]]:
    """Indices grouped longest first, each group's total tokens within ``max_tokens`` (a packed row)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i in order:
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or total + lengths[i] > max_tokens):
            batches.append(current)
            current, total = [], 0
        current.append(i)
        total += lengths[i]
    if current:
        batches.append(current)
    return batches


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
        """Unpooled states ``{layer: (tokens, hidden)}`` of ``texts`` run as one packed row."""
        ids = torch.tensor([[t for text in texts for t in text]], dtype=torch.long)
        inputs: dict[str, Any] = {"position_ids": pack.position_ids(), "legend_pack": pack}
        if self._token_types:
            inputs["token_type_ids"] = torch.zeros_like(ids)
        with packed_attention(self.model):
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

        root, root_sums, skip = (None, None, 0)
        if self.can_share_prefix:
            root, root_sums, skip = self._root(input_ids, min(map(len, input_ids), default=1) - 1)

        def run(batch: list[int]) -> None:
            texts = [input_ids[i][skip:] for i in batch]
            if self.packing:
                pack = Pack(
                    [len(x) for x in texts], prefix=root, prefix_of=None if root is None else [0] * len(batch)
                )
                states = self.run_pack(texts, pack, root_sums)[0]
            else:
                states = self(*pad(texts, pad_id, padding_side))
            reading.batches.append(([index[i] for i in batch], states))
            if on_batch is not None:
                on_batch(len(batch))

        self._run_batches([len(x) for x in input_ids], run, max_tokens, max_batch_size)

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
        # The beginning all prompts share runs once; each prompt keeps at least one token of its own.
        root, root_sums, skip = self._root([first[i] for i in sharing], min(shared[i] for i in sharing) - 1)

        def run(group: list[int]) -> None:
            batch = [sharing[j] for j in group]
            prefixes = [first[i][skip : shared[i]] for i in batch]
            suffixes = [first[i][shared[i] :] for i in batch] + [second[i][shared[i] :] for i in batch]
            of_root = None if root is None else [0] * len(batch)
            prefix = Pack([len(p) for p in prefixes], keep=True, prefix=root, prefix_of=of_root)
            prefix_sums = self.run_pack(prefixes, prefix, root_sums)[1]
            continuation = Pack([len(s) for s in suffixes], prefix=prefix, prefix_of=[*range(len(batch))] * 2)
            states = self.run_pack(suffixes, continuation, prefix_sums)[0]
            reading.batches.append(([at_first[i] for i in batch] + [at_second[i] for i in batch], states))
            if on_batch is not None:
                on_batch(2 * len(batch))

        # Tokens each pair computes: its prompt once, both continuations.
        cost = [len(first[i]) + len(second[i]) - shared[i] - skip for i in sharing]
        self._run_batches(cost, run, max_tokens, max_batch_size)

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
        group = pack_batches if self.packing else length_batches
        pending = group(costs, max_tokens=max_tokens, max_batch_size=max_batch_size)
        while pending:
            batch = pending.pop(0)
            try:
                run(batch)
                continue
            except torch.OutOfMemoryError as error:
                if len(batch) == 1:
                    raise torch.OutOfMemoryError(
                        f"out of memory on a single text or pair ({costs[batch[0]]} tokens): lower "
                        f"max_length, use a smaller dtype or a device with more memory ({error})"
                    ) from error
            # Outside the handler, whose traceback still holds the failed batch's tensors.
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            size = sum(costs[i] for i in batch) if self.packing else len(batch) * max(costs[i] for i in batch)
            max_tokens = max(1, size // 2)
            logger.warning(
                "out of memory on a batch of %d (%d tokens): retrying with max_tokens_per_batch=%d "
                "(pass that to avoid the retries)",
                len(batch),
                size,
                max_tokens,
            )
            left = batch + [i for b in pending for i in b]
            regrouped = group([costs[i] for i in left], max_tokens=max_tokens, max_batch_size=max_batch_size)
            pending = [[left[j] for j in b] for b in regrouped]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class TextReader:
    """Format, tokenise and read (prompt messages, response) pairs at ``layers``: pooled fp32 states.

    On a GPU the texts are formatted and tokenised a chunk at a time while the GPU runs the chunk before
    (nothing waits for the device until every chunk is queued).
    """

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
        self.layer_reader = LayerReader(model, layers, pooling, packing=runtime.packing)
        self.max_length = max_length or runtime.max_length or context_length(model, tokenizer)
        on_gpu = self.layer_reader.device.type == "cuda"
        self.max_tokens_per_batch = runtime.max_tokens_per_batch or (GPU_TOKENS if on_gpu else CPU_TOKENS)
        self.max_batch_size = runtime.max_batch_size
        share = True if runtime.share_prompt is None else runtime.share_prompt
        self.share_prompt = share and self.layer_reader.can_share_prefix
        self.chunk = GPU_CHUNK if on_gpu else None
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

    def _chunks(self, n: int) -> list[range]:
        step = self.chunk or max(n, 1)
        return [range(i, min(i + step, n)) for i in range(0, n, step)]

    def read(self, conversations: Sequence[Conversation]) -> tuple[dict[int, torch.Tensor], list[bool]]:
        """Pooled fp32 states ``{layer: (n, hidden)}`` in input order, and a truncated flag per text."""
        reader = self.layer_reader
        reading = reader.reading(len(conversations))
        truncated: list[bool] = []
        with self._bar(len(conversations)) as bar:
            for part in self._chunks(len(conversations)):
                encoded = self._encode([conversations[i] for i in part])
                truncated += encoded.truncated
                reader.start_read(
                    encoded.input_ids,
                    reading,
                    list(part),
                    self.pad_id,
                    getattr(self.tokenizer, "padding_side", "right") or "right",
                    self.max_tokens_per_batch,
                    self.max_batch_size,
                    bar.update,
                )
            return reading.result(), truncated

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
        if len(first) != len(second):
            raise ValueError(
                f"read_pairs needs as many first as second texts ({len(first)} != {len(second)})"
            )
        n = len(first)
        reader = self.layer_reader
        reading = reader.reading(2 * n)
        flags_first: list[bool] = []
        flags_second: list[bool] = []
        with self._bar(2 * n) as bar:
            for part in self._chunks(n):
                a = self._encode([first[i] for i in part])
                b = self._encode([second[i] for i in part])
                flags_first += a.truncated
                flags_second += b.truncated
                reader.start_read_pairs(
                    a.input_ids,
                    b.input_ids,
                    reading,
                    (list(part), [n + i for i in part]),
                    self.pad_id,
                    self.max_tokens_per_batch,
                    self.max_batch_size,
                    bar.update,
                )
            return reading.result(), flags_first + flags_second
