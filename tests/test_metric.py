"""The `evaluate` metric metrics/legend_margin: loading, both modes, add_batch, distributed, bad input, doctests."""

from __future__ import annotations

import doctest
import importlib.util
import math
import multiprocessing
import statistics
import sys
import uuid
from pathlib import Path

import evaluate
import pytest
from conftest import HARMFUL, PAIRS
from datasets import Dataset
from huggingface_hub import RepoCard

from legend_hf import SafetyDirection, annotate_margins, fit_direction
from legend_hf.cards import LEGEND_BIBTEX
from legend_hf.evaluation import roc_auc, sign_accuracy, spearman

REPO = Path(__file__).resolve().parents[1]
METRIC = str(REPO / "metrics" / "legend_margin")
PROMPTS = [p["prompt"] for p in PAIRS]
CHOSEN = [p["chosen"] for p in PAIRS]
REJECTED = [p["rejected"] for p in PAIRS]


@pytest.fixture(scope="module")
def direction_dir(tiny_bert_path, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("metric-direction")
    fit_direction(str(tiny_bert_path), HARMFUL).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def expected(direction_dir) -> Dataset:
    """What `annotate_margins` gives for PAIRS: the metric must agree with it."""
    return annotate_margins(Dataset.from_list(PAIRS), SafetyDirection.from_pretrained(direction_dir))


@pytest.fixture()
def metric(direction_dir, tmp_path):
    return evaluate.load(METRIC, direction=direction_dir, cache_dir=str(tmp_path))


def _loaded_module(metric) -> object:
    return sys.modules[type(metric).__module__]


def test_pairs_agree_with_annotate_margins(metric, expected):
    results = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED)
    assert sorted(results) == ["agreement", "margins", "mean_margin", "median_margin"]
    assert results["margins"] == pytest.approx(expected["margin"], abs=1e-6)
    margins = expected["margin"]
    assert results["mean_margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-6)
    assert results["median_margin"] == pytest.approx(statistics.median(margins), abs=1e-6)
    assert results["agreement"] == sum(m > 0 for m in margins) / len(margins)


def test_model_is_loaded_once_per_metric_object(metric, monkeypatch):
    import legend_hf.annotate

    calls = []
    original = legend_hf.annotate.load_model
    monkeypatch.setattr(
        legend_hf.annotate, "load_model", lambda *a, **k: calls.append(a) or original(*a, **k)
    )
    first = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED)
    second = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED)
    assert len(calls) == 1 and first == second


def test_references(metric, expected):
    labels = [1, 1, 0, 1, 0, 1]
    results = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED, references=labels)
    margins = results["margins"]
    assert results["accuracy"] == sign_accuracy(margins, [x == 1 for x in labels])
    assert results["auc"] == roc_auc(margins, labels)
    assert results["spearman"] == spearman(margins, labels)
    severities = [3, 2, 0, 3, -1, 2]  # severity(rejected) - severity(chosen)
    results = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED, references=severities)
    assert "auc" not in results and "accuracy" not in results
    assert results["spearman"] == spearman(results["margins"], severities)
    results = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED, references=[1] * 6)
    assert math.isnan(results["auc"]) and math.isnan(results["spearman"])  # one label only: undefined


def test_single_responses(metric, expected):
    results = metric.compute(prompts=PROMPTS, predictions=CHOSEN)
    assert sorted(results) == ["mean_safety", "median_safety", "safety_scores"]
    assert results["safety_scores"] == pytest.approx(expected["chosen_safety"], abs=1e-6)
    results = metric.compute(predictions=REJECTED, references=[0, 0, 1, 0, 1, 0])
    assert len(results["safety_scores"]) == 6 and {"auc", "spearman"} <= set(results)
    # Without prompts a response is read with an empty prompt, or its HH-RLHF dialogue's own prompt.
    with_empty = metric.compute(prompts=[""] * 6, predictions=REJECTED)
    assert results["safety_scores"] == pytest.approx(with_empty["safety_scores"], abs=1e-9)
    dialogue = f"\n\nHuman: {PROMPTS[0]}\n\nAssistant: {CHOSEN[0]}"
    assert metric.compute(predictions=[dialogue])["safety_scores"] == pytest.approx(
        [expected["chosen_safety"][0]], abs=1e-6
    )


