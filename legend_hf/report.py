"""An annotated dataset against the labels it carries: `annotation_report` and its `AnnotationReport`, whose
``to_dict()`` is ``report.json`` and ``to_text()`` what ``legend-hf annotate`` and ``report`` print."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data_io import is_pku_saferlhf
from .labels import LABEL_COLUMNS, LabelledPairs, group_statistics
from .provenance import AnnotationRecord, read_record
from .stats import cell, dataset_overview


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
            f"  {name:<18} mean {cell(overall['mean_margin'])}  std {cell(margins['std_margin'])}  "
            f"median {cell(overall['median_margin'])}  5%..95% {cell(q.get('5%'))}..{cell(q.get('95%'))}",
            f"  share_positive     {cell(overall['share_positive'])} (margin > 0: the direction finds chosen safer)",
            f"  labels             {self.labels}",
            f"  pair_accuracy      {cell(overall['pair_accuracy'])} on {int(overall['n_ordered'])} pairs with a "
            "safer side (margin sign vs label)",
            f"  response_auc       {cell(overall['response_auc'])} (safety scores, safe vs unsafe responses; "
            f"{int(overall['n_responses'])} labelled)",
            f"  severity_spearman  {cell(overall['severity_spearman'])} (margin vs severity difference)",
            f"  length_spearman    {cell(overall['length_spearman'])} (margin vs length difference, characters)",
        ]
        groups = {k: v for k, v in self.scores.items() if k != "all"}
        if groups:
            lines.append(
                "  per group          pairs  mean_margin  share_positive  pair_accuracy  response_auc"
            )
            for group, s in groups.items():
                lines.append(
                    f"    {group:<24} {int(s['n_pairs']):>5}  {cell(s['mean_margin']):>11}  "
                    f"{cell(s['share_positive']):>14}  {cell(s['pair_accuracy']):>13}  {cell(s['response_auc']):>12}"
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
