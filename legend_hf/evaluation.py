"""A direction on labelled pairs, per layer and per group (`evaluate_direction`, `QualityReport`).

Every number comes from :mod:`legend_hf.stats` (one vocabulary), every score from
:class:`legend_hf.scoring.Scorer` (one scoring path) and every label from :class:`legend_hf.labels.LabelledPairs`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .direction import SafetyDirection
from .labels import LabelledPairs, group_statistics
from .options import RuntimeOptions
from .scoring import Scorer
from .stats import cell

REPORTED = ("pair_accuracy", "response_auc", "severity_spearman", "length_spearman")


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
            lines.append(f"| {layer}{mark} | " + " | ".join(cell(groups[group][m]) for m in REPORTED) + " |")
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
                    + " | ".join(cell(s[m]) for m in REPORTED)
                    + " |"
                )
        return "\n".join(lines)


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