def test_add_batch_and_add_match_one_compute(metric):
    whole = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED, references=[1] * 6)
    metric.add_batch(prompts=PROMPTS[:4], chosen=CHOSEN[:4], rejected=REJECTED[:4], references=[1] * 4)
    metric.add_batch(prompts=PROMPTS[4:], chosen=CHOSEN[4:], rejected=REJECTED[4:], references=[1] * 2)
    batched = metric.compute()
    for i in range(6):
        metric.add(prompts=PROMPTS[i], chosen=CHOSEN[i], rejected=REJECTED[i], reference=1)
    single = metric.compute()
    for results in (batched, single):
        assert results["margins"] == pytest.approx(whole["margins"], abs=1e-9)
        assert results["agreement"] == whole["agreement"]
    for i in range(2):
        metric.add(prediction=CHOSEN[i], prompts=PROMPTS[i])
    assert len(metric.compute()["safety_scores"]) == 2


def _distributed_worker(args: tuple[str, str, str, int]) -> dict | None:
    direction_dir, cache_dir, experiment_id, rank = args
    metric = evaluate.load(
        METRIC,
        direction=direction_dir,
        num_process=2,
        process_id=rank,
        experiment_id=experiment_id,
        cache_dir=cache_dir,
    )
    half = slice(0, 3) if rank == 0 else slice(3, 6)
    metric.add_batch(prompts=PROMPTS[half], chosen=CHOSEN[half], rejected=REJECTED[half])
    return metric.compute()


def test_distributed_matches_single_process(metric, direction_dir, tmp_path):
    whole = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED)
    experiment_id = uuid.uuid4().hex
    jobs = [(direction_dir, str(tmp_path), experiment_id, rank) for rank in range(2)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        first, second = pool.map(_distributed_worker, jobs)
    assert second is None  # only process 0 computes
    assert first["margins"] == pytest.approx(whole["margins"], abs=1e-6)


def test_direction_is_required():
    with pytest.raises(ValueError, match="needs a direction"):
        evaluate.load(METRIC)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (dict(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED[:5]), "length mismatch: .* rejected has 5"),
        (dict(prompts=PROMPTS[:2], chosen=CHOSEN, rejected=REJECTED), "length mismatch: .* has 6"),
        (dict(prompts=PROMPTS, chosen=CHOSEN), "rejected is missing"),
        (dict(prompts=PROMPTS, rejected=REJECTED), "chosen is missing"),
        (dict(prompts=PROMPTS), "nothing to score"),
        (dict(references=[1] * 6), "nothing to score"),
        (dict(predictions=CHOSEN, chosen=CHOSEN, rejected=REJECTED), "not both"),
        (dict(prompts=PROMPTS, chosen=[None, *CHOSEN[1:]], rejected=REJECTED), r"chosen\[0\] is missing"),
        (dict(prompts=[1, *PROMPTS[1:]], chosen=CHOSEN, rejected=REJECTED), r"prompts\[0\] is a int"),
        (dict(prompts=PROMPTS, chosen=CHOSEN, rejected=[*REJECTED[:5], ["x"]]), r"rejected\[5\] is a list"),
        (dict(predictions="one response"), "predictions must be a list, got str"),
        (dict(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED, references=["yes"] * 6), r"references\[0\]"),
        (dict(predictions=CHOSEN, references=[1, 0, 1, 0, 1, float("nan")]), r"references\[5\] is nan"),
        (dict(chosen=CHOSEN, rejected=REJECTED), "column 'chosen', row 0: without a prompt"),
    ],
)
def test_bad_input_is_a_value_error_naming_it(metric, inputs, message):
    with pytest.raises(ValueError, match=message):
        metric.compute(**inputs)


def test_batches_must_share_their_inputs(metric):
    metric.add_batch(prompts=PROMPTS[:2], chosen=CHOSEN[:2], rejected=REJECTED[:2])
    with pytest.raises(ValueError, match="same inputs"):
        metric.add_batch(predictions=CHOSEN[:2])
    with pytest.raises(ValueError, match="same inputs"):
        metric.add_batch(chosen=CHOSEN[:2], rejected=REJECTED[:2], prompts=PROMPTS[:2], references=[1, 1])
    assert len(metric.compute()["margins"]) == 2


def test_nothing_added_is_a_clear_error(metric):
    with pytest.raises(ValueError, match="nothing to score"):
        metric.compute()


def test_metric_card():
    card = RepoCard.load(REPO / "metrics" / "legend_margin" / "README.md")
    assert card.data.title == "Legend Margin" and "metric" in card.data.tags
    assert LEGEND_BIBTEX in card.text
    requirements = (REPO / "metrics" / "legend_margin" / "requirements.txt").read_text().split()
    assert "legend-hf" in requirements


@pytest.mark.slow
def test_docstring_examples(monkeypatch):
    """The examples in the metric's docstring (MiniLM, offline), run from the repository root as documented."""
    monkeypatch.chdir(REPO)
    spec = importlib.util.spec_from_file_location("legend_margin_doctest", Path(METRIC) / "legend_margin.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert results.attempted >= 10 and results.failed == 0
