"""Margins for preference datasets: `MarginAnnotator` (a ``Dataset.map`` function), `annotate_margins` and
`scale_margins`, thin over :class:`legend_hf.scoring.Scorer`.

``margin = chosen_safety - rejected_safety``: positive means chosen is the safer response.
`annotate_margins` and `scale_margins` record how the margins were made in the dataset's schema
(:mod:`legend_hf.provenance`), where it survives Parquet, the Hub and ``save_to_disk``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

from torch import nn

from .direction import SafetyDirection
from .formatting import pair_conversations, schema_hint
from .options import RuntimeOptions, quiet_progress_bars
from .provenance import AnnotationRecord, MarginScale, annotated_features, read_record
from .scoring import Scorer

BASE_COLUMNS = ["margin", "chosen_safety", "rejected_safety", "truncated"]


def check_columns(
    column_names: Sequence[str],
    columns: tuple[str, str, str] = ("prompt", "chosen", "rejected"),
    new_columns: Sequence[str] = BASE_COLUMNS,
) -> None:
    """Raise when a text column (prompt, chosen, rejected) is missing, saying what the data looks like, or
    when a column the annotation adds is already there. The default prompt column may be absent: the
    responses then hold their prompt (HH-RLHF dialogues, message lists)."""
    prompt, chosen, rejected = columns
    missing = [c for c in (chosen, rejected) if c not in column_names]
    if prompt != "prompt" and prompt not in column_names:
        missing.insert(0, prompt)
    if missing:
        raise KeyError(
            f"column(s) {missing} not found; the dataset has {list(column_names)}: {schema_hint(column_names)}"
        )
    clash = [c for c in new_columns if c in column_names]
    if clash:
        raise ValueError(
            f"the dataset already has column(s) {clash}: it looks annotated already; remove them "
            "(dataset.remove_columns) to annotate again, or use scale_margins to rescale"
        )


class MarginAnnotator:
    """A batched ``Dataset.map`` function adding ``margin``, ``chosen_safety``, ``rejected_safety`` and
    ``truncated`` columns (and ``margin_raw``/``margin_level`` with a ``scale``).

    With ``model=None`` the model the direction records is loaded. The annotator pickles (and hashes,
    for the ``datasets`` cache) as the direction, the options and the model id, never the weights, so two
    annotators built the same way share a fingerprint and ``num_proc`` workers reload the model. Use
    ``with_indices=True`` (errors then name dataset rows) and ``with_rank=True`` (worker ``rank`` runs on
    ``cuda:{rank % n_gpus}`` when GPUs exist, else on one CPU thread). On a GPU give ``Dataset.map`` large
    batches (its default 1000): the annotator sorts and batches by length within each call. The model
    loads at construction, so a mismatched direction fails before any compute, unless ``lazy=True``.

    ``scale`` (a :class:`MarginScale`, or a number) turns the raw margins into ``margin``; dataset-wide
    scaling (standardising, bins) is :func:`scale_margins`' job.
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
        scale: MarginScale | float | None = None,
        bin_edges: Sequence[float] | None = None,
        levels: Sequence[float] | None = None,
        runtime: RuntimeOptions | None = None,
        lazy: bool = False,
    ) -> None:
        self.scorer = Scorer(direction, model, tokenizer, runtime=runtime)
        self.columns = (prompt_column, chosen_column, rejected_column)
        if not isinstance(scale, MarginScale):
            scale = MarginScale(
                1.0 if scale is None else float(scale),
                bin_edges=None if bin_edges is None else tuple(bin_edges),
                levels=None if levels is None else tuple(levels),
            )
        self.scale = scale
        if not lazy:
            self.scorer.load()

    @property
    def direction(self) -> SafetyDirection:
        return self.scorer.direction

    @property
    def new_columns(self) -> list[str]:
        return BASE_COLUMNS + self.scale.new_columns

    def record(self, run: dict[str, Any] | None = None) -> AnnotationRecord:
        """The provenance record of this annotator's margins; ``run`` (default: :meth:`Scorer.run_fields`,
        which loads the model) says how the model ran."""
        return self.direction.record(
            model_id=None if self.scorer.model_id == self.direction.model_id else self.scorer.model_id,
            **self.scale.record_fields(),
            **(run if run is not None else self.scorer.run_fields()),
        )

    def features(self, features: Any, run: dict[str, Any] | None = None) -> Any:
        """``features`` plus the new columns, with the provenance record (for ``Dataset.map(features=...)``)."""
        return annotated_features(features, self.new_columns, self.record(run))

    def check_columns(self, column_names: Sequence[str]) -> None:
        """Raise, before any compute, when a text column is missing or a new column already exists."""
        check_columns(column_names, self.columns, self.new_columns)

    def __call__(
        self, batch: dict[str, list[Any]], indices: list[int] | int | None = None, rank: int | None = None
    ) -> dict[str, list[Any]]:
        """Annotate one batch. ``datasets`` passes ``(batch, indices, rank)`` with ``with_indices`` and
        ``with_rank``, and ``(batch, rank)`` with ``with_rank`` alone."""
        if isinstance(indices, int):  # with_rank without with_indices
            indices, rank = None, indices
        prompt, chosen, rejected = self.columns
        self.check_columns(list(batch))
        if isinstance(batch[chosen], str):
            raise TypeError(
                "MarginAnnotator is a batched map function: use dataset.map(annotator, batched=True)"
            )
        chosen_c, rejected_c = pair_conversations(
            batch.get(prompt), batch[chosen], batch[rejected], columns=self.columns, rows=indices
        )
        scores = self.scorer.score_pairs(chosen_c, rejected_c, rank=rank)
        raw = scores.margin.tolist()
        out: dict[str, list[Any]] = {
            "margin": raw,
            "chosen_safety": scores.chosen.tolist(),
            "rejected_safety": scores.rejected.tolist(),
            "truncated": scores.truncated,
        }
        if self.scale.new_columns:
            out.update(margin_raw=raw, **self.scale.apply(raw))
        return out


