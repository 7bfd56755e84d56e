"""Recipes around `fit_direction`: a length-balanced safe side, and projecting nuisance directions out.

A probe fitted on harmful answers against refusals also learns what merely co-varies with the label,
above all response length (refusals are short). `length_direction` estimates, at each layer, how hidden
states move when the same kind of response gets longer (long minus short half of a group of texts),
and `project_out` removes such directions from every vector of a `SafetyDirection`. `remove_length`
does both from fit data, reading it in one forward pass. In bench/quality.py this kept held-out accuracy
and AUC and brought the correlation of margins with length difference on refusal-vs-compliance pairs
from -0.3 to 0.0 with SmolLM2 (see bench/README.md, "Quality").

Refusals are short, so a safe side made of refusals alone teaches "short and refusing" rather than "safe".
`balanced_harmless` answers the harmful prompts with refusals and longer safe completions in turn (the
shipped ``refusals.json`` and ``safe_completions.json``). `fit_balanced` is the recommended recipe in one
call (balanced safe side, logistic probe, ``layer="auto"``, `remove_length`): the shipped SmolLM2
direction (``scripts/fit_default_direction.py``). `fit_graded` adds answers graded by severity and a ridge
regression on the level: the shipped Gemma 3 direction.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .direction import SafetyDirection
from .fitting import fit_direction, read_rows
from .formatting import InputError
from .models import load_model
from .options import RuntimeOptions
from .scoring import Scorer


def balanced_harmless(
    harmful: Any,
    refusals: Sequence[str],
    completions: Sequence[str],
    *,
    prompt_column: str = "prompt",
    response_column: str = "response",
) -> list[dict[str, Any]]:
    """The prompts of ``harmful`` answered safely: refusals (even rows) and safe completions (odd rows) take
    turns, each list cycled, so the safe side is not systematically shorter than the harmful one.

    ``harmful`` is a ``datasets.Dataset`` or list of dicts; the rows keep ``prompt_column`` and get the safe
    answer in ``response_column``.
    """
    if not refusals or not completions:
        raise ValueError(
            f"balanced_harmless needs refusals and completions, got {len(refusals)} and {len(completions)}"
        )
    read_rows(harmful, prompt_column=prompt_column, response_column=response_column, name="harmful")  # checks
    prompts = (
        list(harmful[prompt_column])
        if hasattr(harmful, "column_names")
        else [r[prompt_column] for r in harmful]
    )
    return [
        {
            prompt_column: prompt,
            response_column: refusals[i // 2 % len(refusals)]
            if i % 2 == 0
            else completions[i // 2 % len(completions)],
        }
        for i, prompt in enumerate(prompts)
    ]


def fit_balanced(
    model: str | os.PathLike[str] | nn.Module,
    harmful_groups: Sequence[Any],
    refusals: Sequence[str],
    completions: Sequence[str],
    *,
    tokenizer: Any = None,
    runtime: RuntimeOptions | None = None,
    **fit_options: Any,
) -> SafetyDirection:
    """The recommended recipe (bench/README.md, "Quality"): each group of harmful rows against its prompts
    answered by refusals and safe completions in turn (:func:`balanced_harmless`), a logistic probe with
    ``layer="auto"``, then the mean length direction of every group, harmful and safe, projected out
    (:func:`remove_length`). ``fit_options`` go to ``fit_direction`` (``description``, ``model_id``...).

    The shipped SmolLM2 direction is ``fit_balanced(model, [advbench_fit, fit_harmful], refusals,
    safe_completions)`` on the package data (``scripts/fit_default_direction.py``).
    """
    runtime = runtime or RuntimeOptions()
    safe_groups = [balanced_harmless(group, refusals, completions) for group in harmful_groups]
    if not isinstance(model, nn.Module):  # load once for both passes
        model, tokenizer = load_model(model, tokenizer, runtime)
    direction = fit_direction(
        model,
        [row for group in harmful_groups for row in group],
        harmless=[row for group in safe_groups for row in group],
        tokenizer=tokenizer,
        method="logistic",
        layer="auto",
        runtime=runtime,
        **fit_options,
    )
    return remove_length(
        direction, [*harmful_groups, *safe_groups], model=model, tokenizer=tokenizer, runtime=runtime
    )


def fit_graded(
    model: str | os.PathLike[str] | nn.Module,
    harmful_groups: Sequence[Any],
    refusals: Sequence[str],
    completions: Sequence[str],
    graded: Sequence[Mapping[str, Any]],
    *,
    harmful_severity: float = 2.0,
    layer: int | Sequence[int] | str = "auto",
    tokenizer: Any = None,
    runtime: RuntimeOptions | None = None,
    **fit_options: Any,
) -> SafetyDirection:
    """Graded fit data (bench/README.md, "Grading"): a ridge regression of the safety level instead of a
    binary contrast, so that margins also order unsafe answers by severity and keep two safe answers close.

    The safe side is :func:`fit_balanced`'s plus the safe answers (severity 0) of ``graded``; the harmful side
    is ``harmful_groups`` at ``harmful_severity`` plus the unsafe answers of ``graded`` at their severity.
    ``graded`` rows hold a ``prompt`` and ``responses``: dicts with ``text`` and ``severity`` (see
    ``legend_hf.data_io.graded_fit_data``). The shipped Gemma 3 direction is this recipe on the package data.
    """
    harmful = [{**row, "severity": harmful_severity} for group in harmful_groups for row in group]
    harmless = [row for group in harmful_groups for row in balanced_harmless(group, refusals, completions)]
    for i, row in enumerate(graded):
        for j, answer in enumerate(row["responses"]):
            severity = answer["severity"]
            if isinstance(severity, bool) or not isinstance(severity, (int, float)) or severity < 0:
                raise InputError(f"graded: row {i}, response {j}: expected a severity >= 0, got {severity!r}")
            text = {"prompt": row["prompt"], "response": answer["text"]}
            if severity > 0:
                harmful.append({**text, "severity": severity})
            else:
                harmless.append(text)
    return fit_direction(
        model,
        harmful,
        harmless=harmless,
        tokenizer=tokenizer,
        method="ridge",
        severity_column="severity",
        layer=layer,
        runtime=runtime,
        **fit_options,
    )


def length_direction(states: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Mean state of the longer half of a group of texts minus that of the shorter half (median split).

    Use a group of texts of one kind (e.g. only refusals): across kinds, length and label are confounded.
    """
    if len(states) != len(lengths):
        raise ValueError(f"{len(states)} states but {len(lengths)} lengths")
    n = torch.tensor(list(lengths), dtype=torch.float64)
    long, short = n > n.median(), n <= n.median()
    if not long.any():
        raise ValueError("all texts of the group have the same length: no length direction to estimate")
    x = states.double()
    return x[long].mean(0) - x[short].mean(0)


