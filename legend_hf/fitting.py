"""`fit_direction`: the Standard Margin Vector (Legend) and its PCA / logistic-probe variants.

Each harmful (prompt, response) is contrasted with a safe response to the same prompt: a refusal
(default "I can't answer that.", as in the paper) or a row of ``harmless``. One forward pass reads
every requested layer; per-layer held-out scores are recorded and ``layer="auto"`` picks the best.

A method is a function ``(safe states, harmful states) -> vector`` (``mean_diff``, ``pca``, ``logistic``
below, or your own); the sign is then fixed so that safer text projects higher. With graded harmful
answers (``severity_column``), ``ridge`` regresses the level instead of a binary contrast: margins then
also order unsafe answers by severity (bench/README.md, "Grading").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .direction import SafetyDirection, project
from .formatting import Conversation, InputError, TextTemplate, to_conversation
from .models import default_pooling, load_model, model_identity, normalize_layer, num_layers
from .options import RuntimeOptions
from .precision import compute_dtypes
from .reader import TextReader
from .stats import pair_accuracy, roc_auc

logger = logging.getLogger(__name__)

DEFAULT_REFUSAL = "I can't answer that."
Method = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mean_diff(safe: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
    """The paper's Standard Margin Vector: mean safe state minus mean harmful state."""
    return safe.mean(0) - harmful.mean(0)


def pca(safe: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
    """First right singular vector of the uncentred paired differences (RepE's PCA with random sign flips)."""
    if len(safe) != len(harmful):
        raise ValueError("method 'pca' needs paired data: harmless must have one row per harmful row")
    return torch.linalg.svd(safe - harmful, full_matrices=False).Vh[0]


def logistic(safe: torch.Tensor, harmful: torch.Tensor, l2: float = 1e-2) -> torch.Tensor:
    """Weights of an L2-regularised logistic probe (safe = 1), mapped back to raw hidden-state space."""
    x = torch.cat([safe, harmful])
    y = torch.cat([torch.ones(len(safe)), torch.zeros(len(harmful))]).double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (w / std).detach()


def ridge(
    safe: torch.Tensor, harmful: torch.Tensor, severity: torch.Tensor | None = None, l2: float = 1.0
) -> torch.Tensor:
    """Ridge regression of a safety level on standardised states, mapped back to raw space: safe texts are
    level 0, a harmful text minus its ``severity`` (1 for all without severities)."""
    x = torch.cat([safe, harmful]).double()
    level = -(severity.double() if severity is not None else torch.ones(len(harmful), dtype=torch.float64))
    y = torch.cat([torch.zeros(len(safe), dtype=torch.float64), level])
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    gram = z.T @ z + l2 * len(z) * torch.eye(z.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, z.T @ (y - y.mean())) / std


METHODS: dict[str, Method] = {"mean_diff": mean_diff, "pca": pca, "logistic": logistic, "ridge": ridge}


def _method(method: str | Method) -> tuple[str, Method]:
    if callable(method):
        return getattr(method, "__name__", "custom"), method
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)} or a function, got {method!r}")
    return method, METHODS[method]


def direction_from_states(
    safe: torch.Tensor, harmful: torch.Tensor, method: str | Method, severity: torch.Tensor | None = None
) -> torch.Tensor:
    """The direction (safer projects higher) from pooled states ``(n, hidden)`` of safe and harmful texts
    (and the harmful texts' severities, for a method that takes them)."""
    safe, harmful = safe.double(), harmful.double()
    fn: Any = _method(method)[1]  # a method that grades takes severity=
    vector = (fn(safe, harmful) if severity is None else fn(safe, harmful, severity=severity)).double()
    if float((safe.mean(0) - harmful.mean(0)) @ vector) < 0:
        vector = -vector
    return vector.float()


def layer_scores(
    safe: torch.Tensor,
    harmful: torch.Tensor,
    method: str | Method,
    *,
    holdout: float,
    seed: int,
    severity: torch.Tensor | None = None,
) -> dict[str, float]:
    """Held-out scores of one layer, in the statistics' names: ``pair_accuracy`` (the safe text of a held-out
    pair projects higher than the harmful one, ties half) and ``response_auc`` (safe against harmful projections)."""
    n = min(len(safe), len(harmful))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n * holdout))
    test, train = order[:n_test], order[n_test:]
    vector = direction_from_states(
        safe[train], harmful[train], method, None if severity is None else severity[train]
    )
    s, h = project(safe[test], vector), project(harmful[test], vector)
    auc = roc_auc([*s.tolist(), *h.tolist()], [1] * len(s) + [0] * len(h))
    accuracy = pair_accuracy((s - h).numpy(), [True] * len(s))
    return {"pair_accuracy": accuracy, "response_auc": auc, "n_heldout": float(n_test)}


