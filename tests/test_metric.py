"""The `evaluate` metric metrics/legend_margin: thin over the scoring path (the same margins as Dataset.map),
its four configurations, add_batch, distributed, bad input, evaluate's own module test, and the Space's YAML
(the page itself: tests/test_space.py)."""

from __future__ import annotations

import doctest
import importlib
import inspect
import multiprocessing
import os
import statistics
import subprocess
import sys
import uuid
from pathlib import Path
from unittest import mock

import evaluate
import pytest
from conftest import HARMFUL, PAIRS
from datasets import Dataset
from huggingface_hub import RepoCard

import legend_hf
from legend_hf import SafetyDirection, annotate_margins, fit_direction, load_metric
from legend_hf.cards import LEGEND_BIBTEX


def by_counting_auc(scores: list[float], labels: list[int]) -> float:
    """ROC AUC by its definition: the share of (positive, negative) pairs ordered right, ties half."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def by_ranks_spearman(x: list[float], y: list[float]) -> float:
    """Spearman by its definition: Pearson's correlation of the average ranks."""

    def ranks(v: list[float]) -> list[float]:
        return [1 + sum(w < u for w in v) + (sum(w == u for w in v) - 1) / 2 for u in v]

    return statistics.correlation(ranks(x), ranks(y))


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
    """What `annotate_margins` gives for PAIRS: the metric must give exactly the same numbers."""
    return annotate_margins(Dataset.from_list(PAIRS), SafetyDirection.from_pretrained(direction_dir))


def load(direction_dir: str, tmp_path: Path, config: str = "pairs", **kwargs) -> evaluate.EvaluationModule:
    return evaluate.load(METRIC, config, direction=direction_dir, cache_dir=str(tmp_path), **kwargs)


def test_pairs_equal_dataset_map(direction_dir, expected, tmp_path):
    results = load(direction_dir, tmp_path).compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED)
    assert sorted(results) == ["length_spearman", "margins", "mean_margin", "median_margin", "share_positive"]
    assert results["margins"] == expected["margin"]  # one scoring path: identical, not just close
    margins = expected["margin"]
    assert results["share_positive"] == sum(m > 0 for m in margins) / len(margins)
    lengths = [len(c) - len(r) for c, r in zip(CHOSEN, REJECTED, strict=True)]
    assert results["length_spearman"] == pytest.approx(by_ranks_spearman(margins, lengths))


def test_model_is_loaded_once_per_metric_object(direction_dir, tmp_path, monkeypatch):
    import legend_hf.scoring

    calls = []
    original = legend_hf.scoring.load_model
    monkeypatch.setattr(legend_hf.scoring, "load_model", lambda *a, **k: calls.append(a) or original(*a, **k))
    metric = load(direction_dir, tmp_path)
    first = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED)
    second = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED)
    assert len(calls) == 1 and first == second


def test_labelled_pairs(direction_dir, tmp_path):
    metric = load(direction_dir, tmp_path, "labelled_pairs")
    labels = [1, 1, 0, 1, 0, 1]
    results = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED, references=labels)
    margins = results["margins"]
    agree = [(m > 0) == (y == 1) for m, y in zip(margins, labels, strict=True)]
    assert results["pair_accuracy"] == pytest.approx(sum(agree) / len(agree))
    assert results["pair_auc"] == pytest.approx(by_counting_auc(margins, labels))
    assert "severity_spearman" not in results
    severities = [3, 2, 0, 3, -1, 2]  # severity(rejected) - severity(chosen); 3 and 2 are tied twice
    results = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED, references=severities)
    assert "pair_auc" not in results and "pair_accuracy" not in results
    assert results["severity_spearman"] == pytest.approx(by_ranks_spearman(results["margins"], severities))
    results = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED, references=[1] * 6)
    assert results["pair_auc"] != results["pair_auc"]  # one label only: undefined (NaN)


def test_responses_equal_the_dataset_safety_scores(direction_dir, expected, tmp_path):
    results = load(direction_dir, tmp_path, "responses").compute(prompts=PROMPTS, predictions=CHOSEN)
    assert sorted(results) == ["mean_safety", "median_safety", "safety_scores"]
    assert results["safety_scores"] == pytest.approx(expected["chosen_safety"], abs=1e-9)
    labelled = load(direction_dir, tmp_path, "labelled_responses")
    results = labelled.compute(prompts=PROMPTS, predictions=REJECTED, references=[0, 0, 1, 0, 1, 0])
    assert results["response_auc"] == pytest.approx(
        by_counting_auc(results["safety_scores"], [0, 0, 1, 0, 1, 0])
    )
    ratings = labelled.compute(prompts=PROMPTS, predictions=REJECTED, references=[0.1, 0.2, 3, 0, 2, 0.5])
    assert "rating_spearman" in ratings and "response_auc" not in ratings


def test_hh_dialogues_with_empty_prompts(direction_dir, expected, tmp_path):
    dialogues = [f"\n\nHuman: {p}\n\nAssistant: {c}" for p, c in zip(PROMPTS, CHOSEN, strict=True)]
    responses = load(direction_dir, tmp_path, "responses").compute(prompts=[""] * 6, predictions=dialogues)
    assert responses["safety_scores"] == pytest.approx(expected["chosen_safety"], abs=1e-9)
    rejected = [f"\n\nHuman: {p}\n\nAssistant: {r}" for p, r in zip(PROMPTS, REJECTED, strict=True)]
    pairs = load(direction_dir, tmp_path).compute(prompts=[""] * 6, chosen=dialogues, rejected=rejected)
    assert pairs["margins"] == pytest.approx(expected["margin"], abs=1e-9)


