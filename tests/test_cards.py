"""Hub cards and plots: direction and dataset cards render from the record, parse back with huggingface_hub,
say what the margin column means for every setting, and push (data, card, histogram) to a loopback Hub."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from conftest import HARMFUL, PAIRS
from datasets import Dataset, load_dataset
from huggingface_hub import DatasetCard, ModelCard

from legend_hf import (
    MarginAnnotator,
    SafetyDirection,
    annotate_margins,
    dataset_card,
    fit_direction,
    push_annotated_dataset,
    read_record,
)
from legend_hf import cards as cards_module
from legend_hf.cards import LEGEND_BIBTEX, TEMPLATES, size_category
from legend_hf.plots import margin_histogram
from legend_hf.publish import dataset_histogram
from legend_hf.stats import clean

pytest_plugins = ["hub_server"]
REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


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


def test_one_copy_of_the_templates_in_hub_cards():
    assert TEMPLATES == REPO / "hub_cards"
    assert not (REPO / "legend_hf" / "templates").exists()


def test_direction_card_parses_back(direction):
    card = ModelCard(str(direction.generate_model_card(repo_id="me/smv-tiny", license="apache-2.0")))
    assert card.data.library_name == "legend-hf"
    assert card.data.license == "apache-2.0"
    assert {"legend", "safety", "safety-direction"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local model path is no Hub id
    text = card.text
    assert f"| {direction.layer} | " in text and "**used**" in text
    for k in direction.layer_scores:
        assert f"| {k} | {direction.layer_scores[k]['pair_accuracy']:.3f} |" in text
    assert 'SafetyDirection.from_pretrained("me/smv-tiny")' in text
    assert direction.fingerprint() in text and LEGEND_BIBTEX in text
    assert str(Path(direction.model_id).parent) not in text  # no absolute local paths in a public card

    hub = replace(direction, model_id="HuggingFaceTB/SmolLM2-135M-Instruct", model_revision="abc123")
    card = ModelCard(str(hub.generate_model_card()))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "(https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) @ `abc123`" in card.text


def test_write_direction_card_with_and_without_plot(direction, tmp_path, monkeypatch):
    direction.save_pretrained(tmp_path)
    readme = tmp_path / "README.md"
    assert (tmp_path / "layer_scores.png").read_bytes().startswith(PNG)
    assert "![Held-out separation per layer](layer_scores.png)" in readme.read_text()

    monkeypatch.setattr(cards_module, "has_matplotlib", lambda: False)
    direction.save_pretrained(tmp_path)
    assert not (tmp_path / "layer_scores.png").exists()  # no stale plot next to a card that does not show it
    assert "layer_scores.png" not in readme.read_text()


def test_single_layer_direction_card_has_no_plot(tiny_bert_path, tmp_path):
    direction = fit_direction(str(tiny_bert_path), HARMFUL[:3])  # too few pairs to score layers
    direction.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "No held-out scores were recorded" in text
    assert not (tmp_path / "layer_scores.png").exists()


def test_margin_histogram_writes_a_png(annotated, tmp_path):
    assert dataset_histogram(annotated, tmp_path / "hist.png").read_bytes().startswith(PNG)
    assert margin_histogram([0.5, 0.5, 0.5], tmp_path / "flat.png").read_bytes().startswith(PNG)
    with pytest.raises(ValueError, match="no margins"):
        margin_histogram([], tmp_path / "empty.png")
    with pytest.raises(ValueError, match="row 1 is None"):
        margin_histogram([0.1, None], tmp_path / "bad.png")


def test_size_category():
    assert [size_category(n) for n in (0, 999, 1000, 54_321, 2_000_000)] == [
        "n<1K",
        "n<1K",
        "1K<n<10K",
        "10K<n<100K",
        "1M<n<10M",
    ]


def test_dataset_card_parses_back_with_metadata_and_record(annotated, direction):
    card = dataset_card(
        annotated,
        direction,
        source_dataset="PKU-Alignment/PKU-SafeRLHF",
        source_revision="ff00aa",
        license="cc-by-nc-4.0",
        language="en",
        repo_id="me/pku-legend",
        histogram="margin_histogram.png",
        group_by="kind",
    )
    parsed = DatasetCard(str(card))
    data = parsed.data
    assert data.license == "cc-by-nc-4.0" and data.language == "en"
    assert {"legend", "safety", "preference", "margin"} <= set(data.tags)
    assert data.task_categories == ["text-generation"] and data.size_categories == ["n<1K"]
    assert data.source_datasets == ["extended|PKU-Alignment/PKU-SafeRLHF"]
    assert data.pretty_name == "PKU-SafeRLHF with Legend safety margins"
    record = read_record(annotated)
    assert record is not None and data.legend_hf == record.to_dict()  # the record, in the card's YAML
    text = parsed.text
    for expected in [
        "(https://huggingface.co/datasets/PKU-Alignment/PKU-SafeRLHF) at revision `ff00aa`",
        direction.fingerprint(),
        f"raw × {record.scale_factor:.4g}",
        "3 levels: 0 for scaled margins ≤ 0",
        "| 0 | 0 | (−∞, 0] |",
        "![Histogram of the safety margins](margin_histogram.png)",
        "| `kind` | pairs | mean margin | chosen safer (`share_positive`) | `pair_accuracy` |",
        'load_dataset("me/pku-legend", split="train")',
        "RewardTrainer",
        "## Bias, Risks, and Limitations",
        LEGEND_BIBTEX,
    ]:
        assert expected in text, expected
    for column in ("margin", "chosen_safety", "rejected_safety", "truncated", "margin_raw", "margin_level"):
        assert f"| `{column}` |" in text


def test_dataset_card_says_only_what_its_record_and_statistics_say(annotated):
    """The method, the direction's kind (shipped, Hub, local folder), the agreement with the data's labels and the
    limitations come from the record and the statistics: nothing the settings contradict."""
    from legend_hf import annotation_report

    record = replace(read_record(annotated), method="logistic", direction="smv-smollm2")
    text = DatasetCard(str(dataset_card(annotated, record=record, group_by="kind"))).text
    assert "`logistic`: weights of an L2-regularised logistic probe" in text
    assert "mean difference" not in text and "Standard Margin Vector" not in text
    assert "`smv-smollm2`, shipped with legend-hf" in text and "`smv-smollm2` (local)" not in text
    assert "close to noise" not in text and "terse refusal" not in text
    report = annotation_report(annotated, group_column="kind")
    for name, scores in report.scores.items():
        row = (
            f"| {name} | {int(scores['n_pairs'])} | {scores['mean_margin']:.3f} | {scores['share_positive']:.3f} | "
            f"{scores['pair_accuracy']:.3f} ({int(scores['n_ordered'])}) |".replace("-", "−")
        )
        assert row in text, row
    assert f"with Spearman {report.scores['all']['length_spearman']:.3f}".replace("-", "−") in text
    assert f"The {100 * report.margins['share_negative']:.1f}% of pairs" in text
    local = replace(record, direction="./smv-smollm2")
    assert "`./smv-smollm2`, a local folder" in str(dataset_card(annotated, record=local))
    hub = replace(record, direction="me/smv")
    assert "[`me/smv`](https://huggingface.co/me/smv)" in str(dataset_card(annotated, record=hub))


@pytest.mark.parametrize(
    ("options", "says", "never"),
    [
        ({}, ["A positive margin means the direction finds the chosen response safer"], ["bin level"]),
        ({"scale": 2.0}, ["fixed factor: scaled margin = raw × 2", "A positive margin means"], ["bin level"]),
        (
            {"bins": 4},
            [
                "`margin` is a bin level, not a signed margin",
                "level 0 holds every pair whose scaled margin is ≤ 0",
            ],
            ["A positive margin means"],
        ),
        (
            {"scale": "standardize", "clip": (0.0, None)},
            ["never relaxes a pair", "standard deviation of 1"],
            ["A positive margin means", "bin level"],
        ),
    ],
)
def test_dataset_card_says_what_margin_means_for_every_setting(direction, options, says, never):
    annotated = annotate_margins(Dataset.from_list(PAIRS * 3), direction, **options)
    text = DatasetCard(str(dataset_card(annotated))).text  # the record alone is enough
    for sentence in says:
        assert sentence in text, sentence
    for sentence in never:
        assert sentence not in text, sentence


def test_dataset_card_of_a_plain_map_annotation_says_not_recorded(direction):
    """``ds.map(MarginAnnotator(...))`` keeps no record: the card says so instead of guessing."""
    plain = Dataset.from_list(PAIRS).map(MarginAnnotator(direction), batched=True)
    assert read_record(plain) is None
    card = DatasetCard(str(dataset_card(plain, direction)))
    assert card.data.license is None and card.data.source_datasets is None
    assert "| **Scaling** | not recorded |" in card.text
    assert "margin_histogram.png" not in card.text and "Pairs per bin" not in card.text
    assert "[More Information Needed] (use the source dataset's license)" in card.text
    with pytest.raises(ValueError, match="pass the direction"):
        dataset_card(plain)


def test_dataset_card_refuses_another_direction(annotated, direction):
    other = replace(direction, vectors={k: -v for k, v in direction.vectors.items()})
    with pytest.raises(ValueError, match="fingerprint"):
        dataset_card(annotated, other)


def test_push_annotated_dataset_to_a_loopback_hub(annotated, direction, hub_server):
    """Data first (``Dataset.push_to_hub``), then the card keeping the YAML that push wrote, plus the histogram;
    ``load_dataset`` gets the record back from the Hub."""
    commit = push_annotated_dataset(annotated, "user/pku-legend", direction, license="cc-by-nc-4.0")
    assert commit.pr_url is None and "user/pku-legend" in commit.commit_url
    files = hub_server.files("user/pku-legend", repo_type="dataset")
    assert files["margin_histogram.png"].startswith(PNG)
    card = DatasetCard(files["README.md"].decode())
    assert card.data.dataset_info["splits"][0]["num_examples"] == len(
        annotated
    )  # push_to_hub's YAML survives
    assert card.data.configs[0]["config_name"] == "default"
    assert card.data.license == "cc-by-nc-4.0" and card.data.legend_hf == read_record(annotated).to_dict()
    assert "## Margin statistics" in card.text and "![Histogram" in card.text
    back = load_dataset("user/pku-legend", split="train")
    assert read_record(back) == read_record(annotated)
    assert back["margin"] == annotated["margin"]


def test_push_annotated_dataset_to_a_new_branch_and_as_a_pull_request(annotated, direction, hub_server):
    push_annotated_dataset(annotated, "user/pku-legend", direction)
    branch = push_annotated_dataset(annotated, "user/pku-legend", direction, revision="v1")
    assert (
        "README.md" in hub_server.files("user/pku-legend", "v1", repo_type="dataset")
        and branch.pr_url is None
    )
    smaller = annotated.select(range(10))
    pr = push_annotated_dataset(smaller, "user/pku-legend", direction, create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_url is not None  # the PR that holds data and card
    in_pr = load_dataset("user/pku-legend", split="train", revision="refs/pr/1")
    assert len(in_pr) == 10 and read_record(in_pr) == read_record(annotated)
    assert (
        "10 rows"
        in hub_server.files("user/pku-legend", "refs/pr/1", repo_type="dataset")["README.md"].decode()
    )
    assert len(load_dataset("user/pku-legend", split="train")) == len(annotated)  # main is untouched
    unchanged = push_annotated_dataset(smaller, "user/pku-legend", direction, create_pr=True, license="mit")
    assert unchanged.pr_revision == "refs/pr/2"  # same data: the card commit opens the pull request


def test_save_annotated_writes_data_card_histogram_and_report(annotated, direction, tmp_path):
    import json

    from legend_hf import annotation_report
    from legend_hf.publish import save_annotated

    written = save_annotated(annotated, tmp_path, direction, source_dataset="/somewhere/pairs.jsonl")
    assert [p.name for p in written] == ["train.parquet", "README.md", "margin_histogram.png", "report.json"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dataset"] == "pairs.jsonl" and report["rows"] == len(annotated)  # no absolute path
    assert report == json.loads(
        json.dumps(clean({"dataset": "pairs.jsonl", **annotation_report(annotated).to_dict()}))
    )
    back = load_dataset("parquet", data_files=str(tmp_path / "train.parquet"), split="train")
    assert read_record(back) == read_record(annotated)
    assert "![Histogram of the safety margins](margin_histogram.png)" in (tmp_path / "README.md").read_text()


def test_report_text_names_the_statistics(annotated):
    from legend_hf import annotation_report

    report = annotation_report(annotated, group_column="kind")
    text = report.to_text()
    overall = report.scores["all"]
    assert f"share_positive     {overall['share_positive']:.3f}" in text
    assert f"pair_accuracy      {overall['pair_accuracy']:.3f}" in text and "per group" in text
    assert f"raw margin         mean {overall['mean_margin']:.3f}" in text
