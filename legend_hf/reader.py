"""Reading (prompt, response) pairs: format with the template, tokenise once, read pooled states.

:class:`TextReader` is what fitting and scoring read through; :class:`legend_hf.hidden_states.LayerReader`
runs the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .formatting import Conversation, TextTemplate
from .hidden_states import LayerReader
from .models import context_length
from .options import RuntimeOptions

# Default token budgets of a packed row: on 2 CPU cores bf16 matmuls reach ~90% of their best speed at 2048
# tokens (bench/README.md); GPUs want rows large enough to fill them. A GPU reads texts in chunks of pairs.
CPU_TOKENS = 2048
GPU_TOKENS = 16384
GPU_CHUNK = 256


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