def read_rows(rows: Any, *, prompt_column: str, response_column: str, name: str) -> list[Conversation]:
    """(prompt messages, response) for each row of a ``datasets.Dataset`` or a list of dicts."""
    if hasattr(rows, "column_names"):
        missing = [c for c in (prompt_column, response_column) if c not in rows.column_names]
        if missing:
            raise KeyError(f"{name}: missing column(s) {missing}; it has {rows.column_names}")
        pairs: Iterable[tuple[Any, Any]] = zip(rows[prompt_column], rows[response_column], strict=True)
    else:
        rows = list(rows)
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise InputError(
                    f"{name}: row {i} must be a dict with {prompt_column!r} and {response_column!r}"
                )
            for column in (prompt_column, response_column):
                if column not in row:
                    raise KeyError(f"{name}: row {i} has no {column!r} key")
        pairs = ((row[prompt_column], row[response_column]) for row in rows)
    out = []
    for i, (prompt, response) in enumerate(pairs):
        if prompt is None:
            raise InputError(
                f"{name}: column {prompt_column!r}, row {i}: expected text or messages, got None"
            )
        out.append(
            to_conversation(
                prompt,
                response,
                prompt_column=f"{name}.{prompt_column}",
                response_column=f"{name}.{response_column}",
                row=i,
            )
        )
    if not out:
        raise InputError(f"{name} is empty: a direction needs at least one example")
    return out


