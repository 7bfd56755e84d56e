"""Hub cards: the model card of a direction artifact and the dataset card of an annotated dataset.

The Jinja templates ship in ``legend_hf/templates`` (``hub_cards/`` in the repository holds identical copies to
read) and are rendered with ``huggingface_hub``'s ``ModelCard.from_template`` / ``DatasetCard.from_template``.
Plots need matplotlib (``pip install 'legend-hf[plot]'``); they are drawn on a bare ``Figure`` with the Agg
canvas, so the caller's pyplot backend and state are left alone.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from huggingface_hub import DatasetCard, DatasetCardData, HfApi, ModelCard, ModelCardData

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .direction import SafetyDirection

TEMPLATES = Path(__file__).parent / "templates"
DIRECTION_TEMPLATE = TEMPLATES / "direction_card_template.md"
DATASET_TEMPLATE = TEMPLATES / "dataset_card_template.md"
HISTOGRAM_NAME = "margin_histogram.png"
LAYER_PLOT_NAME = "layer_scores.png"
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
DATASET_TAGS = ["legend", "safety", "preference", "margin", "reward-modeling", "legend-hf"]
DIRECTION_TAGS = ["legend", "safety", "representation-engineering", "safety-direction", "legend-hf"]
PAPER_URL = "https://arxiv.org/abs/2406.08124"
LEGEND_BIBTEX = """\
@inproceedings{feng2025legend,
  title         = {Legend: Leveraging Representation Engineering to Annotate Safety Margin for Preference Datasets},
  author        = {Feng, Duanyu and Qin, Bowen and Huang, Chen and Huang, Youcheng and Zhang, Zheng and Lei, Wenqiang},
  booktitle     = {Proceedings of the AAAI Conference on Artificial Intelligence},
  volume        = {39},
  year          = {2025},
  eprint        = {2406.08124},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2406.08124}
}"""
LEGEND_APA = (
    "Feng, D., Qin, B., Huang, C., Huang, Y., Zhang, Z., & Lei, W. (2025). Legend: Leveraging representation "
    "engineering to annotate safety margin for preference datasets. *Proceedings of the AAAI Conference on "
    "Artificial Intelligence, 39*. https://arxiv.org/abs/2406.08124"
)
_POSITIVE, _NEGATIVE = "#1b9e77", "#d95f02"  # colour-blind safe (ColorBrewer Dark2)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")
_COLUMN_MEANINGS = {
    "margin": (
        "float64",
        "the safety margin: `chosen_safety − rejected_safety`{how}; positive means chosen is safer",
    ),
    "chosen_safety": ("float64", "projection of *prompt + chosen* on the unit safety direction"),
    "rejected_safety": ("float64", "projection of *prompt + rejected* on the unit safety direction"),
    "truncated": ("bool", "a text of the pair was longer than the annotator's limit and lost its start"),
    "margin_raw": ("float64", "the margin before scaling and binning (`chosen_safety − rejected_safety`)"),
    "margin_level": ("int64", "index of the margin's equal-frequency bin (0 = lowest margins)"),
}


# ----- reading an annotated dataset -------------------------------------------------------------------


def annotation_settings(dataset: Any) -> dict[str, Any] | None:
    """The settings ``annotate_margins`` recorded in ``dataset.info.description`` (``None`` when absent)."""
    text = getattr(getattr(dataset, "info", None), "description", None) or ""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data.get("legend_hf") if isinstance(data, dict) else None


def _column(dataset: Any, name: str) -> np.ndarray:
    return np.asarray(dataset.with_format("numpy", columns=[name])[name])


def _margin_values(data: Any) -> tuple[np.ndarray, str | None]:
    """Margins as float64 and the column they came from: ``margin_raw`` when present (the projection difference
    before scaling and binning), else ``margin``; ``None`` for a plain sequence."""
    if hasattr(data, "column_names"):
        column = "margin_raw" if "margin_raw" in data.column_names else "margin"
        if column not in data.column_names:
            raise KeyError(
                f"the dataset has no 'margin' column (columns: {data.column_names}); "
                "annotate it first with legend_hf.annotate_margins"
            )
        values: Any = _column(data, column)
    else:
        column, values = None, data
    name = column or "margins"
    typed = isinstance(values, np.ndarray) or hasattr(values, "numpy")  # arrays and tensors have one dtype
    if not typed:
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise ValueError(f"{name}: expected a sequence of numbers, got {type(values).__name__}")
        values = list(values)
        for i, value in enumerate(values):
            if not isinstance(value, numbers.Real) or isinstance(value, bool):
                raise ValueError(f"{name}: row {i} is {value!r:.40}, expected a number")
    out = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = np.flatnonzero(~np.isfinite(out))
    if len(bad):
        raise ValueError(f"{name}: row {bad[0]} is {out[bad[0]]}, expected a finite number")
    return out, column


def margin_stats(
    dataset_or_margins: Any, *, quantiles: Sequence[float] = QUANTILES, by: str | None = None
) -> dict[str, Any]:
    """Summary of margins: count, mean, std, min/max, quantiles, share positive/negative/zero, and for an annotated
    ``Dataset`` also pairs per bin (``margin_level``), truncated pairs (``truncated``) and, with ``by`` (a column
    such as a harm category), count, mean, median and share positive per value of that column (``groups``).

    Statistics use ``margin_raw`` when the dataset has it (scaling and binning hide the sign and spread); the
    ``column`` key says which. An empty input gives ``count`` 0 and NaN statistics.
    """
    values, column = _margin_values(dataset_or_margins)
    n = len(values)
    nan = float("nan")
    stats: dict[str, Any] = {
        "column": column,
        "count": n,
        "mean": float(values.mean()) if n else nan,
        "std": float(values.std(ddof=1)) if n > 1 else (0.0 if n else nan),
        "min": float(values.min()) if n else nan,
        "max": float(values.max()) if n else nan,
        "quantiles": {f"{100 * q:g}%": float(np.quantile(values, q)) if n else nan for q in quantiles},
        "share_positive": float((values > 0).mean()) if n else nan,
        "share_negative": float((values < 0).mean()) if n else nan,
        "share_zero": float((values == 0).mean()) if n else nan,
    }
    columns = getattr(dataset_or_margins, "column_names", [])
    if "margin_level" in columns:
        settings = annotation_settings(dataset_or_margins) or {}
        n_bins = settings.get("bins") or 0
        counts = np.bincount(_column(dataset_or_margins, "margin_level").astype(np.int64), minlength=n_bins)
        stats["bins"] = {i: int(c) for i, c in enumerate(counts)}
    if "truncated" in columns:
        stats["truncated"] = int(_column(dataset_or_margins, "truncated").sum())
    if by is not None:
        if by not in columns:
            raise KeyError(f"by={by!r}: no such column; the dataset has {list(columns)}")
        keys = [str(key) for key in dataset_or_margins[by]]
        groups: dict[str, list[float]] = {}
        for key, value in zip(keys, values.tolist(), strict=True):
            groups.setdefault(key, []).append(value)
        stats["groups"] = {
            key: {
                "count": len(group),
                "mean": float(np.mean(group)),
                "median": float(np.median(group)),
                "share_positive": float(np.mean(np.asarray(group) > 0)),
            }
            for key, group in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0]))
        }
    return stats


# ----- plots ------------------------------------------------------------------------------------------


def has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float, height: float) -> Figure:
    if not has_matplotlib():
        raise ImportError("plots need matplotlib: pip install 'legend-hf[plot]' (or pip install matplotlib)")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=150, layout="constrained")


def _aligned_edges(values: np.ndarray) -> np.ndarray:
    """Histogram edges with 0 as an edge, so every bar is wholly on one side of zero."""
    lo, hi = float(values.min()), float(values.max())
    count = int(np.clip(len(np.histogram_bin_edges(values, bins="auto")) - 1, 20, 60))
    width = (hi - lo) / count or max(abs(lo), 1.0) / 10
    start = np.floor(lo / width) * width
    return start + width * np.arange(int(np.ceil((hi - start) / width)) + 2)


def margin_histogram(
    margins: Any,
    path: str | os.PathLike[str],
    *,
    bin_edges: Sequence[float] | None = None,
    title: str | None = None,
) -> Path:
    """Write a PNG histogram of margins (a sequence, or an annotated ``Dataset``), bars coloured by sign.

    For an annotated dataset the raw margins are plotted with the recorded bin edges (converted to raw units);
    ``bin_edges`` draws other edges, in the units of the plotted values.
    """
    values, column = _margin_values(margins)
    if not len(values):
        raise ValueError("no margins to plot")
    settings = annotation_settings(margins) if column else None
    if bin_edges is None and settings and settings.get("bin_edges") and column == "margin_raw":
        factor = settings.get("scale_factor") or 1.0
        bin_edges = [edge / factor for edge in settings["bin_edges"]]
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    fig = _figure(7.5, 3.6)
    ax = fig.subplots()
    counts, edges = np.histogram(values, bins=_aligned_edges(values))
    colors = [_POSITIVE if left >= 0 else _NEGATIVE for left in edges[:-1]]
    ax.bar(
        edges[:-1], counts, width=np.diff(edges), align="edge", color=colors, edgecolor="white", linewidth=0.4
    )
    ax.axvline(0.0, color="black", linewidth=1.0)
    handles: list[Any] = [
        Patch(color=_POSITIVE, label=f"chosen safer: {100 * float((values > 0).mean()):.1f}%"),
        Patch(color=_NEGATIVE, label=f"rejected safer: {100 * float((values < 0).mean()):.1f}%"),
    ]
    if bin_edges is not None and len(bin_edges):
        for edge in bin_edges:
            ax.axvline(edge, color="#555555", linestyle="--", linewidth=0.9)
        handles.append(Line2D([], [], color="#555555", linestyle="--", label="bin edges"))
    ax.legend(handles=handles, frameon=False, loc="best")
    ax.set_xlabel(
        "margin = safety(chosen) − safety(rejected)"
        + ("  [before scaling]" if column == "margin_raw" else "")
    )
    ax.set_ylabel("pairs")
    ax.set_title(title or f"Safety margins of {len(values):,} preference pairs", loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    path = Path(path)
    fig.savefig(path)
    return path


def layer_scores_plot(direction: SafetyDirection, path: str | os.PathLike[str]) -> Path:
    """Write a PNG of the held-out separation (AUC and pair accuracy) of every scored layer."""
    if not direction.layer_scores:
        raise ValueError("the direction has no per-layer scores to plot (it was fitted without a holdout)")
    layers = sorted(direction.layer_scores)
    auc = [direction.layer_scores[k]["auc"] for k in layers]
    accuracy = [direction.layer_scores[k]["accuracy"] for k in layers]
    fig = _figure(6.5, 3.2)
    ax = fig.subplots()
    ax.axhline(0.5, color="#999999", linestyle=":", linewidth=1.0, label="chance")
    ax.plot(layers, auc, marker="o", color=_POSITIVE, label="held-out AUC")
    ax.plot(layers, accuracy, marker="s", color="#7570b3", label="held-out pair accuracy")
    ax.axvline(
        direction.layer, color="black", linestyle="--", linewidth=0.9, label=f"used: layer {direction.layer}"
    )
    ax.set_ylim(min(0.4, *auc, *accuracy) - 0.02, 1.02)
    ax.set_xticks(layers)
    ax.set_xlabel("hidden-state index (0 = embeddings)")
    ax.set_ylabel("score")
    ax.set_title("Held-out separation of safe and harmful responses", loc="left", fontsize=11)
    ax.legend(frameon=False, loc="lower right", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    path = Path(path)
    fig.savefig(path)
    return path


# ----- shared descriptions ----------------------------------------------------------------------------


def _is_hub_id(ref: str | None) -> bool:
    return bool(ref) and _HUB_ID.fullmatch(str(ref)) is not None and not Path(str(ref)).exists()


def _plain(ref: str | None) -> str:
    """A model or repo reference as plain text: the Hub id, or a local folder's name (no absolute paths)."""
    if not ref:
        return "an unnamed model"
    return str(ref) if _is_hub_id(ref) else Path(str(ref)).name


