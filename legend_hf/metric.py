"""The `evaluate` metric's library side: its pair and response modes over the one scoring path, and
`load_metric`, which loads the metric folder that ships with the package."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .data_io import METRIC_PATH
from .formatting import InputError, is_hh_dialogue, pair_conversations, to_conversation
from .labels import length_diff
from .scoring import Scorer
from .stats import PairLabels, is_binary, pair_statistics, roc_auc, spearman, summary


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
