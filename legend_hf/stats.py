"""The statistics vocabulary: every number legend-hf reports about margins, defined once.

The metric, ``legend-hf report``, the dataset card and ``evaluate_direction`` all compute their numbers
here, under the names of :data:`STATISTICS` (README.md, "Statistics", has the same table). A statistic
without the data it needs (no labels, one class only, a constant input) is NaN.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

STATISTICS: dict[str, str] = {
    "mean_margin": "mean of the margins",
    "median_margin": "median of the margins",
    "share_positive": "share of pairs with margin > 0, i.e. where the direction finds chosen safer (no labels)",
    "pair_accuracy": "share of pairs with a known safer side whose margin sign agrees with it (margin > 0: chosen; "
    "a zero margin counts half)",
    "pair_auc": "ROC AUC of the margins against the pair labels (1: chosen is the safer side)",
    "response_auc": "ROC AUC of per-response safety scores, safe responses against unsafe ones",
    "severity_spearman": "Spearman correlation of margins with severity differences (rejected minus chosen)",
    "length_spearman": "Spearman correlation of margins with response-length differences (characters, chosen minus rejected)",
    "std_margin": "standard deviation of the margins (n - 1 in the denominator)",
    "min_margin": "smallest margin",
    "max_margin": "largest margin",
    "quantiles": "the margins' 5%, 25%, 75% and 95% quantiles (the 50% one is median_margin)",
    "share_negative": "share of pairs with margin < 0, i.e. where the direction finds rejected safer",
    "share_zero": "share of pairs with margin = 0",
    "mean_safety": "mean of per-response safety scores",
    "median_safety": "median of per-response safety scores",
    "rating_spearman": "Spearman correlation of per-response safety scores with numeric safety ratings",
}
NAN = float("nan")
Values = Sequence[float] | np.ndarray  # numbers, in order


def roc_auc(scores: Values, labels: Sequence[int | bool]) -> float:
    """ROC AUC: P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray([bool(x) for x in labels], dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return NAN
    ranks = _ranks(np.concatenate([s[y], s[~y]]))
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(x: Values, y: Values) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    a, b = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return NAN
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pair_accuracy(margins: Values, chosen_is_safer: Sequence[bool]) -> float:
    """Share of pairs whose margin sign agrees with the label (margin > 0: chosen, < 0: rejected); a zero margin
    counts half, as a tie does in :func:`roc_auc`. The one tie rule of fitting, evaluation and training."""
    m = np.asarray(margins, dtype=np.float64)
    if len(m) == 0:
        return NAN
    signed = np.where(np.asarray(chosen_is_safer, dtype=bool), m, -m)
    return float(((signed > 0) + 0.5 * (signed == 0)).mean())


# Margins within a tenth of a standard deviation of zero carry no sign worth keeping: bf16 matmuls move a
# margin by ~2-4% of the margins' spread (bench/README.md, "Throughput", "Fidelity"), and
# scale_margins(scale="standardize") turns them into reward-logit gaps under 0.1.
NOISE_BAND = 0.1


def fidelity(margins: Values, reference: Values) -> dict[str, float]:
    """How faithfully ``margins`` reproduce ``reference`` margins (float32's, say): their ``spearman``
    correlation, the ``band`` (:data:`NOISE_BAND` standard deviations of the reference), the
    ``sign_agreement`` of the pairs outside it, the ``share_in_band`` and the ``max_abs_error``."""
    m, ref = np.asarray(margins, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    band = NOISE_BAND * float(ref.std())
    outside = np.abs(ref) > band
    return {
        "spearman": spearman(m, ref),
        "band": band,
        "sign_agreement": float(((m > 0) == (ref > 0))[outside].mean()) if outside.any() else NAN,
        "share_in_band": float((~outside).mean()),
        "max_abs_error": float(np.abs(m - ref).max()),
    }


def summary(values: Values, kind: str) -> dict[str, float]:
    """``mean_<kind>``, ``median_<kind>`` (and for margins ``share_positive``) of ``values``."""
    v = np.asarray(values, dtype=np.float64)
    out = {
        f"mean_{kind}": float(v.mean()) if len(v) else NAN,
        f"median_{kind}": float(np.median(v)) if len(v) else NAN,
    }
    if kind == "margin":
        out["share_positive"] = float((v > 0).mean()) if len(v) else NAN
    return out


@dataclass
class PairLabels:
    """What is known about each pair: which side is safer (``None``: not ordered, e.g. two safe answers),
    whether each response is safe, the severity difference (rejected minus chosen), the response-length
    difference in characters (chosen minus rejected) and a group name."""

    chosen_is_safer: list[bool | None]
    chosen_is_safe: list[bool | None]
    rejected_is_safe: list[bool | None]
    severity_diff: list[float | None]
    length_diff: list[float]
    groups: list[str]

    def __len__(self) -> int:
        return len(self.groups)

    def select(self, rows: Sequence[int]) -> PairLabels:
        """The labels of the pairs at ``rows``, in that order."""
        return PairLabels(
            **{name: [getattr(self, name)[i] for i in rows] for name in self.__dataclass_fields__}
        )


def pair_statistics(
    chosen: Values, rejected: Values, labels: PairLabels, rows: Sequence[int] | None = None
) -> dict[str, float]:
    """Every pair statistic from per-response safety scores (margin = chosen - rejected), for all pairs or
    ``rows``, plus the counts behind them (``n_pairs``, ``n_ordered``, ``n_responses``)."""
    index = list(range(len(labels))) if rows is None else list(rows)
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    margins = c[index] - r[index]
    ordered = [j for j, i in enumerate(index) if labels.chosen_is_safer[i] is not None]
    safer = [bool(labels.chosen_is_safer[index[j]]) for j in ordered]
    scores, safe = [], []
    for i in index:
        for score, flag in ((c[i], labels.chosen_is_safe[i]), (r[i], labels.rejected_is_safe[i])):
            if flag is not None:
                scores.append(float(score))
                safe.append(flag)
    severity = [j for j, i in enumerate(index) if labels.severity_diff[i] is not None]
    return {
        **summary(margins, "margin"),
        "pair_accuracy": pair_accuracy(margins[ordered], safer),
        "pair_auc": roc_auc(margins[ordered], safer),
        "response_auc": roc_auc(scores, safe),
        "severity_spearman": spearman(
            margins[severity], [labels.severity_diff[index[j]] or 0.0 for j in severity]
        ),
        "length_spearman": spearman(margins, [labels.length_diff[i] for i in index]),
        "n_pairs": float(len(index)),
        "n_ordered": float(len(ordered)),
        "n_responses": float(len(safe)),
    }


def is_binary(references: Values) -> bool:
    """Whether ``references`` are 0/1 labels rather than numeric ratings or differences."""
    return all(r in (0, 1) for r in references)


def spread(values: Values, quantiles: Values = (0.05, 0.25, 0.75, 0.95)) -> dict[str, Any]:
    """How margins spread beyond their :func:`summary`: ``std_margin``, ``min_margin``, ``max_margin``,
    ``quantiles`` and the shares of negative and zero margins."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    return {
        "std_margin": float(v.std(ddof=1)) if n > 1 else (0.0 if n else NAN),
        "min_margin": float(v.min()) if n else NAN,
        "max_margin": float(v.max()) if n else NAN,
        "quantiles": {f"{100 * q:g}%": float(np.quantile(v, q)) if n else NAN for q in quantiles},
        "share_negative": float((v < 0).mean()) if n else NAN,
        "share_zero": float((v == 0).mean()) if n else NAN,
    }


def margin_values(data: Any) -> tuple[np.ndarray, str | None]:
    """Margins as float64 and the column they came from: ``margin_raw`` when an annotated ``Dataset`` has it
    (the projection difference before scaling and binning), else ``margin``; ``None`` for a sequence.
    Raises naming the first row that is not a finite number."""
    if hasattr(data, "column_names"):
        column = "margin_raw" if "margin_raw" in data.column_names else "margin"
        if column not in data.column_names:
            raise KeyError(
                f"the dataset has no 'margin' column (columns: {data.column_names}); "
                "annotate it first with legend_hf.annotate_margins"
            )
        return np.asarray(data.with_format("numpy", columns=[column])[column], dtype=np.float64), column
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ValueError(f"margins: expected a sequence of numbers, got {type(data).__name__}")
    values = list(data)
    for i, value in enumerate(values):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"margins: row {i} is {value!r:.40}, expected a finite number")
    return np.asarray(values, dtype=np.float64).reshape(-1), None


def dataset_overview(dataset: Any, *, bins: int | None = None) -> dict[str, Any]:
    """What an annotated dataset's margins look like beyond their statistics: the raw margins (``values``:
    ``margin_raw`` when present, ``column`` says which), their :func:`spread`, pairs per bin (``bins``: how
    many the record says there are; default: up to the highest level seen) and truncated pairs."""
    values, column = margin_values(dataset)
    out: dict[str, Any] = {"column": column, "values": values, **spread(values)}
    columns = dataset.column_names
    if "margin_level" in columns:
        levels = [int(x) for x in dataset["margin_level"]]
        n_bins = bins or max(levels, default=-1) + 1
        out["bins"] = {i: levels.count(i) for i in range(n_bins)}
    if "truncated" in columns:
        out["truncated"] = int(sum(dataset["truncated"]))
    return out


def cell(value: float | None) -> str:
    """A statistic as reports print it: three decimals, ``-`` where it is undefined (NaN or ``None``)."""
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def clean(value: object) -> object:
    """JSON-ready: NaN becomes None, recursively (dict keys become strings)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value