def _link(ref: str | None, kind: str = "") -> str:
    """Markdown for a Hub id (linked) or a local path (named, without its absolute path)."""
    if ref and _is_hub_id(ref):
        return f"[`{ref}`](https://huggingface.co/{kind}{ref})"
    return f"`{_plain(ref)}` (local)" if ref else "an unnamed model"


def _direction_context(direction: SafetyDirection) -> dict[str, Any]:
    """Template variables both cards use."""
    template = direction.template
    template_description = {
        "chat": "the annotator's chat template (user = prompt, assistant = response)",
        "alpaca": "the Alpaca-style instruction template of the Legend paper",
        "none": "none: prompt and response joined by a blank line",
    }.get(template, f"custom format string `{template!r}`")
    fit = direction.fit_data
    n_harmful, n_harmless = fit.get("n_harmful"), fit.get("n_harmless")
    safe = "refusals" if direction.refusals else "safe responses"
    fit_description = (
        f"{n_harmful} harmful responses vs {n_harmless} {safe}"
        if n_harmful is not None
        else "unrecorded data"
    )
    if fit.get("description"):
        fit_description += f" ({fit['description']})"
    methods = {
        "mean_diff": "`mean_diff`: mean of safe minus mean of harmful hidden states (the paper's Standard Margin Vector)",
        "pca": "`pca`: first principal component of the safe − harmful differences (RepE style)",
        "logistic": "`logistic`: weights of an L2-regularised logistic probe",
    }
    return {
        "direction": direction,
        "annotator": _link(direction.model_id),
        "annotator_plain": _plain(direction.model_id),
        "fingerprint": direction.fingerprint(),
        "pooling_description": {"last": "last real token", "mean": "mean over real tokens"}.get(
            direction.pooling, direction.pooling
        ),
        "template_description": template_description,
        "method_description": methods.get(direction.method, f"`{direction.method}`"),
        "fit_description": fit_description,
        "paper_url": PAPER_URL,
        "citation_bibtex": LEGEND_BIBTEX,
        "citation_apa": LEGEND_APA,
    }