def read_severity(rows: Any, column: str) -> torch.Tensor:
    """The harmful rows' severities: a number > 0 per row, or an error naming the row."""
    values = rows[column] if hasattr(rows, "column_names") and column in rows.column_names else None
    if values is None:
        values = []
        for i, row in enumerate(rows):
            if column not in row:
                raise KeyError(f"harmful: row {i} has no {column!r} key (severity_column)")
            values.append(row[column])
    for i, value in enumerate(values):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not value > 0
            or value == float("inf")
        ):
            raise InputError(f"harmful: column {column!r}, row {i}: expected a severity > 0, got {value!r}")
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def fit_direction(
    model: str | os.PathLike[str] | nn.Module,
    harmful: Any,
    *,
    harmless: Any = None,
    tokenizer: Any = None,
    layer: int | Sequence[int] | str = -1,
    pooling: str | None = None,
    method: str | Method = "mean_diff",
    template: str | None = None,
    refusals: str | Sequence[str] | None = None,
    prompt_column: str = "prompt",
    response_column: str = "response",
    holdout: float = 0.2,
    seed: int = 0,
    severity_column: str | None = None,
    description: str | None = None,
    model_id: str | None = None,
    runtime: RuntimeOptions | None = None,
) -> SafetyDirection:
    """Fit a safety direction on an annotator model.

    Args:
        model: a Hub id, a local folder, or a loaded transformers model (its base model is used).
        harmful: a ``datasets.Dataset`` or list of dicts with ``prompt`` and ``response`` (harmful answers).
        harmless: same shape, safe answers. ``None`` pairs each harmful prompt with a refusal from
            ``refusals`` (cycled when there are several; default ``"I can't answer that."``).
        layer: an index (Python-style, ``-1`` = last hidden state), a list of indices, or ``"auto"``
            (every block; the best held-out AUC wins). All are read in one forward pass.
        pooling: ``"last"`` (default for decoders) or ``"mean"`` (default for encoders).
        method: ``"mean_diff"`` (the paper's SMV), ``"pca"``, ``"logistic"`` or a function
            ``(safe states, harmful states) -> vector``.
        template: ``"auto"`` (chat template if any, else Alpaca), ``"chat"``, ``"alpaca"``, ``"none"`` or a
            format string with ``{prompt}`` and ``{response}``.
        holdout: share of pairs held out to score each layer (scores only; the final vector uses all pairs).
        severity_column: a column of ``harmful`` with each answer's severity (a number > 0; e.g. PKU-SafeRLHF's
            levels 1-3), for ``method="ridge"`` (or a function taking ``severity=``): graded fit data.
        model_id: the id to record for the model (e.g. the Hub id of a local copy); default: its path or id.
        runtime: how the model runs (device, dtype, max_length, batching...).
    """
    runtime = runtime or RuntimeOptions()
    method_name, method_fn = _method(method)
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    harmful_rows = read_rows(
        harmful, prompt_column=prompt_column, response_column=response_column, name="harmful"
    )
    if harmless is None:
        refusal_list = [refusals] if isinstance(refusals, str) else list(refusals or [DEFAULT_REFUSAL])
        if not refusal_list or not all(isinstance(r, str) for r in refusal_list):
            raise ValueError("refusals must be a string or a non-empty list of strings")
        safe_rows = [
            (prompt, refusal_list[i % len(refusal_list)]) for i, (prompt, _) in enumerate(harmful_rows)
        ]
    else:
        refusal_list = []
        safe_rows = read_rows(
            harmless, prompt_column=prompt_column, response_column=response_column, name="harmless"
        )
    severity = None if severity_column is None else read_severity(harmful, severity_column)
    if severity is not None and method_fn in (mean_diff, pca, logistic):
        raise ValueError(
            f"severity_column needs method='ridge' (or a function taking severity=), not {method_name!r}"
        )
    paired = len(safe_rows) == len(harmful_rows)
    if method_fn is pca and not paired:
        raise ValueError("method 'pca' needs paired data: harmless must have one row per harmful row")

    base, tokenizer = load_model(model, tokenizer, runtime)
    n_layers = num_layers(base)
    if layer == "auto":
        candidates = list(range(1, n_layers + 1))
    elif isinstance(layer, int):
        candidates = [normalize_layer(layer, n_layers)]
    elif isinstance(layer, str):
        raise ValueError(f"layer must be an int, a list of ints or 'auto', got {layer!r}")
    else:
        candidates = sorted({normalize_layer(x, n_layers) for x in layer})
    pooling = pooling or default_pooling(base)
    text_template = TextTemplate.resolve(template, tokenizer)
    reader = TextReader(
        base,
        tokenizer,
        layers=candidates,
        pooling=pooling,
        template=text_template,
        runtime=runtime,
        progress="legend-hf fit: reading texts",
    )
    if paired:  # each harmful row and its safe row share the prompt: run it once
        states, truncated = reader.read_pairs(harmful_rows, safe_rows)
    else:
        states, truncated = reader.read([*harmful_rows, *safe_rows])
    if any(truncated):
        logger.warning(
            "%d of %d fit texts were longer than %d tokens and lost their start",
            sum(truncated),
            len(truncated),
            reader.max_length,
        )
    n = len(harmful_rows)
    scores: dict[int, dict[str, float]] = {}
    if min(n, len(safe_rows)) >= 5 and holdout > 0:
        for k in candidates:
            scores[k] = layer_scores(
                states[k][n:], states[k][:n], method_fn, holdout=holdout, seed=seed, severity=severity
            )
    if layer == "auto":
        if not scores:
            raise ValueError("layer='auto' needs at least 5 harmful and 5 safe examples to score layers")
        chosen = max(candidates, key=lambda k: (scores[k]["response_auc"], scores[k]["pair_accuracy"], k))
    elif isinstance(layer, int):
        chosen = candidates[-1]
    else:
        chosen = max(candidates, key=lambda k: (scores.get(k, {}).get("response_auc", 0.0), k))
    vectors = {
        k: direction_from_states(states[k][n:], states[k][:n], method_fn, severity) for k in candidates
    }
    config: Any = base.config
    found_id, model_revision = model_identity(base)
    model_id = model_id or found_id or (str(model) if isinstance(model, (str, os.PathLike)) else "")
    fit_data = {
        "description": description or _describe(harmful, harmless),
        "n_harmful": n,
        "n_harmless": len(safe_rows),
        "paired": paired,
        "n_truncated": sum(truncated),
        "seed": seed,
        "holdout": holdout,
        "dtype": compute_dtypes(base)[0],  # of the matmuls that read the fit texts
    }
    if severity is not None:
        fit_data["severity_column"] = severity_column
        fit_data["severity_levels"] = sorted({float(x) for x in severity.tolist()})
    return SafetyDirection(
        vectors=vectors,
        layer=chosen,
        model_id=model_id,
        model_revision=model_revision or runtime.model_revision,
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        num_layers=n_layers,
        pooling=pooling,
        template=text_template.kind,
        method=method_name,
        refusals=refusal_list,
        max_length=reader.max_length,
        fit_data=fit_data,
        layer_scores=scores,
    )


def _describe(harmful: Any, harmless: Any) -> str:
    def one(data: Any) -> str:
        if hasattr(data, "info") and hasattr(data, "_fingerprint"):
            name = data.info.dataset_name or "datasets.Dataset"
            return f"{name} (fingerprint {data._fingerprint})"
        return "a list of dicts"

    safe = "refusals" if harmless is None else one(harmless)
    return f"harmful: {one(harmful)}; safe: {safe}"
