"""Hub cards: direction and dataset cards render, parse back with huggingface_hub, and push correctly."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
from conftest import HARMFUL, PAIRS
from datasets import Dataset
from huggingface_hub import CommitInfo, DatasetCard, ModelCard

from legend_hf import MarginAnnotator, SafetyDirection, annotate_margins, cards, fit_direction
from legend_hf.cards import (
    LEGEND_BIBTEX,
    dataset_card,
    direction_card,
    margin_histogram,
    margin_stats,
    push_annotated_dataset,
    size_category,
    write_direction_card,
)

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
TEMPLATES = ["dataset_card_template.md", "direction_card_template.md"]


@pytest.fixture(scope="module")
def direction(tiny_bert_path, tmp_path_factory) -> SafetyDirection:
    """A direction scored on every layer, saved and loaded back (so it knows its source folder)."""
    folder = tmp_path_factory.mktemp("direction")
    fit_direction(str(tiny_bert_path), HARMFUL, layer="auto").save_pretrained(folder)
    return SafetyDirection.from_pretrained(folder)


@pytest.fixture(scope="module")
def annotated(direction) -> Dataset:
    rows = [{**p, "kind": "harmful" if i % 2 else "benign"} for i, p in enumerate(PAIRS * 5)]
    return annotate_margins(Dataset.from_list(rows), direction, scale="standardize", bins=3)


@pytest.mark.parametrize("name", TEMPLATES)
def test_shipped_templates_match_hub_cards(name):
    shipped = (REPO / "legend_hf" / "templates" / name).read_bytes()
    assert (REPO / "hub_cards" / name).read_bytes() == shipped, (
        f"hub_cards/{name} differs from legend_hf/templates/{name} (the source): "
        f"cp legend_hf/templates/{name} hub_cards/{name}"
    )


def test_direction_card_parses_back(direction):
    card = ModelCard(str(direction_card(direction, repo_id="me/smv-tiny", license="apache-2.0")))
    assert card.data.library_name == "legend-hf"
    assert card.data.license == "apache-2.0"
    assert {"legend", "safety", "safety-direction"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local model path is no Hub id
    text = card.text
    assert f"| {direction.layer} | " in text and "**used**" in text
    for k in direction.layer_scores:
        assert f"| {k} | {direction.layer_scores[k]['accuracy']:.3f} |" in text
    assert 'SafetyDirection.from_pretrained("me/smv-tiny")' in text
    assert direction.fingerprint() in text and LEGEND_BIBTEX in text
    assert str(Path(direction.model_id).parent) not in text  # no absolute local paths in a public card

    hub = replace(direction, model_id="HuggingFaceTB/SmolLM2-135M-Instruct", model_revision="abc123")
    card = ModelCard(str(direction_card(hub)))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "(https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) @ `abc123`" in card.text


def test_write_direction_card_with_and_without_plot(direction, tmp_path, monkeypatch):
    readme = write_direction_card(direction, tmp_path)
    assert (tmp_path / "layer_scores.png").read_bytes().startswith(PNG)
    assert "![Held-out separation per layer](layer_scores.png)" in readme.read_text()

    monkeypatch.setattr(cards, "has_matplotlib", lambda: False)
    write_direction_card(direction, tmp_path)
    assert not (tmp_path / "layer_scores.png").exists()  # no stale plot next to a card that does not show it
    assert "layer_scores.png" not in readme.read_text()
    with pytest.raises(ImportError, match="pip install"):
        margin_histogram([0.1, -0.2], tmp_path / "h.png")


def test_single_layer_direction_card_has_no_plot(tiny_bert_path, tmp_path):
    direction = fit_direction(str(tiny_bert_path), HARMFUL[:3])  # too few pairs to score layers
    write_direction_card(direction, tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "No held-out scores were recorded" in text
    assert not (tmp_path / "layer_scores.png").exists()


def test_margin_stats_of_a_sequence():
    stats = margin_stats([-1.0, 0.0, 1.0, 2.0, 3.0])
    assert stats["count"] == 5 and stats["column"] is None
    assert stats["mean"] == 1.0 and stats["min"] == -1.0 and stats["max"] == 3.0
    assert math.isclose(stats["std"], 1.5811388, rel_tol=1e-6)
    assert stats["quantiles"]["50%"] == 1.0 and set(stats["quantiles"]) == {"5%", "25%", "50%", "75%", "95%"}
    assert (stats["share_positive"], stats["share_negative"], stats["share_zero"]) == (0.6, 0.2, 0.2)
    empty = margin_stats([])
    assert empty["count"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["quantiles"]["50%"])


def test_margin_stats_of_an_annotated_dataset(annotated):
    stats = margin_stats(annotated, by="kind")
    assert stats["column"] == "margin_raw" and stats["count"] == len(annotated)
    assert math.isclose(stats["mean"], sum(annotated["margin_raw"]) / len(annotated), rel_tol=1e-9)
    assert set(stats["bins"]) == {0, 1, 2} and sum(stats["bins"].values()) == len(annotated)
    assert stats["truncated"] == 0
    assert {k: g["count"] for k, g in stats["groups"].items()} == {"benign": 15, "harmful": 15}
    with pytest.raises(KeyError, match="by='nope'"):
        margin_stats(annotated, by="nope")


@pytest.mark.parametrize(
    ("margins", "expected"),
    [
        ([0.1, None], "row 1 is None"),
        ([0.1, "0.2"], "row 1 is '0.2'"),
        ([0.1, float("nan")], "row 1 is nan"),
        ("0.1", "got str"),
        (0.1, "got float"),
    ],
)
def test_margin_stats_bad_input_names_the_row(margins, expected):
    with pytest.raises(ValueError, match=expected):
        margin_stats(margins)


def test_margin_stats_needs_a_margin_column():
    with pytest.raises(KeyError, match="annotate_margins"):
        margin_stats(Dataset.from_list(PAIRS))


def test_margin_histogram_writes_a_png(annotated, tmp_path):
    path = margin_histogram(annotated, tmp_path / "hist.png")
    assert path.read_bytes().startswith(PNG)
    assert margin_histogram([0.5, 0.5, 0.5], tmp_path / "flat.png").read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="no margins"):
        margin_histogram([], tmp_path / "empty.png")


def test_size_category():
    assert [size_category(n) for n in (0, 999, 1000, 54_321, 2_000_000)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "10K<n<100K",
        "1M<n<10M",
    ]


def test_dataset_card_parses_back_with_metadata(annotated, direction):
    card = dataset_card(
        annotated,
        direction,
        source_dataset="PKU-Alignment/PKU-SafeRLHF",
        source_revision="ff00aa",
        license="cc-by-nc-4.0",
        language="en",
        repo_id="me/pku-legend",
        group_by="kind",
    )
    parsed = DatasetCard(str(card))
    data = parsed.data
    assert data.license == "cc-by-nc-4.0" and data.language == "en"
    assert {"legend", "safety", "preference", "margin"} <= set(data.tags)
    assert data.task_categories == ["text-generation"] and data.size_categories == ["n<1K"]
    assert data.source_datasets == ["extended|PKU-Alignment/PKU-SafeRLHF"]
    assert data.pretty_name == "PKU-SafeRLHF with Legend safety margins"
    text = parsed.text
    settings = cards.annotation_settings(annotated)
    for expected in [
        "(https://huggingface.co/datasets/PKU-Alignment/PKU-SafeRLHF) at revision `ff00aa`",
        direction.fingerprint(),
        f"raw × {settings['scale_factor']:.4g}",
        "3 equal-frequency bins",
        "| 0 | 0 | (−∞, ",
        "![Histogram of the safety margins](margin_histogram.png)",
        "### Margins by `kind`",
        'load_dataset("me/pku-legend", split="train")',
        "RewardTrainer",
        "## Bias, Risks, and Limitations",
        LEGEND_BIBTEX,
    ]:
        assert expected in text, expected
    for column in ("margin", "chosen_safety", "rejected_safety", "truncated", "margin_raw", "margin_level"):
        assert f"| `{column}` |" in text


def test_dataset_card_of_a_plain_map_annotation(direction):
    """``ds.map(MarginAnnotator(...))`` records no settings: the card describes the columns it finds."""
    plain = Dataset.from_list(PAIRS).map(MarginAnnotator(direction), batched=True)
    card = DatasetCard(str(dataset_card(plain, direction, histogram=None)))
    assert card.data.license is None and card.data.source_datasets is None
    assert "| **Scaling** | none: `margin` is the raw projection difference |" in card.text
    assert "margin_histogram.png" not in card.text and "Pairs per bin" not in card.text
    assert "[More Information Needed] (use the source dataset's license)" in card.text


def test_dataset_card_refuses_another_direction(annotated, direction):
    other = replace(direction, vectors={k: -v for k, v in direction.vectors.items()})
    with pytest.raises(ValueError, match="fingerprint"):
        dataset_card(annotated, other)


def test_push_annotated_dataset(annotated, direction, monkeypatch, tmp_path):
    """Data first (``Dataset.push_to_hub``), then the card keeping the YAML that push wrote, plus the histogram."""
    pushed_readme = (
        "---\ndataset_info:\n  features:\n  - name: margin\n    dtype: float64\n  splits:\n  - name: train\n"
        "    num_examples: 30\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
        "    path: data/train-*\n---\n"
    )
    push = mock.MagicMock(
        return_value=CommitInfo(
            commit_url="https://huggingface.co/datasets/me/pku-legend/commit/" + "a" * 40,
            commit_message="Upload dataset",
            commit_description="",
            oid="a" * 40,
        )
    )
    monkeypatch.setattr(Dataset, "push_to_hub", push)
    uploaded: dict[str, bytes] = {}

    def upload_folder(**kwargs):
        uploaded.update({p.name: p.read_bytes() for p in Path(kwargs["folder_path"]).iterdir()})
        return "card-commit"

    with mock.patch.object(cards, "HfApi") as api_class:
        api = api_class.return_value
        api.dataset_info.return_value = mock.Mock(card_data={"license": "cc-by-nc-4.0"}, sha="f" * 40)
        (tmp_path / "README.md").write_text(pushed_readme)
        api.hf_hub_download.return_value = str(tmp_path / "README.md")
        api.upload_folder.side_effect = upload_folder
        result = push_annotated_dataset(
            annotated,
            "me/pku-legend",
            direction,
            token="hf_x",
            private=True,
            source_dataset="PKU-Alignment/PKU-SafeRLHF",
            split="train",
        )

    assert result == "card-commit"
    api_class.assert_called_once_with(token="hf_x")
    push.assert_called_once()
    assert push.call_args.args == ("me/pku-legend",)
    assert push.call_args.kwargs == {"private": True, "token": "hf_x", "revision": None, "split": "train"}
    api.dataset_info.assert_called_once_with("PKU-Alignment/PKU-SafeRLHF", revision=None)
    assert api.hf_hub_download.call_args.kwargs == {"repo_type": "dataset", "revision": "a" * 40}
    assert api.upload_folder.call_args.kwargs["repo_id"] == "me/pku-legend"
    assert api.upload_folder.call_args.kwargs["repo_type"] == "dataset"
    assert set(uploaded) == {"README.md", "margin_histogram.png"}
    assert uploaded["margin_histogram.png"].startswith(PNG)
    card = DatasetCard(uploaded["README.md"].decode())
    assert card.data.dataset_info["splits"][0]["num_examples"] == 30  # the YAML push_to_hub wrote survives
    assert card.data.configs[0]["data_files"][0]["path"] == "data/train-*"
    assert card.data.license == "cc-by-nc-4.0"  # carried from the source dataset
    assert "at revision `" + "f" * 40 + "`" in card.text
    assert "## Margin statistics" in card.text and "![Histogram" in card.text