def project_out(
    direction: SafetyDirection, nuisance: Mapping[int, Sequence[torch.Tensor]], *, name: str
) -> SafetyDirection:
    """A copy of ``direction`` whose vector at each layer has no component along that layer's nuisance
    directions (an orthonormal basis of their span is removed). Recorded as ``fit_data["projected_out"]``.
    """
    vectors = {}
    for layer, vector in direction.vectors.items():
        if layer not in nuisance:
            raise ValueError(f"no nuisance direction for layer {layer}; got layers {sorted(nuisance)}")
        basis, _ = torch.linalg.qr(torch.stack([d.double() for d in nuisance[layer]], dim=1))
        v = vector.double()
        vectors[layer] = (v - basis @ (basis.T @ v)).float()
    fit_data = {**direction.fit_data, "projected_out": [*direction.fit_data.get("projected_out", []), name]}
    return replace(direction, vectors=vectors, fit_data=fit_data, layer_scores={})


def remove_length(
    direction: SafetyDirection,
    groups: Sequence[Any],
    *,
    model: str | os.PathLike[str] | nn.Module | None = None,
    tokenizer: Any = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    runtime: RuntimeOptions | None = None,
) -> SafetyDirection:
    """Project the mean length direction of ``groups`` out of every layer of ``direction``.

    Each group is a ``datasets.Dataset`` or list of dicts of one kind of (prompt, response) rows, e.g. the
    harmful answers, and the refusals, the direction was fitted on; its length direction is the long minus
    the short half by response tokens, and the mean over groups is removed. All groups are read in one
    pass with the direction's model, template, pooling and layers. Held-out layer scores are dropped
    (they describe the vectors before projection): re-score with ``legend_hf.evaluate_direction``.
    """
    runtime = runtime or RuntimeOptions()
    rows = [
        read_rows(g, prompt_column=prompt_column, response_column=response_column, name=f"groups[{i}]")
        for i, g in enumerate(groups)
    ]
    if not rows:
        raise ValueError("remove_length needs at least one group of texts")
    reader = Scorer(direction, model, tokenizer, runtime=runtime, layers=sorted(direction.vectors)).load()
    flat = [conversation for group in rows for conversation in group]
    states, _ = reader.read(flat)
    lengths = [
        len(ids) for ids in reader.tokenizer([r for _, r in flat], add_special_tokens=False)["input_ids"]
    ]
    spans, start = [], 0
    for group in rows:
        spans.append(slice(start, start + len(group)))
        start += len(group)
    nuisance = {}
    for layer, layer_states in states.items():
        per_group = [length_direction(layer_states[span], lengths[span]) for span in spans]
        nuisance[layer] = [torch.stack(per_group).mean(0)]
    return project_out(direction, nuisance, name="length")
