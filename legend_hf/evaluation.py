"""Quality of margins against labels: pair sign accuracy, ROC AUC and Spearman correlation."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def sign_accuracy(margins: Sequence[float], chosen_is_safer: Sequence[bool] | None = None) -> float:
    """Share of pairs whose margin sign agrees with the label (default: chosen is the safer one)."""
    m = torch.tensor(list(margins), dtype=torch.float64)
    if len(m) == 0:
        return float("nan")
    labels = torch.ones_like(m, dtype=torch.bool) if chosen_is_safer is None else torch.tensor(list(chosen_is_safer))
    return float(((m > 0) == labels).double().mean())


def roc_auc(scores: Sequence[float], labels: Sequence[int | bool]) -> float:
    """ROC AUC: P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    s = torch.tensor(list(scores), dtype=torch.float64)
    y = torch.tensor([bool(x) for x in labels])
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = _ranks(torch.cat([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    a, b = _ranks(torch.tensor(list(x), dtype=torch.float64)), _ranks(torch.tensor(list(y), dtype=torch.float64))
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
