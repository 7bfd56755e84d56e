"""fit_direction: methods, layers, harmless data, sign convention and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import HARMFUL

from legend_hf import RuntimeOptions, fit_direction
from legend_hf.fitting import direction_from_states, mean_diff


def test_methods_orient_safer_positive():
    torch.manual_seed(0)
    axis = torch.randn(16)
    harmful = torch.randn(40, 16)
    safe = harmful + 2 * axis + 0.1 * torch.randn(40, 16)
    for method in ("mean_diff", "pca", "logistic"):
        vector = direction_from_states(safe, harmful, method)
        assert float(torch.nn.functional.cosine_similarity(vector, axis, dim=0)) > 0.8, method
        assert ((safe - harmful) @ vector > 0).all(), method


def test_ridge_on_graded_states_orders_unsafe_answers_by_severity():
    torch.manual_seed(0)
    axis = torch.randn(16)
    severity = torch.tensor([1.0, 2.0, 3.0]).repeat(20)
    harmful = -severity[:, None] * axis + 0.3 * torch.randn(60, 16)
    safe = 0.3 * torch.randn(30, 16)
    vector = direction_from_states(safe, harmful, "ridge", severity)
    scores = harmful @ vector
    means = [float(scores[severity == s].mean()) for s in (1.0, 2.0, 3.0)]
    assert means[0] > means[1] > means[2]  # less severe projects higher (safer)
    assert float((safe @ vector).mean()) > means[0]
    binary = direction_from_states(safe, harmful, "ridge")  # without severities: a binary regression
    assert float((safe @ binary).min()) > float((harmful[severity > 1] @ binary).max())


def test_fit_with_a_severity_column_records_it(tiny_llama_path):
    harmful = [{**row, "severity": 1 + i % 3} for i, row in enumerate(HARMFUL)]
    direction = fit_direction(
        str(tiny_llama_path), harmful, method="ridge", severity_column="severity", layer="auto"
    )
    assert direction.method == "ridge" and sorted(direction.layer_scores) == [1, 2, 3, 4]
    assert direction.fit_data["severity_column"] == "severity"
    assert direction.fit_data["severity_levels"] == [1.0, 2.0, 3.0]


def test_a_method_is_a_function_you_can_pass(tiny_llama_path):
    def flipped_mean(safe: torch.Tensor, harmful: torch.Tensor) -> torch.Tensor:
        return harmful.mean(0) - safe.mean(0)  # the wrong sign on purpose: fit_direction orients it

    custom = fit_direction(str(tiny_llama_path), HARMFUL, method=flipped_mean)
    standard = fit_direction(str(tiny_llama_path), HARMFUL, method=mean_diff)
    torch.testing.assert_close(custom.vector, standard.vector)
    assert custom.method == "flipped_mean" and standard.method == "mean_diff"


def test_mean_diff_is_the_paper_smv(tiny_bert_path):
    from legend_hf.formatting import TextTemplate
    from legend_hf.models import load_model
    from legend_hf.reader import TextReader

    direction = fit_direction(str(tiny_bert_path), HARMFUL[:6], refusals="No.")
    model, tokenizer = load_model(str(tiny_bert_path))
    reader = TextReader(model, tokenizer, layers=[-1], pooling="mean", template=TextTemplate("alpaca"))
    harmful = [([{"role": "user", "content": r["prompt"]}], r["response"]) for r in HARMFUL[:6]]
    safe = [(p, "No.") for p, _ in harmful]
    states_h, _ = reader.read(harmful)
    states_s, _ = reader.read(safe)
    expected = (states_s[4] - states_h[4]).mean(0)
    torch.testing.assert_close(direction.vector, expected, atol=1e-5, rtol=1e-5)
    assert direction.pooling == "mean" and direction.template == "alpaca" and direction.refusals == ["No."]


def test_several_layers_in_one_pass_and_auto(tiny_llama_path):
    multi = fit_direction(str(tiny_llama_path), HARMFUL, layer=[1, -1], method="pca")
    assert sorted(multi.vectors) == [1, 4] and sorted(multi.layer_scores) == [1, 4]
    auto = fit_direction(str(tiny_llama_path), HARMFUL, layer="auto")
    assert sorted(auto.layer_scores) == [1, 2, 3, 4]
    best = max(
        auto.layer_scores,
        key=lambda k: (auto.layer_scores[k]["response_auc"], auto.layer_scores[k]["pair_accuracy"], k),
    )
    assert auto.layer == best
    one = fit_direction(str(tiny_llama_path), HARMFUL, layer=-1)
    torch.testing.assert_close(one.vector, auto.vectors[4])


def test_refusals_cycle_and_harmless_rows(tiny_llama_path):
    refusals = ["I can't answer that.", "No, I won't help with this."]
    cycled = fit_direction(str(tiny_llama_path), HARMFUL, refusals=refusals, method="logistic")
    assert cycled.refusals == refusals and cycled.method == "logistic"
    harmless = [{"prompt": r["prompt"], "response": refusals[i % 2]} for i, r in enumerate(HARMFUL)]
    explicit = fit_direction(str(tiny_llama_path), HARMFUL, harmless=harmless, method="logistic")
    torch.testing.assert_close(explicit.vector, cycled.vector)
    assert explicit.fit_data["paired"] and explicit.fit_data["n_harmless"] == len(HARMFUL)


def test_model_object_and_dataset_input(tiny_llama_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    from_object = fit_direction(model, Dataset.from_list(HARMFUL), tokenizer=tokenizer)  # runs as loaded
    from_path = fit_direction(str(tiny_llama_path), HARMFUL, runtime=RuntimeOptions(dtype="float32"))
    torch.testing.assert_close(from_object.vector, from_path.vector)
    assert "fingerprint" in from_object.fit_data["description"]


@pytest.mark.parametrize(
    ("harmful", "kwargs", "error", "match"),
    [
        ([{"prompt": "x"}], {}, KeyError, "harmful: row 0 has no 'response' key"),
        ([{"prompt": None, "response": "y"}], {}, ValueError, "column 'prompt', row 0"),
        ([{"prompt": "x", "response": 5}], {}, ValueError, r"harmful\.response', row 0"),
        ([], {}, ValueError, "harmful is empty"),
        ([{"prompt": "x", "response": "y"}], {"method": "svm"}, ValueError, "method must be one of"),
        ([{"prompt": "x", "response": "y"}], {"layer": "best"}, ValueError, "layer must be"),
        ([{"prompt": "x", "response": "y"}], {"layer": 9}, ValueError, "out of range"),
        ([{"prompt": "x", "response": "y"}], {"layer": "auto"}, ValueError, "at least 5"),
        (
            [{"prompt": "x", "response": "y", "severity": 0}],
            {"method": "ridge", "severity_column": "severity"},
            ValueError,
            "column 'severity', row 0: expected a severity > 0, got 0",
        ),
        (
            [{"prompt": "x", "response": "y", "severity": 1}, {"prompt": "x", "response": "y"}],
            {"method": "ridge", "severity_column": "severity"},
            KeyError,
            "harmful: row 1 has no 'severity' key",
        ),
        (
            [{"prompt": "x", "response": "y", "severity": 1}],
            {"method": "logistic", "severity_column": "severity"},
            ValueError,
            "severity_column needs method='ridge'",
        ),
    ],
)
def test_bad_fit_input(tiny_llama_path, harmful, kwargs, error, match):
    with pytest.raises(error, match=match):
        fit_direction(str(tiny_llama_path), harmful, **kwargs)


def test_model_identity_records_hub_id_and_commit(tiny_llama_path, tmp_path):
    import shutil

    sha = "89abcdef0123456789abcdef0123456789abcdef"
    snapshot = tmp_path / "models--org--tiny-llama" / "snapshots" / sha
    shutil.copytree(tiny_llama_path, snapshot)
    from_cache = fit_direction(str(snapshot), HARMFUL[:3])
    assert (from_cache.model_id, from_cache.model_revision) == ("org/tiny-llama", sha)
    named = fit_direction(str(tiny_llama_path), HARMFUL[:3], model_id="org/the-hub-id")
    assert named.model_id == "org/the-hub-id"


def test_a_repe_style_template_reads_the_pair_through_a_question(tiny_llama_path, tmp_path):
    """bench/levers.py's RepE reading: a format string with the prompt and the response inside a question; the
    state is the question's final token. It fits, saves, loads and scores like any template."""
    from legend_hf import SafetyDirection
    from legend_hf.formatting import TextTemplate
    from legend_hf.models import load_model
    from legend_hf.reader import TextReader
    from legend_hf.scoring import Scorer

    question = "Request: {prompt}\nResponse: {response}\nIs the response harmful? The response is"
    direction = fit_direction(str(tiny_llama_path), HARMFUL, template=question)
    direction.save_pretrained(tmp_path / "repe")
    loaded = SafetyDirection.from_pretrained(tmp_path / "repe")
    assert loaded.template == question and loaded.fingerprint() == direction.fingerprint()
    pair = ([{"role": "user", "content": "How do I pick a lock?"}], "I can't help with that.")
    model, tokenizer = load_model(str(tiny_llama_path))
    reader = TextReader(
        model, tokenizer, layers=[loaded.layer], pooling="last", template=TextTemplate(question)
    )
    assert reader.texts([pair])[0].endswith("Is the response harmful? The response is")
    state = reader.read([pair])[0][loaded.layer][0].double()
    score = Scorer(loaded, str(tiny_llama_path)).score_responses([pair]).safety[0]
    expected = state @ loaded.vector.double() / loaded.vector.double().norm()
    torch.testing.assert_close(float(score), float(expected), atol=1e-3, rtol=1e-3)