def annotate_margins(
    dataset: Any,
    direction: SafetyDirection,
    *,
    model: str | os.PathLike[str] | nn.Module | None = None,
    tokenizer: Any = None,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    scale: str | float | None = None,
    target_std: float = 1.0,
    clip: tuple[float | None, float | None] | None = None,
    bins: int | None = None,
    levels: Sequence[float] | None = None,
    runtime: RuntimeOptions | None = None,
    batch_size: int = 1000,
    num_proc: int | None = None,
    load_from_cache_file: bool | None = None,
) -> Any:
    """Annotate a ``Dataset`` (or ``IterableDataset``) with margins and record how (see :mod:`provenance`).

    Args:
        scale, target_std, clip, bins, levels: dataset-wide post-processing, see :func:`scale_margins`.
        runtime: how the model runs (device, dtype, max_length, batching...).
        batch_size: rows per ``map`` call (``datasets``' default); the annotator sorts and batches within
            each call, so small values cost speed on a GPU.
        num_proc: worker processes (``with_rank``: one model each, on ``cuda:{rank % n_gpus}`` with GPUs).
    """
    from datasets import Dataset

    runtime = runtime or RuntimeOptions()
    MarginScale.check(
        scale=scale, target_std=target_std, clip=clip, bins=bins, levels=levels
    )  # before the work
    columns: dict[str, Any] = dict(
        prompt_column=prompt_column, chosen_column=chosen_column, rejected_column=rejected_column
    )
    if not isinstance(dataset, Dataset):
        if scale == "standardize" or bins is not None:
            raise ValueError(
                "scale='standardize' and bins need the whole dataset: with an IterableDataset pass "
                "MarginAnnotator(scale=MarginScale(...)) fitted on a sample instead"
            )
        fixed = MarginScale(1.0 if scale is None else float(scale), clip)
        annotator = MarginAnnotator(
            direction, model, tokenizer, scale=fixed, runtime=runtime, lazy=True, **columns
        )
        if dataset.features is not None:
            annotator.check_columns(list(dataset.features))
        features = None if dataset.features is None else annotator.features(dataset.features)
        return dataset.map(
            annotator, batched=True, batch_size=batch_size, with_indices=True, features=features
        )
    annotator = MarginAnnotator(direction, model, tokenizer, runtime=runtime, **columns)
    annotator.check_columns(dataset.column_names)
    map_kwargs: dict[str, Any] = dict(
        batch_size=batch_size,
        with_indices=True,
        load_from_cache_file=load_from_cache_file,
        desc="legend-hf margins",
    )
    if num_proc and num_proc > 1:
        map_kwargs.update(num_proc=num_proc, with_rank=True)
    with nullcontext() if runtime.progress else quiet_progress_bars():
        annotated = _map(dataset, annotator, annotator.features(dataset.features), **map_kwargs)
    if scale is None and clip is None and bins is None:
        return annotated
    return scale_margins(
        annotated,
        scale=scale,
        target_std=target_std,
        clip=clip,
        bins=bins,
        levels=levels,
        load_from_cache_file=load_from_cache_file,
    )


