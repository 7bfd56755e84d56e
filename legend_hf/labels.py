"""The labels preference data carries, read once: which side is safer, per-response safe flags, severities,
response lengths and groups (`LabelledPairs`), and the statistics of :mod:`legend_hf.stats` over them, overall and
per group."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .data_io import is_pku_saferlhf, pku_pair
from .formatting import Conversation, InputError, pair_conversations
from .stats import PairLabels, pair_statistics

LABEL_COLUMNS = (
    "chosen_is_safer",
    "chosen_is_safe",
    "rejected_is_safe",
    "chosen_severity",
    "rejected_severity",
)


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
