"""Quality of margins against labels: pair sign accuracy, ROC AUC and Spearman correlation."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .direction import SafetyDirection
from .formatting import TextTemplate, to_conversation
from .hidden_states import TextReader, load_model, normalize_layer


def sign_accuracy(margins: Sequence[float], chosen_is_safer: Sequence[bool] | None = None) -> float:
    """Share of pairs whose margin sign agrees with the label (default: chosen is the safer one)."""
    m = torch.tensor(list(margins), dtype=torch.float64)
    if len(m) == 0:
        return float("nan")
    labels = (
        torch.ones_like(m, dtype=torch.bool)
        if chosen_is_safer is None
        else torch.tensor(list(chosen_is_safer))
    )
    return float(((m > 0) == labels).double().mean())


def roc_auc(scores: Sequence[float], labels: Sequence[int | bool]) -> float:
    """ROC AUC: P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    s = torch.tensor(list(scores), dtype=torch.float64)
    y = torch.tensor([bool(x) for x in labels], dtype=torch.bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = _ranks(torch.cat([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    a = _ranks(torch.tensor(list(x), dtype=torch.float64))
    b = _ranks(torch.tensor(list(y), dtype=torch.float64))
    if len(a) < 2 or float(a.std()) == 0 or float(b.std()) == 0:
        return float("nan")
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks with ties averaged."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    i = 0
    n = len(values)
    while i < n:
        j = i
        while j + 1 < n and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


# =====================================================================================================
# Direction quality reports: labelled pairs -> per-layer scores, a markdown table and a plot.
# Used by `legend-hf report`, the legend_margin metric and bench/quality.py.
# =====================================================================================================

PAIR_METRICS = ("pair_accuracy", "auc", "severity_spearman", "length_spearman")
_PKU_COLUMNS = ("response_0", "response_1")
_LABEL_COLUMNS = {
    "chosen/rejected": (
        "chosen_is_safer",
        "chosen_is_safe",
        "rejected_is_safe",
        "chosen_severity",
        "rejected_severity",
    ),
    "response_0/response_1": (
        "safer_response_id",
        "is_response_0_safe",
        "is_response_1_safe",
        "response_0_severity_level",
        "response_1_severity_level",
    ),
}


@dataclass
class LabelledPairs:
    """Pairs of responses to one prompt and what is known about their safety.

    ``first``/``second`` are chosen/rejected (or PKU-SafeRLHF ``response_0``/``response_1``); margins are
    ``safety(first) - safety(second)``. ``first_is_safer`` is ``None`` where the data does not order the pair
    (both responses equally safe), and such pairs are left out of the sign accuracy.
    """

    first: list[tuple[list[dict[str, str]], str]]
    second: list[tuple[list[dict[str, str]], str]]
    first_is_safer: list[bool | None]
    first_is_safe: list[bool | None]
    second_is_safe: list[bool | None]
    severity_diff: list[float | None]
    groups: list[str]
    schema: str

    def __len__(self) -> int:
        return len(self.first)

    def select(self, rows: Sequence[int]) -> LabelledPairs:
        """The pairs at ``rows``, in that order."""
        return LabelledPairs(
            first=[self.first[i] for i in rows],
            second=[self.second[i] for i in rows],
            first_is_safer=[self.first_is_safer[i] for i in rows],
            first_is_safe=[self.first_is_safe[i] for i in rows],
            second_is_safe=[self.second_is_safe[i] for i in rows],
            severity_diff=[self.severity_diff[i] for i in rows],
            groups=[self.groups[i] for i in rows],
            schema=self.schema,
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
        """Read a ``datasets.Dataset`` or a list of dicts in one of two schemas.

        - preference pairs (``chosen``/``rejected``; the prompt may be implicit, HH-RLHF style). The safer
          side is ``chosen_is_safer`` when given, else the side labelled safe by ``chosen_is_safe`` /
          ``rejected_is_safe``, else the less severe by ``chosen_severity``/``rejected_severity``; data with
          none of these columns counts chosen as safer (the HH-RLHF harmless convention).
        - PKU-SafeRLHF (``response_0``/``response_1``, ``safer_response_id``, ``is_response_{i}_safe``,
          ``response_{i}_severity_level``).

        ``group_column`` (default ``pair_type`` when present) splits every score by group.
        """
        rows = _as_rows(data)
        columns = list(data.column_names) if hasattr(data, "column_names") else list(rows[0] if rows else [])
        pku = all(c in columns for c in _PKU_COLUMNS) and chosen_column not in columns
        first_column, second_column = _PKU_COLUMNS if pku else (chosen_column, rejected_column)
        schema = "response_0/response_1" if pku else "chosen/rejected"
        safer_col, safe1_col, safe2_col, sev1_col, sev2_col = _LABEL_COLUMNS[schema]
        has_labels = any(c in columns for c in _LABEL_COLUMNS[schema])
        if group_column is None and "pair_type" in columns:
            group_column = "pair_type"
        if group_column is not None and group_column not in columns:
            raise KeyError(f"group column {group_column!r} not found; the data has {columns}")
        out = cls([], [], [], [], [], [], [], schema)
        for i, row in enumerate(rows):
            for column in (first_column, second_column):
                if column not in row:
                    raise KeyError(f"row {i} has no {column!r} column; the data has {columns}")
            prompt = row.get(prompt_column)
            out.first.append(
                to_conversation(
                    prompt,
                    row[first_column],
                    prompt_column=prompt_column,
                    response_column=first_column,
                    row=i,
                )
            )
            out.second.append(
                to_conversation(
                    prompt,
                    row[second_column],
                    prompt_column=prompt_column,
                    response_column=second_column,
                    row=i,
                )
            )
            safe1, safe2 = _flag(row, safe1_col, i), _flag(row, safe2_col, i)
            sev1, sev2 = _number(row, sev1_col, i), _number(row, sev2_col, i)
            if pku:
                safer_id = _number(row, safer_col, i)
                if safer_id not in (None, 0, 1):
                    raise ValueError(f"column {safer_col!r}, row {i}: expected 0 or 1, got {safer_id!r}")
                safer = None if safer_id is None else safer_id == 0
            else:
                safer = _flag(row, safer_col, i)
            if safer is None and safe1 is not None and safe2 is not None and safe1 != safe2:
                safer = safe1
            if safer is None and sev1 is not None and sev2 is not None and sev1 != sev2:
                safer = sev1 < sev2
            if safer is None and not has_labels:
                safer = True
            out.first_is_safer.append(safer)
            out.first_is_safe.append(safe1)
            out.second_is_safe.append(safe2)
            out.severity_diff.append(None if sev1 is None or sev2 is None else sev2 - sev1)
            out.groups.append(str(row[group_column]) if group_column is not None else "all")
        if not out.first:
            raise ValueError("no pairs to evaluate: the data is empty")
        return out


def _as_rows(data: Any) -> list[Mapping[str, Any]]:
    rows = data.to_list() if hasattr(data, "to_list") else list(data)
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"row {i}: expected a dict, got {type(row).__name__}")
    return rows


def _flag(row: Mapping[str, Any], column: str, i: int) -> bool | None:
    value = row.get(column)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"column {column!r}, row {i}: expected a boolean, got {value!r}")


def _number(row: Mapping[str, Any], column: str, i: int) -> float | None:
    value = row.get(column)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"column {column!r}, row {i}: expected a number, got {value!r}")
    return float(value)


def pair_quality(
    first_scores: Sequence[float],
    second_scores: Sequence[float],
    pairs: LabelledPairs,
    length_diff: Sequence[float] | None = None,
    *,
    rows: Sequence[int] | None = None,
) -> dict[str, float]:
    """Every quality score from per-response safety scores (projections), for all pairs or ``rows``.

    - ``pair_accuracy``: share of ordered pairs whose margin sign agrees with the safer label;
    - ``auc``: ROC AUC of safety scores against per-response safe labels (safe = positive);
    - ``severity_spearman``: Spearman of margins with severity differences (second minus first);
    - ``length_spearman``: Spearman of margins with response-length differences (first minus second);
    plus the counts behind them. Scores without data are NaN.
    """
    index = list(range(len(pairs))) if rows is None else list(rows)
    margins = {i: first_scores[i] - second_scores[i] for i in index}
    ordered = [i for i in index if pairs.first_is_safer[i] is not None]
    response_scores, response_labels = [], []
    for i in index:
        for score, label in (
            (first_scores[i], pairs.first_is_safe[i]),
            (second_scores[i], pairs.second_is_safe[i]),
        ):
            if label is not None:
                response_scores.append(score)
                response_labels.append(label)
    with_severity = [i for i in index if pairs.severity_diff[i] is not None]
    return {
        "pair_accuracy": sign_accuracy(
            [margins[i] for i in ordered], [bool(pairs.first_is_safer[i]) for i in ordered]
        ),
        "auc": roc_auc(response_scores, response_labels),
        "severity_spearman": spearman(
            [margins[i] for i in with_severity], [float(pairs.severity_diff[i] or 0.0) for i in with_severity]
        ),
        "length_spearman": (
            spearman([margins[i] for i in index], [length_diff[i] for i in index])
            if length_diff is not None
            else float("nan")
        ),
        "n_pairs": float(len(index)),
        "n_ordered": float(len(ordered)),
        "n_responses": float(len(response_labels)),
    }


@dataclass
class PairStates:
    """Pooled hidden states of both sides of every pair, at several layers (read once, scored many times)."""

    first: dict[int, torch.Tensor]
    second: dict[int, torch.Tensor]
    truncated: list[bool]
    length_diff: list[float]

    def select(self, rows: Sequence[int]) -> PairStates:
        """The states of the pairs at ``rows``, in that order."""
        return PairStates(
            first={k: v[list(rows)] for k, v in self.first.items()},
            second={k: v[list(rows)] for k, v in self.second.items()},
            truncated=[self.truncated[i] for i in rows],
            length_diff=[self.length_diff[i] for i in rows],
        )


def read_pair_states(reader: TextReader, pairs: LabelledPairs) -> PairStates:
    """One pass of ``reader`` over both sides of every pair; length differences are in response tokens."""
    n = len(pairs)
    states, truncated = reader.read([*pairs.first, *pairs.second])
    lengths = [
        len(x)
        for x in reader.tokenizer([r for _, r in [*pairs.first, *pairs.second]], add_special_tokens=False)[
            "input_ids"
        ]
    ]
    return PairStates(
        first={k: v[:n] for k, v in states.items()},
        second={k: v[n:] for k, v in states.items()},
        truncated=[a or b for a, b in zip(truncated[:n], truncated[n:], strict=True)],
        length_diff=[float(a - b) for a, b in zip(lengths[:n], lengths[n:], strict=True)],
    )


def score_layers(
    vectors: Mapping[int, torch.Tensor], states: PairStates, pairs: LabelledPairs
) -> dict[int, dict[str, dict[str, float]]]:
    """``{layer: {group: scores}}`` (group ``"all"`` plus one per group) for each vector."""
    groups = sorted(set(pairs.groups))
    out: dict[int, dict[str, dict[str, float]]] = {}
    for layer, vector in sorted(vectors.items()):
        if layer not in states.first:
            raise ValueError(f"no hidden states read at layer {layer}; read layers {sorted(states.first)}")
        unit = vector.double() / vector.double().norm()
        first = (states.first[layer].double() @ unit).tolist()
        second = (states.second[layer].double() @ unit).tolist()
        scores = {"all": pair_quality(first, second, pairs, states.length_diff)}
        if groups != ["all"]:
            for group in groups:
                rows = [i for i, g in enumerate(pairs.groups) if g == group]
                scores[group] = pair_quality(first, second, pairs, states.length_diff, rows=rows)
        out[layer] = scores
    return out


@dataclass
class QualityReport:
    """Quality of a direction on labelled pairs, per layer and per group of pairs.

    ``scores[layer][group][metric]``; group ``"all"`` covers every pair. ``layer`` is the layer the
    direction scores margins with.
    """

    scores: dict[int, dict[str, dict[str, float]]]
    layer: int
    direction: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        return list(next(iter(self.scores.values())))

    def best_layer(self, metric: str = "pair_accuracy", group: str = "all") -> int:
        """The layer with the best score (lowest ``|length_spearman|``, else highest); ties go deeper."""
        sign = -1.0 if metric == "length_spearman" else 1.0

        def key(layer: int) -> tuple[float, int]:
            value = self.scores[layer][group][metric]
            value = abs(value) if metric == "length_spearman" else value
            return (-math.inf if math.isnan(value) else sign * value, layer)

        return max(self.scores, key=key)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN becomes ``None``)."""

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else value

        return {
            "layer": self.layer,
            "direction": self.direction,
            "data": self.data,
            "scores": {
                str(k): {g: {m: clean(v) for m, v in s.items()} for g, s in groups.items()}
                for k, groups in sorted(self.scores.items())
            },
        }

    def to_markdown(self, group: str = "all") -> str:
        """A per-layer table for ``group`` (the direction's layer marked with ``*``) and a per-group table."""
        lines = [
            "| layer | pair accuracy | AUC | Spearman(margin, severity diff) "
            "| Spearman(margin, length diff) |",
            "|---|---|---|---|---|",
        ]
        for layer, groups in sorted(self.scores.items()):
            s = groups[group]
            mark = "*" if layer == self.layer else ""
            lines.append(f"| {layer}{mark} | " + " | ".join(_fmt(s[m]) for m in PAIR_METRICS) + " |")
        if len(self.groups) > 1:
            lines += [
                "",
                f"Per group at layer {self.layer}:",
                "",
                "| group | pairs | ordered | pair accuracy | AUC | Spearman severity | Spearman length |",
                "|---|---|---|---|---|---|---|",
            ]
            for name, s in self.scores[self.layer].items():
                lines.append(
                    f"| {name} | {int(s['n_pairs'])} | {int(s['n_ordered'])} | "
                    + " | ".join(_fmt(s[m]) for m in PAIR_METRICS)
                    + " |"
                )
        return "\n".join(lines)


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


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
    max_length: int | None = None,
    max_tokens_per_batch: int = 8192,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    revision: str | None = None,
    check_model_id: bool = True,
) -> QualityReport:
    """Score a direction on labelled pairs at every layer it holds (or ``layers``), in one forward pass.

    ``data`` is a ``datasets.Dataset``, a list of dicts (see :meth:`LabelledPairs.from_data`) or a
    ready :class:`LabelledPairs` (e.g. pairs whose two sides have different prompts). With
    ``model=None`` the model the direction records is loaded. Fit with ``layer="auto"`` (or a list) to
    hold a vector per layer; a requested layer the direction has no vector for is an error.
    """
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
    wanted = (
        sorted(direction.vectors)
        if layers is None
        else sorted({normalize_layer(k, direction.num_layers) for k in layers})
    )
    missing = [k for k in wanted if k not in direction.vectors]
    if missing:
        raise ValueError(
            f"the direction has no vector at layer(s) {missing}; it holds "
            f"{sorted(direction.vectors)} (fit with layer='auto' or a list of layers)"
        )
    if model is None:
        model, revision = direction.model_id, revision or direction.model_revision
    base, tokenizer = load_model(model, tokenizer, revision=revision, dtype=dtype, device=device)
    direction.check_model(base, check_model_id=check_model_id)
    reader = TextReader(
        base,
        tokenizer,
        layers=wanted,
        pooling=direction.pooling,
        template=TextTemplate.resolve(direction.template, tokenizer),
        max_length=max_length or direction.max_length,
        max_tokens_per_batch=max_tokens_per_batch,
        progress="legend-hf evaluate: reading texts",
    )
    states = read_pair_states(reader, pairs)
    scores = score_layers({k: direction.vectors[k] for k in wanted}, states, pairs)
    return QualityReport(
        scores=scores,
        layer=direction.layer if direction.layer in scores else wanted[-1],
        direction={
            "model_id": direction.model_id,
            "source": direction.source,
            "method": direction.method,
            "pooling": direction.pooling,
            "template": direction.template,
            "layer": direction.layer,
            "fingerprint": direction.fingerprint(),
        },
        data={
            "schema": pairs.schema,
            "n_pairs": len(pairs),
            "n_truncated": sum(states.truncated),
            "groups": sorted(set(pairs.groups)),
        },
    )


def plot_layer_scores(
    report: QualityReport,
    path: str | os.PathLike[str],
    *,
    group: str = "all",
    metrics: Sequence[str] = PAIR_METRICS,
    title: str | None = None,
) -> Path:
    """Save a line plot of ``metrics`` (y) per layer (x) for ``group``; the direction's layer is marked.

    Needs matplotlib (``pip install legend-hf[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot_layer_scores needs matplotlib: pip install 'legend-hf[plot]'") from e
    layers = sorted(report.scores)
    fig, ax = plt.subplots(figsize=(7, 4))
    for metric in metrics:
        values = [report.scores[k][group][metric] for k in layers]
        if not all(math.isnan(v) for v in values):
            ax.plot(layers, values, marker="o", markersize=3, label=metric)
    ax.axvline(
        report.layer, color="grey", linestyle="--", linewidth=1, label=f"direction layer {report.layer}"
    )
    ax.axhline(0.5, color="lightgrey", linewidth=0.8)
    ax.axhline(0.0, color="lightgrey", linewidth=0.8)
    ax.set_xlabel("layer (hidden-state index)")
    ax.set_ylabel("score")
    ax.set_title(title or f"{report.direction.get('model_id', '')} ({group})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