def scale_margins(
    annotated: Any,
    direction: SafetyDirection | None = None,
    *,
    scale: str | float | None = None,
    target_std: float = 1.0,
    clip: tuple[float | None, float | None] | None = None,
    bins: int | None = None,
    levels: Sequence[float] | None = None,
    load_from_cache_file: bool | None = None,
) -> Any:
    """Dataset-wide post-processing of annotated margins, recorded in the dataset's provenance record.

    ``margin_raw`` keeps the projection difference; ``margin`` becomes:

    - ``scale``: ``None`` (raw), ``"standardize"`` (divided by the raw margins' standard deviation, times
      ``target_std``: the reward-logit gap one standard deviation asks for; signs kept) or a fixed factor;
    - ``clip``: ``(low, high)`` bounds on the scaled margin (``(0, None)``: never relax a pair);
    - ``bins``: the bin level (``levels``, default ``0..bins-1``; ``margin_level`` is the index): level 0
      for scaled margins ≤ 0, levels 1..bins-1 for equal-frequency bins of the positive ones (see
      :class:`~legend_hf.scoring.MarginScale`). The paper bins margins for robustness.

    The dataset's record says which direction made the margins; a dataset annotated by a plain
    ``Dataset.map(MarginAnnotator(...))`` has none, and then needs ``direction``. Re-scaling starts from
    ``margin_raw``, so it never scales twice.
    """
    record = read_record(annotated)
    if record is None:
        if direction is None:
            raise ValueError(
                "the dataset has no legend-hf record of its direction: pass the direction that annotated it"
            )
        record = direction.record()
    elif direction is not None and direction.fingerprint() != record.direction_fingerprint:
        raise ValueError(
            f"the dataset was annotated with direction {record.direction!r} (fingerprint "
            f"{record.direction_fingerprint}), not with this one ({direction.fingerprint()})"
        )
    column = "margin_raw" if "margin_raw" in annotated.column_names else "margin"
    fitted = MarginScale.fit(
        annotated[column], scale=scale, target_std=target_std, clip=clip, bins=bins, levels=levels
    )
    record = record.with_scale(fitted, target_std if scale == "standardize" else None)
    new = ["margin_raw", *(["margin_level"] if bins is not None else [])]
    features = annotated_features(annotated.features, new, record)
    if "margin_level" in annotated.features and bins is None:
        annotated = annotated.remove_columns("margin_level")
        del features["margin_level"]
    with quiet_progress_bars():  # one fast pass: no bar
        return _map(annotated, _Rescale(fitted, column), features, load_from_cache_file=load_from_cache_file)


def _map(dataset: Any, function: Any, features: Any, **kwargs: Any) -> Any:
    """``dataset.map(function, batched=True, features=features)``; an empty dataset gets the new (empty) columns,
    which ``map`` alone leaves out (it never calls the function on no rows)."""
    if len(dataset) == 0:
        from datasets import Dataset

        return Dataset.from_dict({c: [] for c in features}, features=features)
    return dataset.map(function, batched=True, features=features, **kwargs)


class _Rescale:
    """The second pass of :func:`scale_margins`: apply a fitted :class:`MarginScale` to every batch."""

    def __init__(self, scale: MarginScale, column: str) -> None:
        self.scale, self.column = scale, column

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        raw = batch[self.column]
        return {"margin_raw": raw, **self.scale.apply(raw)}
