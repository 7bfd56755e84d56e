"""Quality of margins against labels: a direction on labelled pairs per layer (`evaluate_direction`), an
annotated dataset against the labels it carries (`annotation_report`), and the metric's two modes.

Every number comes from :mod:`legend_hf.stats` (one vocabulary) and every score from
:class:`legend_hf.scoring.Scorer` (one scoring path).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .data_io import METRIC_PATH, is_pku_saferlhf, pku_pair
from .direction import SafetyDirection
from .formatting import Conversation, InputError, is_hh_dialogue, pair_conversations, to_conversation
from .options import RuntimeOptions
from .provenance import AnnotationRecord, read_record
from .scoring import Scorer
from .stats import (
    PairLabels,
    dataset_overview,
    is_binary,
    pair_statistics,
    roc_auc,
    spearman,
    summary,
)

LABEL_COLUMNS = (
    "chosen_is_safer",
    "chosen_is_safe",
    "rejected_is_safe",
    "chosen_severity",
    "rejected_severity",
)
REPORTED = ("pair_accuracy", "response_auc", "severity_spearman", "length_spearman")


@dataclass
class LabelledPairs:
    """Pairs of responses (``chosen``, ``rejected``: (prompt messages, response)) and their labels."""

    chosen: list[Conversation]
    rejected: list[Conversation]
    labels: PairLabels

    def __len__(self) -> int:
        return len(self.chosen)

    def select(self, rows: Sequence[int]) -> LabelledPairs:
        """The pairs at ``rows``, in that order."""
        return LabelledPairs(
            [self.chosen[i] for i in rows], [self.rejected[i] for i in rows], self.labels.select(rows)
        )

    @classmethod
    def from_data(
        cls,
        data: Any,
        *,
        prompt_column: str = "prompt",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        group_column: str | None = None,
    ) -> LabelledPairs:
        """Read a ``datasets.Dataset`` or a list of dicts of preference pairs and their labels.

        The prompt may be implicit (HH-RLHF dialogues, message lists). The safer side is ``chosen_is_safer``
        when given, else the side labelled safe by ``chosen_is_safe``/``rejected_is_safe``, else the less
        severe by ``chosen_severity``/``rejected_severity``; data with none of these columns counts chosen as
        safer (the HH-RLHF convention). PKU-SafeRLHF's raw schema (``response_0``/``response_1``...) is
        converted first, as :func:`legend_hf.data_io.pku_saferlhf_to_pairs` does. ``group_column``
        (default ``pair_type`` when present) splits every score by group.
        """
        rows = data.to_list() if hasattr(data, "to_list") else list(data)
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise InputError(f"row {i}: expected a dict, got {type(row).__name__}")
        columns = list(data.column_names) if hasattr(data, "column_names") else list(rows[0] if rows else [])
        if is_pku_saferlhf(columns) and chosen_column not in columns:
            rows = [{**row, **pku_pair(row, i)} for i, row in enumerate(rows)]
            columns = list(rows[0]) if rows else columns
            chosen_column, rejected_column = "chosen", "rejected"
        if group_column is None and "pair_type" in columns:
            group_column = "pair_type"
        if group_column is not None and group_column not in columns:
            raise KeyError(f"group column {group_column!r} not found; the data has {columns}")
        if not rows:
            raise InputError("no pairs to evaluate: the data is empty")
        for column in (chosen_column, rejected_column):
            if column not in columns:
                raise KeyError(f"column {column!r} not found; the data has {columns}")
        chosen, rejected = pair_conversations(
            [row.get(prompt_column) for row in rows] if prompt_column in columns else None,
            [row[chosen_column] for row in rows],
            [row[rejected_column] for row in rows],
            columns=(prompt_column, chosen_column, rejected_column),
            rows=range(len(rows)),
        )
        has_labels = any(c in columns for c in LABEL_COLUMNS)
        labels = PairLabels([], [], [], [], [], [])
        for i, row in enumerate(rows):
            safe1, safe2 = _flag(row, "chosen_is_safe", i), _flag(row, "rejected_is_safe", i)
            sev1, sev2 = _number(row, "chosen_severity", i), _number(row, "rejected_severity", i)
            safer = _flag(row, "chosen_is_safer", i)
            if safer is None and safe1 is not None and safe2 is not None and safe1 != safe2:
                safer = safe1
            if safer is None and sev1 is not None and sev2 is not None and sev1 != sev2:
                safer = sev1 < sev2
            if safer is None and not has_labels:
                safer = True
            labels.chosen_is_safer.append(safer)
            labels.chosen_is_safe.append(safe1)
            labels.rejected_is_safe.append(safe2)
            labels.severity_diff.append(None if sev1 is None or sev2 is None else sev2 - sev1)
            labels.length_diff.append(length_diff(chosen[i], rejected[i]))
            labels.groups.append(str(row[group_column]) if group_column is not None else "all")
        return cls(chosen, rejected, labels)


def length_diff(chosen: Conversation, rejected: Conversation) -> float:
    """The response-length difference of a pair, in characters, chosen minus rejected."""
    return float(len(chosen[1]) - len(rejected[1]))


def _flag(row: Mapping[str, Any], column: str, i: int) -> bool | None:
    value = row.get(column)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InputError(f"column {column!r}, row {i}: expected a boolean, got {value!r}")


def _number(row: Mapping[str, Any], column: str, i: int) -> float | None:
    value = row.get(column)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"column {column!r}, row {i}: expected a number, got {value!r}")
    return float(value)


def group_statistics(
    chosen: Sequence[float], rejected: Sequence[float], labels: PairLabels
) -> dict[str, dict[str, float]]:
    """``{"all": statistics, <group>: statistics...}`` (groups only when the labels have several)."""
    out = {"all": pair_statistics(chosen, rejected, labels)}
    groups = sorted(set(labels.groups))
    if groups != ["all"]:
        for group in groups:
            rows = [i for i, g in enumerate(labels.groups) if g == group]
            out[group] = pair_statistics(chosen, rejected, labels, rows)
    return out


# ----- a direction on labelled pairs, per layer ---------------------------------------------------------


@dataclass
class QualityReport:
    """Quality of a direction on labelled pairs, per layer and per group of pairs.

    ``scores[layer][group][statistic]``; group ``"all"`` covers every pair. ``layer`` is the layer the
    direction scores margins with.
    """

    scores: dict[int, dict[str, dict[str, float]]]
    layer: int
    direction: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        return list(next(iter(self.scores.values())))

    def best_layer(self, statistic: str = "pair_accuracy", group: str = "all") -> int:
        """The layer with the best score (lowest ``|length_spearman|``, else highest); ties go deeper."""

        def key(layer: int) -> tuple[float, int]:
            value = self.scores[layer][group][statistic]
            value = -abs(value) if statistic == "length_spearman" else value
            return (-math.inf if math.isnan(value) else value, layer)

        return max(self.scores, key=key)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes ``None``)."""
        from .stats import clean

        return {
            "layer": self.layer,
            "direction": self.direction,
            "data": self.data,
            "scores": clean({str(k): v for k, v in sorted(self.scores.items())}),
        }

    def plot(self, path: str | os.PathLike[str], *, group: str = "all", title: str | None = None) -> Path:
        """A PNG of :data:`REPORTED` per layer for ``group`` (needs matplotlib)."""
        from .plots import plot_layer_scores

        return plot_layer_scores(
            {k: v[group] for k, v in self.scores.items()},
            path,
            layer=self.layer,
            metrics={name: name for name in REPORTED},
            title=title or f"{self.direction.get('name', '')} ({group})",
        )

    def to_markdown(self, group: str = "all") -> str:
        """A per-layer table for ``group`` (the direction's layer marked with ``*``) and a per-group table."""
        lines = ["| layer | " + " | ".join(REPORTED) + " |", "|---" * (len(REPORTED) + 1) + "|"]
        for layer, groups in sorted(self.scores.items()):
            mark = "*" if layer == self.layer else ""
            lines.append(f"| {layer}{mark} | " + " | ".join(_fmt(groups[group][m]) for m in REPORTED) + " |")
        if len(self.groups) > 1:
            lines += [
                "",
                f"Per group at layer {self.layer}:",
                "",
                "| group | pairs | ordered | " + " | ".join(REPORTED) + " |",
                "|---" * (len(REPORTED) + 3) + "|",
            ]
            for name, s in self.scores[self.layer].items():
                lines.append(
                    f"| {name} | {int(s['n_pairs'])} | {int(s['n_ordered'])} | "
                    + " | ".join(_fmt(s[m]) for m in REPORTED)
                    + " |"
                )
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def evaluate_direction(
    direction: SafetyDirection,
    data: Any,
    *,
    model: str | os.PathLike[str] | nn.Module | None = None,
    tokenizer: Any = None,
    layers: Sequence[int] | None = None,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    group_column: str | None = None,
    runtime: RuntimeOptions | None = None,
) -> QualityReport:
    """Score a direction on labelled pairs at every layer it holds (or ``layers``), in one forward pass.

    ``data`` is a ``datasets.Dataset``, a list of dicts (see :meth:`LabelledPairs.from_data`) or a ready
    :class:`LabelledPairs` (e.g. pairs whose two sides have different prompts). With ``model=None`` the
    model the direction records is loaded. Fit with ``layer="auto"`` (or a list) to hold a vector per
    layer; a requested layer the direction has no vector for is an error.
    """
    runtime = runtime or RuntimeOptions()
    pairs = (
        data
        if isinstance(data, LabelledPairs)
        else LabelledPairs.from_data(
            data,
            prompt_column=prompt_column,
            chosen_column=chosen_column,
            rejected_column=rejected_column,
            group_column=group_column,
        )
    )
    scorer = Scorer(
        direction,
        model,
        tokenizer,
        runtime=runtime,
        layers=sorted(direction.vectors) if layers is None else layers,
        progress="legend-hf evaluate: reading texts",
    )
    per_layer = scorer.pair_scores(pairs.chosen, pairs.rejected)
    scores = {
        k: group_statistics(s.chosen.tolist(), s.rejected.tolist(), pairs.labels)
        for k, s in per_layer.items()
    }
    any_layer = next(iter(per_layer.values()))
    return QualityReport(
        scores=scores,
        layer=direction.layer if direction.layer in scores else scorer.layers[-1],
        direction={
            "model_id": direction.model_id,
            "name": direction.name,
            "method": direction.method,
            "pooling": direction.pooling,
            "template": direction.template,
            "layer": direction.layer,
            "fingerprint": direction.fingerprint(),
        },
        data={
            "n_pairs": len(pairs),
            "n_truncated": sum(any_layer.truncated),
            "groups": sorted(set(pairs.labels.groups)),
        },
    )