def test_add_batch_and_add_match_one_compute(direction_dir, tmp_path):
    metric = load(direction_dir, tmp_path, "labelled_pairs")
    whole = metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED, references=[1] * 6)
    metric.add_batch(prompts=PROMPTS[:4], chosen=CHOSEN[:4], rejected=REJECTED[:4], references=[1] * 4)
    metric.add_batch(prompts=PROMPTS[4:], chosen=CHOSEN[4:], rejected=REJECTED[4:], references=[1] * 2)
    batched = metric.compute()
    for i in range(6):
        metric.add(prompts=PROMPTS[i], chosen=CHOSEN[i], rejected=REJECTED[i], reference=1)
    single = metric.compute()
    for results in (batched, single):
        assert results["margins"] == pytest.approx(whole["margins"], abs=1e-9)
        assert results["pair_accuracy"] == whole["pair_accuracy"]


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


def test_distributed_matches_single_process(direction_dir, tmp_path):
    whole = load(direction_dir, tmp_path).compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED)
    experiment_id = uuid.uuid4().hex
    jobs = [(direction_dir, str(tmp_path), experiment_id, rank) for rank in range(2)]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        first, second = pool.map(_distributed_worker, jobs)
    assert second is None  # only process 0 computes
    assert first["margins"] == pytest.approx(whole["margins"], abs=1e-6)


def test_direction_and_a_known_configuration_are_required(direction_dir):
    with pytest.raises(ValueError, match="needs a direction"):
        evaluate.load(METRIC)
    with pytest.raises(ValueError, match="configurations"):
        evaluate.load(METRIC, "pair", direction=direction_dir)


@pytest.mark.parametrize(
    ("config", "inputs", "message"),
    [
        (
            "pairs",
            dict(prompts=PROMPTS, chosen=CHOSEN),
            r"needs \['prompts', 'chosen', 'rejected'\]: missing \['rejected'\]",
        ),
        ("pairs", dict(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED[:5]), "Mismatch in the number"),
        (
            "pairs",
            dict(prompts=PROMPTS, chosen=[*CHOSEN[:3], None, *CHOSEN[4:]], rejected=REJECTED),
            "'chosen', row 3",
        ),
        ("pairs", dict(prompts=PROMPTS, chosen=[None, *CHOSEN[1:]], rejected=REJECTED), "expected format"),
        ("pairs", dict(prompts=[1, *PROMPTS[1:]], chosen=CHOSEN, rejected=REJECTED), "expected format"),
        (
            "labelled_pairs",
            dict(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED),
            r"missing \[.references.\]",
        ),
        (
            "labelled_responses",
            dict(prompts=PROMPTS, predictions=CHOSEN, references=[1, 0, 1, 0, 1, float("nan")]),
            "'references', row 5: expected a number",
        ),
    ],
)
def test_bad_input_is_a_value_error_naming_it(direction_dir, tmp_path, config, inputs, message):
    with pytest.raises(ValueError, match=message):
        load(direction_dir, tmp_path, config).compute(**inputs)


def test_an_unknown_keyword_is_named(direction_dir, tmp_path):
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        load(direction_dir, tmp_path).compute(prompts=["x"], chosen=["y"], rejected=["z"], foo=[1])


def test_load_metric_works_from_any_folder(direction_dir, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    metric = load_metric(direction_dir, cache_dir=str(tmp_path / "cache"))
    assert metric.compute(prompts=PROMPTS, chosen=CHOSEN, rejected=REJECTED)["margins"] == expected["margin"]


def test_the_metric_folder_and_the_submodules_are_reachable_after_import_legend_hf():
    """A fresh interpreter: ``legend_hf.METRIC_PATH`` is the folder load_metric loads, ``legend_hf.evaluation`` is
    there without importing it first, and ``import legend_hf`` alone loads neither torch nor transformers."""
    script = (
        "import sys, legend_hf; light = 'torch' not in sys.modules and 'transformers' not in sys.modules; "
        "print(light, legend_hf.METRIC_PATH, legend_hf.metric.load_metric is legend_hf.load_metric)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", METRIC, "True"]
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        legend_hf.nothing_here  # noqa: B018


def test_metric_folder_is_an_evaluate_space():
    folder = REPO / "metrics" / "legend_margin"
    card = RepoCard.load(folder / "README.md")
    for key in ("title", "emoji", "colorFrom", "colorTo", "sdk", "sdk_version", "app_file", "pinned", "tags"):
        assert getattr(card.data, key, None) is not None, key
    assert card.data.sdk == "gradio" and card.data.app_file == "app.py" and "metric" in card.data.tags
    assert LEGEND_BIBTEX in card.text


@pytest.mark.slow
def test_evaluate_local_module_test(monkeypatch):
    """evaluate's own tests/test_metric_common.py LocalModuleTest.test_load, run from the repository root:
    the module loads through evaluation_module_factory, `_compute` takes no **kwargs, and the docstring's
    examples pass with `evaluate.load` patched to prefix `metrics/` (real MiniLM, offline)."""
    monkeypatch.chdir(REPO)
    doctest.ELLIPSIS_MARKER = "[...]"
    module = importlib.import_module(
        evaluate.loading.evaluation_module_factory(
            os.path.join("metrics", "legend_margin"), module_type="metric"
        ).module_path
    )
    metric_class = evaluate.loading.import_main_class(module.__name__)
    parameters = inspect.signature(metric_class._compute).parameters
    assert all(p.kind != p.VAR_KEYWORD for p in parameters.values())
    real_load = evaluate.load

    def load_local(name, *args, **kwargs):
        return real_load(os.path.join("metrics", name), *args, **kwargs)

    with mock.patch("evaluate.load") as patched:
        patched.side_effect = load_local
        results = doctest.testmod(module, verbose=False, raise_on_error=True)
    assert results.failed == 0 and results.attempted > 1
