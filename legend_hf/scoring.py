"""The one scoring path: a direction on its annotator model scores responses and preference pairs.

A response's **safety score** is the projection (fp64) of the pooled hidden state of *prompt + response*
on the direction's unit vector; a pair's **margin** is ``safety(prompt + chosen) - safety(prompt +
rejected)``, positive when chosen is the safer response. The ``Dataset.map`` function, the ``evaluate``
metric, ``evaluate_direction``, the scale-out engines and the CLI all score through :class:`Scorer`, so
the same inputs give the same numbers everywhere. How raw margins then become the ``margin``
column is :class:`legend_hf.provenance.MarginScale`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .direction import SafetyDirection
from .formatting import Conversation, TextTemplate
from .hub import HubLookupError
from .models import load_model, model_identity, normalize_layer, resolve_device
from .names import public_name
from .options import RuntimeOptions
from .precision import compute_dtypes
from .reader import TextReader

logger = logging.getLogger(__name__)


@dataclass
class PairScores:
    """Safety scores of both sides of ``n`` pairs (fp64) and whether either text of a pair was truncated."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    truncated: list[bool]

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen - self.rejected


@dataclass
class ResponseScores:
    """Safety scores of ``n`` responses (fp64) and which texts were truncated."""

    safety: torch.Tensor
    truncated: list[bool]


class Scorer:
    """Scores with ``direction`` on its annotator model (``model=None``: the one the direction records, at
    its recorded revision), reading ``layers`` (default: the direction's layer) in one forward pass.

    The model loads on first use (or :meth:`load`). A scorer pickles, and hashes for the ``datasets``
    cache, as the direction, the options and the model's id, never the weights.
    """

    def __init__(
        self,
        direction: SafetyDirection,
        model: str | os.PathLike[str] | nn.Module | None = None,
        tokenizer: Any = None,
        *,
        runtime: RuntimeOptions | None = None,
        layers: Sequence[int] | None = None,
        progress: str | None = None,
    ) -> None:
        runtime = runtime or RuntimeOptions()
        if model is None:
            model = direction.model_id
            if runtime.model_revision is None:
                runtime = replace(runtime, model_revision=direction.model_revision)
        self.direction = direction
        self.runtime = runtime
        self.model_ref: Any = model if isinstance(model, nn.Module) else str(model)
        self.tokenizer_ref = tokenizer
        self.layers = sorted(
            {normalize_layer(k, direction.num_layers) for k in (layers or [direction.layer])}
        )
        missing = [k for k in self.layers if k not in direction.vectors]
        if missing:
            raise ValueError(
                f"the direction has no vector at layer(s) {missing}; it holds {sorted(direction.vectors)} "
                "(fit with layer='auto' or a list of layers)"
            )
        self.progress = progress
        self._reader: TextReader | None = None
        self._warned_truncation = False

    @property
    def model_id(self) -> str:
        """The annotator's name for records and cards (a Hub id, or a local folder's name)."""
        ref = self.model_ref
        if isinstance(ref, nn.Module):
            ref = getattr(ref.config, "_name_or_path", "") or self.direction.model_id
        return public_name(ref) or self.direction.model_id

    # `datasets` hashes the pickled state for its cache fingerprint, and num_proc workers unpickle it.
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_reader", "_warned_truncation")}
        model = self.model_ref
        if isinstance(model, nn.Module):
            name = getattr(model.config, "_name_or_path", "")
            if name:  # reloadable by name: keep identity and dtype, not weights
                state["model_ref"] = str(name)
                if self.runtime.dtype is None:
                    dtype = compute_dtypes(model)[0]
                    state["runtime"] = replace(self.runtime, dtype=dtype)  # type: ignore[arg-type]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reader = None
        self._warned_truncation = False

    def load(self, rank: int | None = None) -> TextReader:
        """Load the model (once): on ``cuda:{rank % n_gpus}`` for map worker ``rank`` when GPUs exist, where
        ``runtime.device`` is not set; a worker on a CPU uses one thread (several workers share the cores,
        and a forked worker's inherited OpenMP pool can deadlock)."""
        if self._reader is not None:
            return self._reader
        runtime = self.runtime
        if rank is not None and runtime.device is None and torch.cuda.is_available():
            runtime = replace(runtime, device=f"cuda:{rank % torch.cuda.device_count()}")
        if rank is not None and resolve_device(runtime.device).type == "cpu":
            torch.set_num_threads(1)
        try:
            model, tokenizer = load_model(self.model_ref, self.tokenizer_ref, runtime)
        except OSError as e:
            if self.model_ref != self.direction.model_id:
                raise
            raise HubLookupError(
                f"cannot load the direction's annotator model {self.model_ref!r} ({' '.join(str(e).split())}): "
                "pass model= (CLI: --model) a local copy of it"
            ) from e
        self.direction.check_model(model, check_model_id=runtime.check_model_id)
        self._reader = TextReader(
            model,
            tokenizer,
            layers=self.layers,
            pooling=self.direction.pooling,
            template=TextTemplate.resolve(self.direction.template, tokenizer),
            runtime=runtime,
            max_length=runtime.max_length or self.direction.max_length,
            progress=self.progress,
        )
        return self._reader

    def run_fields(self) -> dict[str, Any]:
        """How the model runs, for the provenance record (loads it): ``dtype``, ``residual_dtype``, the
        effective ``max_length`` and the ``model_revision`` (the loaded commit when known)."""
        reader = self.load()
        model = reader.layer_reader.model
        matmul, residual = compute_dtypes(model)
        commit = model_identity(model)[1]
        return {
            "dtype": matmul,
            "residual_dtype": residual,
            "max_length": reader.max_length,
            "model_revision": commit or self.runtime.model_revision,
        }

    def _scores(self, states: dict[int, torch.Tensor], truncated: list[bool]) -> dict[int, torch.Tensor]:
        if any(truncated) and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                "%d of %d texts exceed %d tokens: their prompts lost tokens from the start (the response end "
                "is kept); see the 'truncated' column",
                sum(truncated),
                len(truncated),
                self.load().max_length,
            )
        return {k: self.direction.project(states[k], k) for k in self.layers}

    def pair_scores(
        self, chosen: Sequence[Conversation], rejected: Sequence[Conversation], *, rank: int | None = None
    ) -> dict[int, PairScores]:
        """:class:`PairScores` at every layer of the scorer; decoders run each shared prompt once."""
        if len(chosen) != len(rejected):
            raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected responses")
        n = len(chosen)
        if n == 0:
            empty = torch.zeros(0, dtype=torch.float64)
            return {k: PairScores(empty, empty, []) for k in self.layers}
        states, truncated = self.load(rank).read_pairs(chosen, rejected)
        flags = [a or b for a, b in zip(truncated[:n], truncated[n:], strict=True)]
        return {k: PairScores(s[:n], s[n:], flags) for k, s in self._scores(states, truncated).items()}

    def score_pairs(
        self, chosen: Sequence[Conversation], rejected: Sequence[Conversation], *, rank: int | None = None
    ) -> PairScores:
        """:class:`PairScores` at the direction's layer."""
        return self.pair_scores(chosen, rejected, rank=rank)[self.direction.layer]

    def score_responses(
        self, conversations: Sequence[Conversation], *, rank: int | None = None
    ) -> ResponseScores:
        """:class:`ResponseScores` of single (prompt messages, response) texts at the direction's layer."""
        if not conversations:
            return ResponseScores(torch.zeros(0, dtype=torch.float64), [])
        states, truncated = self.load(rank).read(conversations)
        return ResponseScores(self._scores(states, truncated)[self.direction.layer], truncated)
