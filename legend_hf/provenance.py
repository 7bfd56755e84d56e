"""`AnnotationRecord`: how a dataset's margins were made, in one typed record with one writer and one reader.

The record travels inside the dataset's schema, as the ``id`` of the ``margin`` column's ``Value``
feature (a JSON string). `datasets` keeps features through ``map``/``filter``/``select``, writes them to
the Parquet schema metadata (``to_parquet``, ``push_to_hub``), to the Hub card's ``dataset_info`` and
to ``save_to_disk``, and reads them back in ``load_dataset``/``load_from_disk``: so the record survives
every way people save and share data. Formats without a schema (JSON Lines) lose it; the dataset card
written next to them carries it too, in its YAML under ``legend_hf``, and :func:`read_record` falls back
to that card. (`Dataset.info.description`, used before, is dropped by Parquet and the Hub.)
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

RECORD_KEY = "legend_hf"
GENERATION_KEY = "legend_hf_generation"
MARGIN = "margin"
# The columns an annotation adds, and their Arrow value types.
COLUMN_TYPES = {
    "margin": "float64",
    "chosen_safety": "float64",
    "rejected_safety": "float64",
    "truncated": "bool",
    "margin_raw": "float64",
    "margin_level": "int64",
}


@dataclass(frozen=True)
class MarginScale:
    """How raw margins become the ``margin`` column: multiplied by ``factor``, bounded by ``clip`` (low,
    high; either may be ``None``), then with ``bin_edges`` replaced by the level of their bin.

    Bins keep the sign: the first edge is 0, so level 0 holds every pair the direction does not find
    chosen safer (scaled margin ≤ 0), and levels 1..k-1 split the positive margins into equal-frequency
    bins (higher: chosen clearly safer). TRL's ``RewardTrainer`` reads the level as the reward gap to ask
    for, so a pair is never asked to favour a response the direction finds less safe.
    """

    factor: float = 1.0
    clip: tuple[float | None, float | None] | None = None
    bin_edges: tuple[float, ...] | None = None
    levels: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.bin_edges is not None:
            edges = [float(e) for e in self.bin_edges]
            if edges != sorted(edges):
                raise ValueError(f"bin_edges must be increasing, got {edges}")
            levels = self.levels if self.levels is not None else range(len(edges) + 1)
            if len(levels) != len(edges) + 1:
                raise ValueError(f"{len(edges)} bin edges need {len(edges) + 1} levels, got {len(levels)}")
            object.__setattr__(self, "bin_edges", tuple(edges))
            object.__setattr__(self, "levels", tuple(float(x) for x in levels))
        elif self.levels is not None:
            raise ValueError("levels need bin_edges (or bins)")

    @property
    def new_columns(self) -> list[str]:
        """``margin_raw`` (the projection difference) when margins are changed, ``margin_level`` with bins."""
        changed = self.factor != 1.0 or self.clip is not None or self.bin_edges is not None
        return (["margin_raw"] if changed else []) + (["margin_level"] if self.bin_edges is not None else [])

    def apply(self, raw: Sequence[float] | np.ndarray) -> dict[str, list[Any]]:
        """``margin`` (and ``margin_level``) of raw margins."""
        scaled = np.asarray(raw, dtype=np.float64) * self.factor
        if self.clip is not None:
            scaled = np.clip(scaled, self.clip[0], self.clip[1])
        if self.bin_edges is None or self.levels is None:
            return {"margin": scaled.tolist()}
        index = np.searchsorted(np.asarray(self.bin_edges), scaled, side="left").tolist()
        return {"margin": [self.levels[i] for i in index], "margin_level": index}

    @classmethod
    def fit(
        cls,
        raw: Sequence[float],
        *,
        scale: str | float | None = None,
        target_std: float = 1.0,
        clip: tuple[float | None, float | None] | None = None,
        bins: int | None = None,
        levels: Sequence[float] | None = None,
    ) -> MarginScale:
        """The scale of a whole dataset's raw margins: ``scale="standardize"`` divides by their standard
        deviation and multiplies by ``target_std`` (signs kept), a number multiplies; ``bins`` places the
        edges (0 and equal-frequency quantiles of the positive scaled margins)."""
        cls.check(scale=scale, target_std=target_std, clip=clip, bins=bins, levels=levels)
        values = np.asarray(raw, dtype=np.float64)
        if scale == "standardize":
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            factor = target_std / std if std > 0 else 1.0
        else:
            factor = 1.0 if scale is None else float(scale)
        edges = None
        if bins is not None:
            scaled = np.asarray(cls(factor, clip).apply(values)["margin"])
            positive = scaled[scaled > 0]
            quantiles = np.arange(1, bins - 1) / (bins - 1)
            inner = np.quantile(positive, quantiles).tolist() if len(positive) else [0.0] * (bins - 2)
            edges = (0.0, *inner)
        return cls(factor, clip, edges, None if levels is None else tuple(levels))

    @staticmethod
    def check(
        *,
        scale: str | float | None = None,
        target_std: float = 1.0,
        clip: tuple[float | None, float | None] | None = None,
        bins: int | None = None,
        levels: Sequence[float] | None = None,
    ) -> None:
        """Raise ``ValueError`` for settings :meth:`fit` cannot use (checked before any margin is computed)."""
        if scale not in (None, "standardize") and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0
        ):
            raise ValueError(
                f"scale must be None, 'standardize' or a positive number (a factor keeps signs), got {scale!r}"
            )
        if not target_std > 0:
            raise ValueError(f"target_std must be positive, got {target_std!r}")
        low, high = clip if clip is not None and len(clip) == 2 else (None, None)
        if clip is not None and (len(clip) != 2 or low is not None and high is not None and low > high):
            raise ValueError(f"clip must be (low, high) with low <= high (either may be None), got {clip!r}")
        if bins is not None and (isinstance(bins, bool) or not isinstance(bins, int) or bins < 2):
            raise ValueError(f"bins must be an integer of at least 2, got {bins!r}")
        if levels is not None and (bins is None or len(levels) != bins):
            raise ValueError(f"levels need bins, one level per bin: got {len(levels)} levels for bins={bins}")

    def record_fields(self, target_std: float | None = None) -> dict[str, Any]:
        """The :class:`AnnotationRecord` fields that describe this scale (``target_std``: it standardises)."""
        return {
            "scale": "standardize" if target_std is not None else ("fixed" if self.factor != 1.0 else None),
            "target_std": target_std,
            "scale_factor": self.factor,
            "clip": None if self.clip is None else list(self.clip),
            "bins": None if self.bin_edges is None else len(self.bin_edges) + 1,
            "bin_edges": None if self.bin_edges is None else list(self.bin_edges),
            "levels": None if self.levels is None else list(self.levels),
        }


@dataclass(frozen=True)
class AnnotationRecord:
    """Provenance of a ``margin`` column: the direction, the annotator model, how it ran and how margins were
    scaled.

    How the model ran: ``dtype`` is the dtype of its matmuls and ``residual_dtype`` that of its residual stream
    (float32 under bfloat16 matmuls where texts are packed, :mod:`legend_hf.precision`); ``max_length`` is the
    token limit texts were cut to and ``model_revision`` the model's commit or revision, when known.

    ``scale`` is ``None`` (``margin`` is the raw projection difference), ``"standardize"`` (divided by
    the raw margins' standard deviation, times ``target_std``) or ``"fixed"``; ``scale_factor`` multiplies the raw margin,
    ``clip`` bounds the scaled one, and with ``bins`` the ``margin`` is the level of its bin (``bin_edges``
    in scaled units, ``levels`` the value of each bin). Names are Hub ids or local folder names, never
    absolute paths.
    """

    direction: str
    direction_fingerprint: str
    model_id: str
    layer: int
    num_layers: int
    pooling: str
    template: str
    method: str
    library_version: str
    direction_revision: str | None = None
    model_revision: str | None = None
    max_length: int | None = None
    scale: str | None = None
    target_std: float | None = None
    scale_factor: float = 1.0
    clip: list[float | None] | None = None
    bins: int | None = None
    bin_edges: list[float] | None = None
    levels: list[float] | None = None
    dtype: str | None = None
    residual_dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnnotationRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_scale(self, scale: MarginScale, target_std: float | None = None) -> AnnotationRecord:
        return replace(self, **scale.record_fields(target_std))

    @property
    def margin_scale(self) -> MarginScale:
        clip = None if self.clip is None else (self.clip[0], self.clip[1])
        edges = None if self.bin_edges is None else tuple(self.bin_edges)
        return MarginScale(
            self.scale_factor, clip, edges, None if self.levels is None else tuple(self.levels)
        )

    @property
    def scaled(self) -> bool:
        return self.scale is not None or self.bins is not None or self.clip is not None


@dataclass(frozen=True)
class GenerationRecord:
    """Provenance of a generated ``response`` column, the same kind of record as :class:`AnnotationRecord` and
    carried the same way (the ``id`` of the response column's feature, under ``legend_hf_generation``): the model
    (``model_id``, ``model_revision``), the generation ``settings`` (``legend_hf.generate.GenerationSettings``'s
    fields), the ``template`` used, the ``batch_size`` (prompts per ``generate`` call), the columns, and where the
    prompts came from (``source_dataset``, a public name)."""

    model_id: str
    settings: dict[str, Any]
    template: str
    batch_size: int
    prompt_column: str
    response_column: str
    library_version: str
    model_revision: str | None = None
    source_dataset: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def generated_features(features: Any, record: GenerationRecord) -> Any:
    """``features`` with the record in the response column's ``id`` (and the ``response_truncated`` flag)."""
    from datasets import Features, Value

    out = Features(features)
    out[record.response_column] = Value(
        "string", id=json.dumps({GENERATION_KEY: record.to_dict()}, sort_keys=True)
    )
    return out


def read_generation_record(dataset: Any, column: str = "response") -> GenerationRecord | None:
    """The :class:`GenerationRecord` of a generated ``column`` (a ``Dataset`` or its ``Features``), or ``None``."""
    features = getattr(dataset, "features", dataset)
    text = getattr(features.get(column) if features is not None else None, "id", None)
    data = json.loads(text) if text else None
    if isinstance(data, dict) and isinstance(data.get(GENERATION_KEY), dict):
        return GenerationRecord.from_dict(data[GENERATION_KEY])
    return None


def annotated_features(features: Any, new_columns: list[str], record: AnnotationRecord | None) -> Any:
    """The input ``Features`` plus the annotation's columns, the record in the ``margin`` feature's ``id``."""
    from datasets import Features, Value

    out = Features({**features, **{c: Value(COLUMN_TYPES[c]) for c in new_columns}})
    if record is not None:
        out[MARGIN] = Value(
            COLUMN_TYPES[MARGIN], id=json.dumps({RECORD_KEY: record.to_dict()}, sort_keys=True)
        )
    return out


def read_record(dataset: Any, card: str | Path | None = None) -> AnnotationRecord | None:
    """The record of an annotated dataset (``Dataset``, ``IterableDataset`` or their ``Features``): from the
    ``margin`` feature, else from the YAML of the dataset card ``card`` (a README.md path); ``None`` when
    neither has one (margins made by a plain ``Dataset.map(MarginAnnotator(...))``)."""
    features = getattr(dataset, "features", dataset)
    feature = features.get(MARGIN) if features is not None else None
    text = getattr(feature, "id", None)
    if text:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict) and isinstance(data.get(RECORD_KEY), dict):
            record = AnnotationRecord.from_dict(data[RECORD_KEY])
            return record if _describes(record, dataset) else None
    if card is not None and Path(card).is_file():
        from huggingface_hub import DatasetCard

        data = DatasetCard.load(Path(card)).data.to_dict().get(RECORD_KEY)
        if isinstance(data, dict):
            return AnnotationRecord.from_dict(data)
    return None


def _describes(record: AnnotationRecord, dataset: Any, rows: int = 100) -> bool:
    """Whether the first ``rows`` margins are what the record says they are. `datasets` keeps a column's
    feature (and so the record) when a ``map`` rewrites the column with the same type; such a margin is no
    longer described by the record, which is then not read (with a warning)."""
    columns = getattr(dataset, "column_names", None)
    if not columns or len(dataset) == 0:
        return True
    head = dataset.select(range(min(rows, len(dataset))))
    margin = np.asarray(head[MARGIN], dtype=np.float64)
    if "margin_raw" in columns:
        expected = np.asarray(record.margin_scale.apply(head["margin_raw"])[MARGIN])
    elif "chosen_safety" in columns and "rejected_safety" in columns and not record.scaled:
        expected = np.asarray(head["chosen_safety"], dtype=np.float64) - np.asarray(head["rejected_safety"])
    else:
        return True
    if np.allclose(margin, expected, rtol=1e-9, atol=1e-9):
        return True
    warnings.warn(
        "the dataset's margin column was changed after annotation (it is not what its legend-hf record "
        "describes), so the record is not read; rescale with legend_hf.scale_margins to keep one",
        stacklevel=3,
    )
    return False
