"""Hub cards, rendering only, from plain data: the model card of a direction artifact (from its config), the
card of an annotated dataset (from its record and report) and the card of a model trained with margins.

The Jinja templates live in the repository's ``hub_cards/`` (one copy; wheels carry it as
``legend_hf/templates/``) and are rendered with ``huggingface_hub``'s ``ModelCard.from_template`` /
``DatasetCard.from_template``. A dataset card describes the margins from the dataset's provenance record
(:mod:`legend_hf.provenance`), which it also carries in its YAML (``legend_hf:``); without a record it
says so instead of guessing. :func:`legend_hf.publish.dataset_card` renders it for a ``Dataset``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, ModelCard, ModelCardData

from .data_io import SHIPPED_DIRECTIONS, shipped_folder
from .names import is_hub_id, public_name
from .plots import LAYER_PLOT_NAME, has_matplotlib, plot_layer_scores
from .provenance import RECORD_KEY, AnnotationRecord
from .stats import clean

TEMPLATES = shipped_folder("templates", "hub_cards")
DIRECTION_TEMPLATE = TEMPLATES / "direction_card_template.md"
DATASET_TEMPLATE = TEMPLATES / "dataset_card_template.md"
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
TEMPLATE_DESCRIPTIONS = {
    "chat": "the annotator's chat template (user = prompt, assistant = response)",
    "alpaca": "the Alpaca-style instruction template of the Legend paper",
    "none": "none: prompt and response joined by a blank line",
}
METHOD_DESCRIPTIONS = {
    "mean_diff": "`mean_diff`: mean of safe minus mean of harmful hidden states (the paper's Standard Margin Vector)",
    "pca": "`pca`: first principal component of the safe − harmful differences (RepE style)",
    "logistic": "`logistic`: weights of an L2-regularised logistic probe",
    "ridge": "`ridge`: a ridge regression of the safety level (safe 0, a harmful answer minus its severity)",
}
POOLING_DESCRIPTIONS = {"last": "last real token", "mean": "mean over real tokens"}


def _cell(name: str, value: float) -> str:
    """A table cell of a statistic: counts (``n_...``) as integers, the others to 3 decimals, NaN as a dash."""
    if math.isnan(value):
        return "–"
    return f"{int(value):,}" if name.startswith("n_") else f"{value:.3f}".replace("-", "−")


def _direction_link(name: str) -> str:
    """How a dataset card names the direction of its record: linked on the Hub, shipped, or a local folder."""
    if name in SHIPPED_DIRECTIONS:
        return f"`{name}`, shipped with legend-hf"
    return _link(name) if is_hub_id(name) else f"`{name}`, a local folder"


def _link(ref: str | None, kind: str = "") -> str:
    """Markdown for a Hub id (linked) or a local path (named, without its absolute path)."""
    if not ref:
        return "an unnamed source"
    if is_hub_id(ref):
        return f"[`{ref}`](https://huggingface.co/{kind}{ref})"
    return f"`{public_name(ref)}` (local)"


def _shared_context(model_id: str, template: str, pooling: str, method: str) -> dict[str, Any]:
    """Template variables both cards use."""
    return {
        "annotator": _link(model_id),
        "annotator_plain": public_name(model_id),
        "pooling_description": POOLING_DESCRIPTIONS.get(pooling, pooling),
        "template_description": TEMPLATE_DESCRIPTIONS.get(template, f"custom format string `{template!r}`"),
        "method_description": METHOD_DESCRIPTIONS.get(method, f"`{method}`"),
        "paper_url": PAPER_URL,
        "citation_bibtex": LEGEND_BIBTEX,
        "citation_apa": LEGEND_APA,
    }


def fit_description(config: Mapping[str, Any]) -> str:
    """What a direction was fitted on, from its config (:meth:`SafetyDirection.config_dict`)."""
    fit = config.get("fit_data") or {}
    if fit.get("n_harmful") is None:
        return "unrecorded data"
    safe = "refusals" if config.get("refusals") else "safe responses"
    text = f"{fit['n_harmful']} harmful responses vs {fit.get('n_harmless')} {safe}"
    return text + (f" ({fit['description']})" if fit.get("description") else "")


# ----- the direction's model card ---------------------------------------------------------------------


def direction_card(
    config: Mapping[str, Any],
    *,
    fingerprint: str,
    plot: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
) -> ModelCard:
    """The model card of a direction artifact (its README.md), from its config
    (:meth:`SafetyDirection.config_dict`) and fingerprint. ``plot`` is the path, relative to the card, of the
    per-layer score image; ``repo_id`` names the artifact in the usage snippets (when it is a Hub id)."""
    card_data = ModelCardData(
        library_name="legend-hf",
        license=license,
        base_model=config["model_id"] if is_hub_id(config["model_id"]) else None,
        tags=list(DIRECTION_TAGS),
    )
    scores = {int(k): v for k, v in config.get("layer_scores", {}).items()}
    rows = [
        {
            "layer": k,
            "pair_accuracy": s["pair_accuracy"],
            "response_auc": s["response_auc"],
            "n_heldout": int(s["n_heldout"]),
            "used": k == config["layer"],
        }
        for k, s in sorted(scores.items())
    ]
    holdout = (config.get("fit_data") or {}).get("holdout")
    return ModelCard.from_template(
        card_data,
        template_path=str(DIRECTION_TEMPLATE),
        **_shared_context(config["model_id"], config["template"], config["pooling"], config["method"]),
        direction=config,
        fingerprint=fingerprint,
        fit_description=fit_description(config),
        fitted_layers=sorted(config["layers"]),
        layer_rows=rows,
        holdout_share=f"{100 * holdout:g}%" if isinstance(holdout, (int, float)) else "a share",
        plot=plot,
        repo_id=repo_id or "path/to/direction",
    )


def layer_plot(config: Mapping[str, Any]) -> str | None:
    """The per-layer plot a direction's card shows (``layer_scores.png``): with several scored layers and
    matplotlib installed, else none."""
    return LAYER_PLOT_NAME if len(config.get("layer_scores", {})) > 1 and has_matplotlib() else None


def write_layer_plot(config: Mapping[str, Any], folder: str | os.PathLike[str]) -> Path | None:
    """Write the :func:`layer_plot` of a direction's config into its artifact folder (and remove one an earlier
    save left, when there is none to show)."""
    path = Path(folder) / LAYER_PLOT_NAME
    if layer_plot(config) is None:
        path.unlink(missing_ok=True)  # a plot left by an earlier save would not match this card
        return None
    return plot_layer_scores(
        {int(k): v for k, v in config["layer_scores"].items()},
        path,
        layer=config["layer"],
        metrics={"response_auc": "held-out response_auc", "pair_accuracy": "held-out pair_accuracy"},
        title="Held-out separation of safe and harmful responses",
    )


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


def _number(x: float) -> str:
    return f"{x:.3g}".replace("-", "−")


def margin_meaning(record: AnnotationRecord | None) -> dict[str, str]:
    """What the ``margin`` column means, in the card's words, for the settings ``record`` holds: ``column``
    (the column table), ``sign`` (a sentence on its sign), ``scaling``, ``bins`` and ``units`` (advice for
    TRL). True for every setting; without a record the card says the settings are not recorded."""
    if record is None:
        return {
            "column": "the safety margin, as the annotator wrote it (settings not recorded)",
            "sign": "How `margin` was scaled or binned was not recorded (the dataset was annotated by a plain "
            "`Dataset.map(MarginAnnotator(...))`); `chosen_safety − rejected_safety` is the raw margin, "
            "positive when the direction finds chosen safer.",
            "scaling": "not recorded",
            "bins": "not recorded",
            "units": "check how `margin` was made before training on it, or re-annotate with "
            "`legend_hf.annotate_margins`, which records it.",
        }
    if record.scale == "standardize":
        scaling = (
            f"standardized: scaled margin = raw × {record.scale_factor:.4g}, which gives the margins a standard "
            f"deviation of {record.target_std or 1:g}"
        )
    elif record.scale_factor != 1.0:
        scaling = f"fixed factor: scaled margin = raw × {record.scale_factor:.4g}"
    else:
        scaling = "none: the scaled margin is the raw projection difference"
    if record.clip is not None:
        low, high = record.clip
        scaling += f"; clipped to [{'−∞' if low is None else _number(low)}, {'+∞' if high is None else _number(high)}]"
    if record.bins and record.levels is not None:
        levels = ", ".join(f"{v:g}" for v in record.levels)
        return {
            "column": f"the level of the margin's bin ({levels}): level {record.levels[0]:g} where the direction "
            "does not find chosen safer, higher levels for clearer cases",
            "sign": f"`margin` is a bin level, not a signed margin: level {record.levels[0]:g} holds every pair "
            "whose scaled margin is ≤ 0 (the direction does not find chosen safer), and the positive margins "
            f"are split into {record.bins - 1} equal-frequency bins with levels {', '.join(f'{v:g}' for v in record.levels[1:])}. "
            "`margin_raw` keeps the signed margin (positive: chosen is safer).",
            "scaling": scaling,
            "bins": f"{record.bins} levels: 0 for scaled margins ≤ 0, then equal-frequency bins of the positive "
            "ones; `margin` is the level's value and `margin_level` its index (the paper discretises margins "
            "for robustness)",
            "units": f"`margin = level` asks the reward model for a logit gap of up to {max(record.levels):g} on "
            "the clearest pairs and none on pairs the direction does not find chosen safer; other levels "
            f"(`legend_hf.scale_margins(train, bins={record.bins}, levels=[...])`) change that and keep this "
            "record true.",
        }
    low = record.clip[0] if record.clip else None
    positive = low is None or low < 0
    sign = (
        "A positive margin means the direction finds the chosen response safer."
        if positive
        else f"Margins below {_number(low or 0)} were raised to it, so `margin` never relaxes a pair; a margin "
        "above it means the direction finds chosen safer, and `margin_raw` keeps the signed margin."
    )
    units = (
        "standardized margins have a known spread, a reasonable scale for reward logits."
        if record.scale == "standardize"
        else 'scale them first with `legend_hf.scale_margins(train, scale="standardize")`, which keeps this '
        "record true."
    )
    return {
        "column": (
            "the safety margin `chosen_safety − rejected_safety`"
            if not record.scaled
            else "the scaled safety margin"
        )
        + ("; positive means chosen is safer" if positive else ""),
        "sign": sign,
        "scaling": scaling,
        "bins": "none",
        "units": units,
    }


def _bin_rows(overview: dict[str, Any], record: AnnotationRecord | None) -> list[dict[str, Any]]:
    counts = overview.get("bins")
    if not counts:
        return []
    edges = record.bin_edges if record is not None and record.bin_edges else []
    levels = record.levels if record is not None and record.levels else list(range(len(counts)))
    total = sum(counts.values()) or 1
    rows = []
    for i, count in sorted(counts.items()):
        if edges:
            lower = f"({_number(edges[i - 1])}" if i > 0 else "(−∞"
            upper = f"{_number(edges[i])}]" if i < len(edges) else "+∞)"
            span = f"{lower}, {upper}"
        else:
            span = "not recorded"
        level = f"{levels[i]:g}" if i < len(levels) else "?"
        rows.append({"index": i, "level": level, "range": span, "count": count, "share": count / total})
    return rows


_COLUMN_MEANINGS = {
    "chosen_safety": ("float64", "projection of *prompt + chosen* on the unit safety direction"),
    "rejected_safety": ("float64", "projection of *prompt + rejected* on the unit safety direction"),
    "truncated": ("bool", "a text of the pair was longer than the annotator's limit and lost its start"),
    "margin_raw": (
        "float64",
        "the signed margin before scaling and binning (`chosen_safety − rejected_safety`)",
    ),
    "margin_level": ("int64", "index of the margin's bin (0: the direction does not find chosen safer)"),
}


def dataset_card(
    record: AnnotationRecord,
    report: Mapping[str, Any],
    *,
    n_rows: int,
    columns: Sequence[str],
    recorded: bool = True,
    fit: str | None = None,
    source_dataset: str | None = None,
    source_revision: str | None = None,
    license: str | None = None,
    pretty_name: str | None = None,
    language: str | list[str] | None = None,
    repo_id: str | None = None,
    histogram: str | None = None,
    group_by: str | None = None,
) -> DatasetCard:
    """The card of an annotated dataset: provenance, settings, margin statistics, agreement with the data's labels,
    how to train with it. Every statement about the margins is rendered from ``record`` and ``report`` (an
    :class:`legend_hf.report.AnnotationReport`'s ``to_dict()``).

    ``recorded=False``: the dataset carries no record and ``record`` was made from the direction (the card then
    says the scaling is not recorded); ``fit`` says what the direction was fitted on (:func:`fit_description`).
    ``histogram`` is the image the card shows; ``repo_id`` names the dataset in the usage snippet;
    ``group_by`` names the column the report's groups come from; ``n_rows`` and ``columns`` describe the data.
    """
    overview = report["margins"]
    source_name = source_dataset.split("/")[-1] if source_dataset else None
    card_data = DatasetCardData(
        license=license,
        language=language,
        pretty_name=pretty_name
        or (
            f"{source_name} with Legend safety margins"
            if source_name
            else "Preference pairs with Legend safety margins"
        ),
        tags=list(DATASET_TAGS),
        task_categories=["text-generation"],
        annotations_creators=["machine-generated"],
        size_categories=[size_category(n_rows)],
        source_datasets=[f"extended|{source_dataset}"] if is_hub_id(source_dataset) else None,
        **{RECORD_KEY: record.to_dict() if recorded else None},  # type: ignore[arg-type]
    )
    shown = record if recorded else None
    meaning = margin_meaning(shown)
    new_columns = [{"name": "margin", "dtype": "float64", "meaning": meaning["column"]}] + [
        {"name": c, "dtype": dtype, "meaning": text}
        for c, (dtype, text) in _COLUMN_MEANINGS.items()
        if c in columns
    ]
    stats_intro = (
        "Raw margins (`margin_raw`, before scaling and binning), in the direction's projection units."
        if overview["column"] == "margin_raw"
        else "Margins (`margin`), in the direction's projection units."
    )
    if histogram:
        edges = " and the bin edges" if shown is not None and shown.bin_edges else ""
        stats_intro += f" The histogram below shows the same values{edges}."
    return DatasetCard.from_template(
        card_data,
        template_path=str(DATASET_TEMPLATE),
        **_shared_context(record.model_id, record.template, record.pooling, record.method),
        record=record,
        recorded=recorded,
        fit_description=fit,
        source_dataset=source_dataset,
        source_revision=source_revision,
        source_link=_link(source_dataset, "datasets/"),
        direction_link=_direction_link(record.direction),
        n_rows=n_rows,
        new_columns=new_columns,
        stats=overview,
        overall=report["scores"]["all"],
        stats_intro=stats_intro,
        bin_rows=_bin_rows(overview, shown),
        meaning=meaning,
        histogram=histogram,
        group_by=group_by,
        labelled=report["labels"] == "dataset labels",
        agreement=[
            {"name": name, **{k: _cell(k, v) for k, v in scores.items()}}
            for name, scores in report["scores"].items()
        ],
        length_spearman=clean(report["scores"]["all"]["length_spearman"]),
        repo_id=repo_id or "your-username/your-dataset",
    )


# ----- a model trained with the margins ------------------------------------------------------------------

TRAINED_TEMPLATE = TEMPLATES / "trained_model_card_template.md"


def trained_model_card(
    settings: dict[str, Any], metrics: dict[str, Any], record: AnnotationRecord | None, margins: str
) -> ModelCard:
    """The card of a model `legend-hf train` wrote: base model, trainer, which margins (their provenance record,
    also in the YAML under ``legend_hf``) and the held-out accuracy."""
    dpo = settings["trainer"] == "dpo"
    trainer = (
        f"DPO with the margin as {'an ODPO offset' if settings['margin_mode'] == 'offset' else 'a per-pair weight'}"
        if dpo
        else "TRL's RewardTrainer, loss −log σ(r_c − r_r − margin)"
    )
    sentences = {
        "use": "The pairs' Legend margins enter the loss.",
        "none": "Trained without margins (the plain loss), as a baseline.",
        "shuffled": "Trained with the margins permuted over the pairs, as a control: same values, no information.",
    }
    card_data = ModelCardData(
        library_name="transformers",
        base_model=settings["model"] if is_hub_id(settings["model"]) else None,
        tags=["legend-hf", "trl", "dpo" if dpo else "reward-model", "safety"],
        **{RECORD_KEY: record.to_dict() if record is not None else None},  # type: ignore[arg-type]
    )
    keys = [*(("beta", "margin_mode", "margin_scale") if dpo else ()), "learning_rate", "num_train_epochs"]
    keys += ["per_device_train_batch_size", "bf16", "max_length", "seed"]
    return ModelCard.from_template(
        card_data,
        template_path=str(TRAINED_TEMPLATE),
        settings=settings,
        metrics=metrics,
        record=record,
        model_link=_link(settings["model"]),
        trainer_description=trainer,
        margin_sentence=sentences[margins],
        settings_line=", ".join(f"{k} {settings[k]}" for k in keys),
        citation_bibtex=LEGEND_BIBTEX,
    )