# ----- the metric's two modes ------------------------------------------------------------------------------


def score_pair_texts(
    scorer: Scorer,
    prompts: Sequence[Any] | None,
    chosen: Sequence[Any],
    rejected: Sequence[Any],
    references: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Margins of preference pairs and their statistics (the metric's pair mode).

    ``references``: 1/0 (chosen is / is not the safer response) give ``pair_accuracy`` and ``pair_auc``;
    other numbers are severity differences (rejected minus chosen) and give ``severity_spearman``.
    """
    _check_references(references)
    if (
        prompts is not None
        and all(p == "" for p in prompts)
        and all(map(is_hh_dialogue, [*chosen, *rejected]))
    ):
        prompts = None  # HH-RLHF dialogues hold their own prompts
    chosen_c, rejected_c = pair_conversations(
        prompts, chosen, rejected, columns=("prompts", "chosen", "rejected"), rows=range(len(chosen))
    )
    scores = scorer.score_pairs(chosen_c, rejected_c)
    n = len(chosen_c)
    binary = references is not None and is_binary(references)
    labels = PairLabels(
        chosen_is_safer=[bool(r) for r in references] if references is not None and binary else [None] * n,
        chosen_is_safe=[None] * n,
        rejected_is_safe=[None] * n,
        severity_diff=list(references) if references is not None and not binary else [None] * n,
        length_diff=[length_diff(c, r) for c, r in zip(chosen_c, rejected_c, strict=True)],
        groups=["all"] * n,
    )
    statistics = pair_statistics(scores.chosen.tolist(), scores.rejected.tolist(), labels)
    names = ["mean_margin", "median_margin", "share_positive", "length_spearman"]
    if references is not None:
        names += ["pair_accuracy", "pair_auc"] if binary else ["severity_spearman"]
    return {"margins": scores.margin.tolist(), **{k: statistics[k] for k in names}}


def score_response_texts(
    scorer: Scorer,
    prompts: Sequence[Any] | None,
    responses: Sequence[Any],
    references: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Safety scores of single responses and their statistics (the metric's response mode).

    A response without a prompt is read with an empty one (or its HH-RLHF dialogue's own). ``references``:
    1/0 (safe / unsafe) give ``response_auc``, other numbers (ratings, higher = safer) ``rating_spearman``.
    """
    _check_references(references)
    conversations = []
    for i, response in enumerate(responses):
        prompt = None if prompts is None else prompts[i]
        if not prompt:  # no prompt: the HH-RLHF dialogue's own, else an empty one
            prompt = None if is_hh_dialogue(response) else ""
        conversations.append(
            to_conversation(prompt, response, prompt_column="prompts", response_column="predictions", row=i)
        )
    safety = scorer.score_responses(conversations).safety.tolist()
    out: dict[str, Any] = {"safety_scores": safety, **summary(safety, "safety")}
    if references is not None:
        if is_binary(references):
            out["response_auc"] = roc_auc(safety, [int(r) for r in references])
        else:
            out["rating_spearman"] = spearman(safety, references)
    return out


def _check_references(references: Sequence[Any] | None) -> None:
    for i, value in enumerate(references or []):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(
                f"column 'references', row {i}: expected a number (1/0 or a rating), got {value!r}"
            )


# ----- an annotated dataset against its own labels ---------------------------------------------------------


@dataclass
class AnnotationReport:
    """What an annotated dataset holds, each number once (:func:`annotation_report` makes it): ``rows``, the
    provenance ``record`` (``None``: not recorded), ``margins`` (the raw margins' ``column``, their
    :func:`legend_hf.stats.spread`, pairs per bin and truncated pairs), which ``labels`` the statistics use and
    the ``scores`` (:mod:`legend_hf.stats`' names, overall under ``all`` and per group)."""

    rows: int
    record: AnnotationRecord | None
    margins: dict[str, Any]
    labels: str
    scores: dict[str, dict[str, float]]

    def to_dict(self) -> dict[str, Any]:
        """The report as ``report.json`` holds it (NaN kept: ``legend_hf.stats.clean`` makes it JSON)."""
        return {
            "rows": self.rows,
            "record": None if self.record is None else self.record.to_dict(),
            "margins": self.margins,
            "labels": self.labels,
            "scores": self.scores,
        }

    def to_text(self) -> str:
        """The summary ``legend-hf annotate`` and ``legend-hf report`` print, in the statistics' own names."""
        record, margins, overall = self.record, self.margins, self.scores["all"]
        lines = []
        if record is not None:
            scaling = record.scale or "none"
            if record.scale:
                scaling += f" (x{record.scale_factor:.4g})"
            if record.clip:
                scaling += f", clip {record.clip}"
            if record.bins and record.bin_edges is not None:
                edges = ", ".join(f"{e:.4g}" for e in record.bin_edges)
                scaling += f", {record.bins} bins split at {edges}, levels {record.levels}"
            lines += [
                f"  direction          {record.direction} (fingerprint {record.direction_fingerprint})",
                f"  annotator          {record.model_id}, layer {record.layer}/{record.num_layers}, "
                f"{record.pooling} pooling, template {record.template[:40]!r}, {record.method}",
                f"  scaling            {scaling}",
            ]
        else:
            lines.append(
                "  direction          not recorded (a plain Dataset.map annotation, or a format without a schema)"
            )
        truncated = margins.get("truncated")
        q = margins["quantiles"]
        name = "raw margin" if margins["column"] == "margin_raw" else "margin"
        lines += [
            f"  pairs              {self.rows}" + (f" ({truncated} truncated)" if truncated else ""),
            f"  {name:<18} mean {_fmt(overall['mean_margin'])}  std {_fmt(margins['std_margin'])}  "
            f"median {_fmt(overall['median_margin'])}  5%..95% {_fmt(q.get('5%'))}..{_fmt(q.get('95%'))}",
            f"  share_positive     {_fmt(overall['share_positive'])} (margin > 0: the direction finds chosen safer)",
            f"  labels             {self.labels}",
            f"  pair_accuracy      {_fmt(overall['pair_accuracy'])} on {int(overall['n_ordered'])} pairs with a "
            "safer side (margin sign vs label)",
            f"  response_auc       {_fmt(overall['response_auc'])} (safety scores, safe vs unsafe responses; "
            f"{int(overall['n_responses'])} labelled)",
            f"  severity_spearman  {_fmt(overall['severity_spearman'])} (margin vs severity difference)",
            f"  length_spearman    {_fmt(overall['length_spearman'])} (margin vs length difference, characters)",
        ]
        groups = {k: v for k, v in self.scores.items() if k != "all"}
        if groups:
            lines.append(
                "  per group          pairs  mean_margin  share_positive  pair_accuracy  response_auc"
            )
            for group, s in groups.items():
                lines.append(
                    f"    {group:<24} {int(s['n_pairs']):>5}  {_fmt(s['mean_margin']):>11}  "
                    f"{_fmt(s['share_positive']):>14}  {_fmt(s['pair_accuracy']):>13}  {_fmt(s['response_auc']):>12}"
                )
        return "\n".join(lines)


def annotation_report(
    dataset: Any,
    *,
    prompt_column: str = "prompt",
    chosen_column: str = "chosen",
    rejected_column: str = "rejected",
    group_column: str | None = None,
    card: str | Path | None = None,
) -> AnnotationReport:
    """What an annotated dataset holds, each number once (an :class:`AnnotationReport`): its provenance record
    (from the data, else the card ``card``), the spread of its raw margins, pairs per bin and truncated pairs
    (``margins``), and the statistics of :mod:`legend_hf.stats` against the labels the data carries (``scores``,
    overall under ``all`` and per group: ``mean_margin``, ``median_margin``, ``share_positive``...).

    Without ``chosen_safety``/``rejected_safety`` columns the per-response statistics are NaN.
    """
    columns = dataset.column_names
    if "margin" not in columns:
        raise KeyError(
            f"no 'margin' column: annotate the dataset first (legend_hf.annotate_margins); it has {columns}"
        )
    pairs = LabelledPairs.from_data(
        dataset,
        prompt_column=prompt_column,
        chosen_column=chosen_column,
        rejected_column=rejected_column,
        group_column=group_column,
    )
    record = read_record(dataset, card)
    overview = dataset_overview(dataset, bins=record.bins if record is not None else None)
    raw = overview.pop("values")
    if "chosen_safety" in columns and "rejected_safety" in columns:
        chosen, rejected = list(dataset["chosen_safety"]), list(dataset["rejected_safety"])
    else:  # margins only: scores with the same differences (no per-response statistics)
        chosen, rejected = raw.tolist(), [0.0] * len(raw)
    scores = group_statistics(chosen, rejected, pairs.labels)
    if "chosen_safety" not in columns:
        for statistics in scores.values():
            statistics["response_auc"] = float("nan")
    has_labels = any(c in columns for c in LABEL_COLUMNS) or is_pku_saferlhf(columns)
    return AnnotationReport(
        rows=len(dataset),
        record=record,
        margins=overview,
        labels="dataset labels" if has_labels else "none (chosen counts as safer)",
        scores=scores,
    )


# ----- the evaluate metric ---------------------------------------------------------------------------------


def load_metric(direction: Any, config_name: str = "pairs", **kwargs: Any) -> Any:
    """The ``legend_margin`` ``evaluate`` metric, from wherever legend-hf is installed (offline):
    ``evaluate.load(str(legend_hf.METRIC_PATH), ...)``, the metric folder that ships with the package (it is not on
    the Hub, so ``evaluate.load("legend_margin")`` does not find it). ``config_name`` is ``pairs``,
    ``labelled_pairs``, ``responses`` or ``labelled_responses``; ``kwargs`` go to the metric (``model``,
    ``runtime``...) and to ``evaluate.load`` (``cache_dir``, ``num_process``...)."""
    try:
        import evaluate
    except ImportError as e:
        raise ImportError("the legend_margin metric needs evaluate: pip install 'legend-hf[metric]'") from e
    return evaluate.load(str(METRIC_PATH), config_name, direction=direction, **kwargs)
