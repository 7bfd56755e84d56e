"""Margins for preference datasets: `MarginAnnotator` (a `Dataset.map` function) and `annotate_margins`.

``margin = chosen_safety - rejected_safety``, each the projection of the pooled hidden state of
prompt + response on the direction's unit vector: positive means chosen is the safer response.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .direction import SafetyDirection
from .formatting import Conversation, InputError, TextTemplate, to_conversation
from .hidden_states import TextReader, load_model, resolve_device

logger = logging.getLogger(__name__)

COLUMN_TYPES = {
    "margin": "float64",
    "chosen_safety": "float64",
    "rejected_safety": "float64",
    "truncated": "bool",
    "margin_raw": "float64",
    "margin_level": "int64",
}
_IMPORT_PID = os.getpid()  # differs from os.getpid() only in a forked child of the importing process


class MarginAnnotator:
    """A batched ``Dataset.map`` function adding ``margin``, ``chosen_safety``, ``rejected_safety`` and
    ``truncated`` columns.

    With ``model=None`` the model the direction records is loaded. The annotator pickles (and hashes,
    for the ``datasets`` cache) as the direction plus options and the model id, never the weights, so
    two annotators built the same way share a fingerprint and ``num_proc`` workers reload the model.
    Works with ``with_indices=True`` (errors then name dataset rows) and ``with_rank=True`` (worker
    ``rank`` uses ``cuda:{rank % n_gpus}`` when GPUs exist, else the CPU).

    ``scale`` multiplies margins (``margin_raw`` keeps the projection difference); ``bin_edges`` maps
    the scaled margin to a level (``margin_level``; ``margin`` becomes ``levels[level]``).
    Speed: the forward pass stops at the direction's layer; decoders can run the prompt shared by chosen
    and rejected once and continue both from its KV cache (``share_prompt``; default on a CPU only: it
    measured slower on a GPU); texts are batched in length order by ``max_tokens_per_batch`` padded
    tokens, halved on out-of-memory (``batch_size`` caps rows; default 1 on a CPU, where padded batches
    measured ~2x slower); ``dtype="bfloat16"`` runs the model in bf16 (pooling and projection stay
    fp32/fp64). On a GPU give ``Dataset.map`` large batches (its default 1000): batching is per call.
    Empty responses are valid: the text is then prompt plus template, never NaN. The model loads at
    construction (so a mismatched direction fails before any compute) unless ``lazy=True``.
    """

    def __init__(
        self,
        direction: SafetyDirection,
        model: str | os.PathLike[str] | nn.Module | None = None,
        tokenizer: Any = None,
        *,
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        scale: float | None = None,
        bin_edges: Sequence[float] | None = None,
        levels: Sequence[float] | None = None,
        max_length: int | None = None,
        max_tokens_per_batch: int = 8192,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        revision: str | None = None,
        check_model_id: bool = True,
        trust_remote_code: bool = False,
        share_prompt: bool | None = None,
        batch_size: int | None = None,
        lazy: bool = False,
    ) -> None:
        self.direction = direction
        self.prompt_column, self.chosen_column, self.rejected_column = (
            prompt_column,
            chosen_column,
            rejected_column,
        )
        self.scale = scale
        self.bin_edges = list(bin_edges) if bin_edges is not None else None
        self.levels: list[float] | None = None
        if self.bin_edges is not None:
            if sorted(self.bin_edges) != self.bin_edges:
                raise ValueError(f"bin_edges must be increasing, got {self.bin_edges}")
            self.levels = [
                float(x) for x in (levels if levels is not None else range(len(self.bin_edges) + 1))
            ]
            if len(self.levels) != len(self.bin_edges) + 1:
                raise ValueError(
                    f"{len(self.bin_edges)} bin edges need {len(self.bin_edges) + 1} levels, "
                    f"got {len(self.levels)}"
                )
        self.max_length = max_length or direction.max_length
        self.max_tokens_per_batch = max_tokens_per_batch
        self.share_prompt = share_prompt
        self.batch_size = batch_size
        self.device = str(device) if device is not None else None
        self.dtype = str(dtype).removeprefix("torch.") if dtype is not None else None
        self.trust_remote_code = trust_remote_code
        self.check_model_id = check_model_id
        if model is None:
            model, revision = direction.model_id, revision or direction.model_revision
        self.model_ref: Any = model if isinstance(model, nn.Module) else str(model)
        self.revision = revision
        self.tokenizer_ref = tokenizer
        self._reader: TextReader | None = None
        self._warned_truncation = False
        if not lazy:
            self._load(self.device)

    # `datasets` hashes the pickled state for its cache fingerprint, and num_proc workers unpickle it.
    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_reader", "_warned_truncation")}
        model = self.model_ref
        name = (
            getattr(getattr(model, "config", None), "_name_or_path", "")
            if isinstance(model, nn.Module)
            else ""
        )
        if name:  # reloadable by name: keep identity, not weights
            state["model_ref"] = str(name)
            state["model_dtype"] = str(next(model.parameters()).dtype)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        dtype = state.pop("model_dtype", None)
        self.__dict__.update(state)
        if dtype is not None and self.dtype is None:
            self.dtype = dtype.removeprefix("torch.")
        self._reader = None
        self._warned_truncation = False

    def _load(self, device: str | None) -> TextReader:
        model, tokenizer = load_model(
            self.model_ref,
            self.tokenizer_ref,
            revision=self.revision,
            dtype=self.dtype,
            device=device,
            trust_remote_code=self.trust_remote_code,
        )
        self.direction.check_model(model, check_model_id=self.check_model_id)
        self._reader = TextReader(
            model,
            tokenizer,
            layers=[self.direction.layer],
            pooling=self.direction.pooling,
            template=TextTemplate.resolve(self.direction.template, tokenizer),
            max_length=self.max_length,
            max_tokens_per_batch=self.max_tokens_per_batch,
            batch_size=self.batch_size,
            share_prompt=self.share_prompt,
        )
        return self._reader

    def _reader_for(self, rank: int | None) -> TextReader:
        if self._reader is not None:
            return self._reader
        if os.getpid() != _IMPORT_PID and torch.get_num_threads() > 1:
            # A forked worker inherits the parent's OpenMP pool, which can deadlock: use one thread.
            torch.set_num_threads(1)
        device = self.device
        if rank is not None and torch.cuda.is_available():
            device = f"cuda:{rank % torch.cuda.device_count()}"
        return self._load(device or str(resolve_device(None)))

    def safety(
        self,
        conversations: Sequence[Conversation],
        *,
        paired_with: Sequence[Conversation] | None = None,
        rank: int | None = None,
    ) -> tuple[torch.Tensor, list[bool]]:
        """Safety scores (fp64 projections on the unit direction) of (prompt messages, response) pairs,
        and which texts were truncated (warned about once per annotator).

        With ``paired_with`` (the other response to each prompt) the scores of ``conversations +
        paired_with`` come back, and decoders run each shared prompt once.
        """
        reader = self._reader_for(rank)
        if paired_with is None:
            states, truncated = reader.read(conversations)
        else:
            states, truncated = reader.read_pairs(conversations, paired_with)
        if any(truncated) and not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                "%d of %d texts exceed %d tokens: their prompts lost tokens from the start (the response end "
                "is kept); see the 'truncated' column",
                sum(truncated),
                len(truncated),
                reader.max_length,
            )
        return states[self.direction.layer].double() @ self.direction.unit.double(), truncated

    @property
    def new_columns(self) -> list[str]:
        columns = ["margin", "chosen_safety", "rejected_safety", "truncated"]
        if self.scale is not None or self.bin_edges is not None:
            columns.append("margin_raw")
        if self.bin_edges is not None:
            columns.append("margin_level")
        return columns

    def features(self) -> dict[str, str]:
        """Arrow value types of the new columns (for ``Dataset.map(features=...)``)."""
        return {c: COLUMN_TYPES[c] for c in self.new_columns}

    def __call__(self, batch: dict[str, list[Any]], *extra: Any) -> dict[str, list[Any]]:
        indices, rank = _indices_and_rank(extra)
        for column in (self.chosen_column, self.rejected_column):
            if column not in batch:
                raise KeyError(
                    f"column {column!r} not found; the dataset has {sorted(batch)} "
                    f"(set chosen_column=/rejected_column=)"
                )
        chosen, rejected = batch[self.chosen_column], batch[self.rejected_column]
        if isinstance(chosen, str):
            raise TypeError(
                "MarginAnnotator is a batched map function: use dataset.map(annotator, batched=True)"
            )
        n = len(chosen)
        prompts = batch.get(self.prompt_column, [None] * n)
        has_prompt = self.prompt_column in batch
        rows: list[int | str] = (
            list(indices) if indices is not None else [f"{i} of this batch" for i in range(n)]
        )
        conversations: dict[str, list[Conversation]] = {self.chosen_column: [], self.rejected_column: []}
        for side, responses in ((self.chosen_column, chosen), (self.rejected_column, rejected)):
            for i in range(n):
                if has_prompt and prompts[i] is None:
                    raise InputError(
                        f"column {self.prompt_column!r}, row {rows[i]}: expected text or messages, got None"
                    )
                conversations[side].append(
                    to_conversation(
                        prompts[i],
                        responses[i],
                        prompt_column=self.prompt_column,
                        response_column=side,
                        row=rows[i],
                    )
                )
        if n == 0:
            return {c: [] for c in self.new_columns}
        projections, truncated = self.safety(
            conversations[self.chosen_column], paired_with=conversations[self.rejected_column], rank=rank
        )
        chosen_safety, rejected_safety = projections[:n], projections[n:]
        raw = chosen_safety - rejected_safety
        flags = [a or b for a, b in zip(truncated[:n], truncated[n:], strict=True)]
        out: dict[str, list[Any]] = {
            "margin": raw.tolist(),
            "chosen_safety": chosen_safety.tolist(),
            "rejected_safety": rejected_safety.tolist(),
            "truncated": flags,
        }
        if self.scale is not None or self.bin_edges is not None:
            out["margin_raw"] = out["margin"]
            out.update(rescale(out["margin_raw"], self.scale, self.bin_edges, self.levels))
        return out


def rescale(
    raw: Sequence[float],
    scale: float | None,
    bin_edges: Sequence[float] | None,
    levels: Sequence[float] | None,
) -> dict[str, list[Any]]:
    """``margin`` (scaled, or the level of its bin) and, with bins, ``margin_level``."""
    scaled = torch.tensor(list(raw), dtype=torch.float64) * (1.0 if scale is None else scale)
    if bin_edges is None or levels is None:
        return {"margin": scaled.tolist()}
    index = torch.bucketize(scaled, torch.tensor(list(bin_edges), dtype=torch.float64), right=True)
    return {"margin": [float(levels[i]) for i in index.tolist()], "margin_level": index.tolist()}


def _indices_and_rank(extra: tuple[Any, ...]) -> tuple[Sequence[int] | None, int | None]:
    """`datasets` passes ``indices`` (with_indices) then ``rank`` (with_rank) positionally."""
    indices: Sequence[int] | None = None
    rank: int | None = None
    for value in extra:
        if isinstance(value, (list, range)):
            indices = value
        elif isinstance(value, int) or value is None:
            rank = value
    return indices, rank


def annotate_margins(
    dataset: Any,
    direction: SafetyDirection,
    *,
    model: str | os.PathLike[str] | nn.Module | None = None,
    tokenizer: Any = None,
    scale: str | float | None = None,
    bins: int | None = None,
    levels: Sequence[float] | None = None,
    batch_size: int = 1000,
    num_proc: int | None = None,
    load_from_cache_file: bool | None = None,
    **options: Any,
) -> Any:
    """Annotate a ``Dataset`` (or ``IterableDataset``) with margins; returns the dataset with new columns.

    Args:
        scale, bins, levels: dataset-wide post-processing, see :func:`scale_margins`.
        batch_size: rows per ``map`` call (``datasets``' default); the annotator sorts and batches within
            each call, so small values cost speed on a GPU.
        num_proc: worker processes (``with_rank``: one model each, on ``cuda:{rank % n_gpus}`` with GPUs).
        options: passed to :class:`MarginAnnotator` (column names, ``max_length``, ``device``, ``dtype``...).
    """
    from datasets import Dataset, Features, Value

    if not isinstance(dataset, Dataset):
        if scale == "standardize" or bins is not None:
            raise ValueError(
                "scale='standardize' and bins need the whole dataset: with an IterableDataset pass "
                "MarginAnnotator(scale=<factor>, bin_edges=[...]) fitted on a sample instead"
            )
        streaming = MarginAnnotator(
            direction, model, tokenizer, scale=None if scale is None else float(scale), **options
        )
        features = None
        if dataset.features is not None:
            features = Features(
                {**dataset.features, **{c: Value(t) for c, t in streaming.features().items()}}
            )
        return dataset.map(
            streaming, batched=True, batch_size=batch_size, with_indices=True, features=features
        )
    annotator = MarginAnnotator(direction, model, tokenizer, **options)
    features = Features({**dataset.features, **{c: Value(t) for c, t in annotator.features().items()}})
    if len(dataset) == 0:  # `map` skips the function on no rows, and with it the new columns
        annotated = Dataset.from_dict({c: [] for c in features}, features=features)
    else:
        map_kwargs: dict[str, Any] = dict(
            batched=True,
            batch_size=batch_size,
            with_indices=True,
            features=features,
            load_from_cache_file=load_from_cache_file,
            desc="legend-hf margins",
        )
        if num_proc and num_proc > 1:
            map_kwargs.update(num_proc=num_proc, with_rank=True)
        annotated = dataset.map(annotator, **map_kwargs)
    return scale_margins(
        annotated, direction, scale=scale, bins=bins, levels=levels, load_from_cache_file=load_from_cache_file
    )


def scale_margins(
    annotated: Any,
    direction: SafetyDirection,
    *,
    scale: str | float | None = None,
    bins: int | None = None,
    levels: Sequence[float] | None = None,
    load_from_cache_file: bool | None = None,
) -> Any:
    """Dataset-wide post-processing of annotated margins; records the settings in ``info.description``.

    Args:
        scale: ``None`` (raw projections), ``"standardize"`` (divide by the margins' standard deviation,
            which keeps signs) or a fixed factor. ``margin_raw`` keeps the projection difference.
        bins: equal-frequency bins over the scaled margins; ``margin`` becomes the bin's level (``levels``,
            default ``0..bins-1``) and ``margin_level`` the bin index. The paper bins margins for robustness.
    """
    from datasets import Features, Value

    settings: dict[str, Any] = {
        "direction": direction.source or direction.model_id,
        "direction_revision": direction.source_revision,
        "direction_fingerprint": direction.fingerprint(),
        "scale": scale,
        "bins": bins,
    }
    if scale is not None or bins is not None:
        raw = torch.tensor(
            annotated["margin_raw" if "margin_raw" in annotated.column_names else "margin"],
            dtype=torch.float64,
        )
        if scale == "standardize":
            std = float(raw.std()) if len(raw) > 1 else 0.0
            factor = 1.0 / std if std > 0 else 1.0
        else:
            factor = 1.0 if scale is None else float(scale)
        edges = None
        if bins is not None:
            if bins < 2:
                raise ValueError(f"bins must be at least 2, got {bins}")
            quantiles = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
            edges = torch.quantile(raw * factor, quantiles).tolist() if len(raw) else [0.0] * (bins - 1)
            levels = list(levels) if levels is not None else list(range(bins))
            if len(levels) != bins:
                raise ValueError(f"{bins} bins need {bins} levels, got {len(levels)}")
        settings.update(scale_factor=factor, bin_edges=edges, levels=levels)
        new = ["margin_raw", "margin_level"] if bins is not None else ["margin_raw"]
        features = Features({**annotated.features, **{c: Value(COLUMN_TYPES[c]) for c in new}})
        annotated = annotated.map(
            _Rescale(factor, edges, levels),
            batched=True,
            batch_size=1000,
            features=features,
            desc="legend-hf scaling",
            load_from_cache_file=load_from_cache_file,
        )
    annotated.info.description = json.dumps({"legend_hf": settings})
    return annotated


class _Rescale:
    """Second pass of ``annotate_margins``: apply dataset-wide scale and bins."""

    def __init__(self, factor: float, edges: list[float] | None, levels: Sequence[float] | None) -> None:
        self.factor, self.edges, self.levels = factor, edges, levels

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        raw = batch["margin_raw"] if "margin_raw" in batch else batch["margin"]
        return {"margin_raw": raw, **rescale(raw, self.factor, self.edges, self.levels)}