# ----- the direction's model card ---------------------------------------------------------------------


def direction_card(
    direction: SafetyDirection,
    *,
    plot: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """The model card of a direction artifact (its README.md).

    ``plot`` is the path, relative to the card, of a per-layer score image to show (see
    :func:`write_direction_card`); ``repo_id`` names the artifact in the usage snippets (default: where it was
    loaded from when that is a Hub repo).
    """
    base_model = direction.model_id if _is_hub_id(direction.model_id) else None
    card_data = ModelCardData(
        library_name="legend-hf", license=license, base_model=base_model, tags=list(DIRECTION_TAGS)
    )
    rows = [
        {
            "layer": k,
            "accuracy": s["accuracy"],
            "auc": s["auc"],
            "n_heldout": int(s["n_heldout"]),
            "used": k == direction.layer,
        }
        for k, s in sorted(direction.layer_scores.items())
    ]
    holdout = direction.fit_data.get("holdout")
    source = direction.source if _is_hub_id(direction.source) else None
    return ModelCard.from_template(
        card_data,
        template_path=str(DIRECTION_TEMPLATE),
        **_direction_context(direction),
        fitted_layers=sorted(direction.vectors),
        layer_rows=rows,
        holdout_share=f"{100 * holdout:g}%" if isinstance(holdout, (int, float)) else "a share",
        plot=plot,
        repo_id=repo_id or source or "path/to/direction",
    )


def write_direction_card(
    direction: SafetyDirection, folder: str | os.PathLike[str], *, repo_id: str | None = None
) -> Path:
    """Write README.md into an artifact folder and, when matplotlib is installed and several layers were scored,
    the per-layer plot it shows (``layer_scores.png``). Returns the README path."""
    folder = Path(folder)
    plot_path = folder / LAYER_PLOT_NAME
    plot = None
    if len(direction.layer_scores) > 1 and has_matplotlib():
        layer_scores_plot(direction, plot_path)
        plot = LAYER_PLOT_NAME
    else:
        plot_path.unlink(missing_ok=True)  # a plot left by an earlier save would not match this card
    readme = folder / "README.md"
    direction_card(direction, plot=plot, repo_id=repo_id).save(readme)
    return readme


# ----- the annotated dataset's card -------------------------------------------------------------------


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` value for ``n`` rows."""
    bounds = [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
        (1_000_000_000, "100M<n<1B"),
    ]
    return next((name for bound, name in bounds if n < bound), "n>1B")


def _check_settings(settings: dict[str, Any] | None, direction: SafetyDirection) -> None:
    settings = settings or {}
    recorded = settings.get("direction_fingerprint")
    if recorded and recorded != direction.fingerprint():
        raise ValueError(
            f"the dataset was annotated with direction fingerprint {recorded} (from {settings.get('direction')!r}), "
            f"not with this direction ({direction.fingerprint()}): pass the direction that annotated it"
        )


def _scale_and_bins(settings: dict[str, Any] | None, columns: list[str]) -> tuple[str, str, str]:
    """Descriptions of the scaling and the bins, and advice on margin units for TRL."""
    if settings is None:
        if "margin_raw" in columns:
            return (
                "not recorded (annotated with `MarginAnnotator` directly; `margin_raw` holds the raw margins)",
                "not recorded" if "margin_level" in columns else "none",
                "scale them to the reward scale you want before training.",
            )
        return (
            "none: `margin` is the raw projection difference",
            "none",
            'scale them first, e.g. `annotate_margins(..., scale="standardize")` or '
            '`train.map(lambda r: {"margin": 0.5 * r["margin"]})`.',
        )
    scale, factor, bins = settings.get("scale"), settings.get("scale_factor"), settings.get("bins")
    if scale is None:
        scale_text = "none: `margin` is the raw projection difference"
    elif scale == "standardize":
        scale_text = (
            f"standardized: scaled margin = raw × {factor:.4g} (1 / standard deviation of the raw margins)"
        )
    else:
        scale_text = f"fixed factor: scaled margin = raw × {float(scale):.4g}"
    if bins:
        levels = settings.get("levels") or list(range(bins))
        bins_text = (
            f"{bins} equal-frequency bins over the scaled margins; `margin` is the bin's level "
            f"({', '.join(f'{v:g}' for v in levels)}) and `margin_level` its index, as the paper discretises "
            "margins for robustness"
        )
        advice = (
            "the binned `margin` holds the levels above, so `margin = level` asks the reward model for a "
            "logit gap of up to " + f"{max(levels):g}" + "; rescale the levels (`train.map(lambda r: "
            '{"margin": 0.5 * r["margin_level"]})`) to change that.'
        )
    else:
        bins_text = "none"
        advice = (
            "standardized margins have unit spread, a reasonable scale for reward logits."
            if scale == "standardize"
            else 'scale them first, e.g. `annotate_margins(..., scale="standardize")`.'
        )
    return scale_text, bins_text, advice


def _number(x: float) -> str:
    return f"{x:.3g}".replace("-", "−")


def _bin_rows(stats: dict[str, Any], settings: dict[str, Any] | None) -> list[dict[str, Any]]:
    counts = stats.get("bins")
    if not counts:
        return []
    settings = settings or {}
    edges = settings.get("bin_edges") or []
    levels = settings.get("levels") or list(range(len(counts)))
    total = sum(counts.values()) or 1
    rows = []
    for i, count in sorted(counts.items()):
        if edges:
            lower = f"[{_number(edges[i - 1])}" if i > 0 else "(−∞"
            upper = _number(edges[i]) if i < len(edges) else "+∞"
            span = f"{lower}, {upper})"
        else:
            span = "not recorded"
        level = f"{levels[i]:g}" if i < len(levels) else "?"
        rows.append({"index": i, "level": level, "range": span, "count": count, "share": count / total})
    return rows


def dataset_card(
    dataset: Any,
    direction: SafetyDirection,
    *,
    source_dataset: str | None = None,
    source_revision: str | None = None,
    license: str | None = None,
    pretty_name: str | None = None,
    language: str | list[str] | None = None,
    repo_id: str | None = None,
    histogram: str | None = HISTOGRAM_NAME,
    group_by: str | None = None,
) -> DatasetCard:
    """The card of a dataset annotated with ``direction``: provenance, settings, margin statistics, usage.

    Settings come from what ``annotate_margins`` recorded in ``dataset.info.description``; a dataset annotated
    with ``MarginAnnotator`` directly is described from its columns. ``histogram`` is the image path the card
    shows (write it with :func:`margin_histogram`; ``None`` for no image); ``repo_id`` names the dataset in the
    usage snippet; ``group_by`` adds a table of margins per value of a column (a harm category, a pair type).
    ``license`` defaults to ``dataset.info.license``: carry the source dataset's license.
    """
    settings = annotation_settings(dataset)
    _check_settings(settings, direction)
    stats = margin_stats(dataset, by=group_by)
    columns = list(dataset.column_names)
    license = license or getattr(dataset.info, "license", None) or None
    source_name = source_dataset.split("/")[-1] if source_dataset else None
    pretty_name = pretty_name or (
        f"{source_name} with Legend safety margins"
        if source_name
        else "Preference pairs with Legend safety margins"
    )
    card_data = DatasetCardData(
        license=license,
        language=language,
        pretty_name=pretty_name,
        tags=list(DATASET_TAGS),
        task_categories=["text-generation"],
        annotations_creators=["machine-generated"],
        size_categories=[size_category(len(dataset))],
        source_datasets=[f"extended|{source_dataset}"] if _is_hub_id(source_dataset) else None,
    )
    scale_text, bins_text, advice = _scale_and_bins(settings, columns)
    how = (
        ", scaled and binned"
        if "margin_level" in columns
        else (", scaled" if "margin_raw" in columns else "")
    )
    new_columns = [
        {"name": c, "dtype": _COLUMN_MEANINGS[c][0], "meaning": _COLUMN_MEANINGS[c][1].format(how=how)}
        for c in _COLUMN_MEANINGS
        if c in columns
    ]
    if stats["column"] == "margin_raw":
        stats_intro = (
            "Raw margins (`margin_raw`, before scaling and binning), in the direction's projection units."
        )
    else:
        stats_intro = "Margins (`margin`), in the direction's projection units."
    if histogram:
        edges = " and the bin edges" if settings and settings.get("bin_edges") else ""
        stats_intro += f" The histogram below shows the same values{edges}."
    source = direction.source if _is_hub_id(direction.source) else None
    return DatasetCard.from_template(
        card_data,
        template_path=str(DATASET_TEMPLATE),
        **_direction_context(direction),
        source_dataset=source_dataset,
        source_revision=source_revision,
        source_link=_link(source_dataset, "datasets/"),
        direction_link=_link(direction.source) if direction.source else "an unsaved direction",
        direction_revision=direction.source_revision if source else None,
        library_version=direction.library_version,
        n_rows=len(dataset),
        new_columns=new_columns,
        stats=stats,
        stats_intro=stats_intro,
        bin_rows=_bin_rows(stats, settings),
        scale_description=scale_text,
        bins_description=bins_text,
        units_advice=advice,
        max_length=direction.max_length or "the annotator's maximum",
        histogram=histogram,
        group_by=group_by,
        repo_id=repo_id or "your-username/your-dataset",
    )


def push_annotated_dataset(
    dataset: Any,
    repo_id: str,
    direction: SafetyDirection,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    source_dataset: str | None = None,
    source_revision: str | None = None,
    license: str | None = None,
    pretty_name: str | None = None,
    language: str | list[str] | None = None,
    group_by: str | None = None,
    commit_message: str = "Add the legend-hf dataset card and margin histogram",
    **push_kwargs: Any,
) -> Any:
    """Push an annotated dataset with its card and margin histogram; returns the card commit's ``CommitInfo``.

    1. ``dataset.push_to_hub`` uploads the data (``push_kwargs``: ``split``, ``config_name``, ``max_shard_size``...)
       and writes a README whose YAML describes it (``dataset_info``, ``configs``);
    2. the card is rendered, keeps that YAML, and is uploaded with the histogram in one ``upload_folder`` commit.

    With ``source_dataset`` and no ``license`` / ``source_revision``, both are read from the source's Hub page.
    Later ``push_to_hub`` calls (another split) rewrite only the card's YAML and keep its body.
    """
    api = HfApi(token=token)
    if source_dataset and (license is None or source_revision is None):
        info = api.dataset_info(source_dataset, revision=source_revision)
        source_card = info.card_data
        license = license or (source_card.get("license") if source_card is not None else None)
        source_revision = source_revision or info.sha
    pushed = dataset.push_to_hub(repo_id, private=private, token=token, revision=revision, **push_kwargs)
    repo_id = pushed.repo_url.repo_id
    readme = api.hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=pushed.oid)
    data_card = DatasetCard(Path(readme).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        histogram = None
        if has_matplotlib() and len(dataset):
            margin_histogram(dataset, Path(tmp) / HISTOGRAM_NAME)
            histogram = HISTOGRAM_NAME
        card = dataset_card(
            dataset,
            direction,
            source_dataset=source_dataset,
            source_revision=source_revision,
            license=license,
            pretty_name=pretty_name,
            language=language,
            repo_id=repo_id,
            histogram=histogram,
            group_by=group_by,
        )
        for key in ("dataset_info", "configs"):
            if key in data_card.data:
                card.data[key] = data_card.data[key]
        card.save(Path(tmp) / "README.md")
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            repo_type="dataset",
            revision=pushed.pr_revision or revision,  # with create_pr=True the card joins the data's PR
            commit_message=commit_message,
        )
