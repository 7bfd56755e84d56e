"""The artifact: round trip, Hub cache offline, push_to_hub, and every way a file can be bad."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import save_file

import legend_hf
from legend_hf import SafetyDirection
from legend_hf.direction import CONFIG_NAME, WEIGHTS_NAME
from legend_hf.hub import HubLookupError

pytest_plugins = ["hub_server"]


def make_direction(**overrides) -> SafetyDirection:
    torch.manual_seed(0)
    fields = dict(
        vectors={2: torch.randn(8), 4: torch.randn(8)},
        layer=4,
        model_id="org/tiny",
        hidden_size=8,
        num_layers=4,
        pooling="last",
        template="alpaca",
        refusals=["I can't answer that."],
        model_revision="abc123",
        layer_scores={2: {"pair_accuracy": 0.9, "response_auc": 0.95, "n_heldout": 4.0}},
    )
    fields.update(overrides)
    return SafetyDirection(**fields)


def test_round_trip(tmp_path):
    direction = make_direction()
    direction.save_pretrained(tmp_path)
    assert {WEIGHTS_NAME, CONFIG_NAME, "README.md"} <= {p.name for p in tmp_path.iterdir()}
    loaded = SafetyDirection.from_pretrained(tmp_path)
    assert loaded.config_dict() == direction.config_dict()
    assert all(torch.equal(loaded.vectors[k], v) for k, v in direction.vectors.items())
    assert loaded.fingerprint() == direction.fingerprint()
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    for key in (
        "format_version",
        "library_version",
        "model_id",
        "model_revision",
        "hidden_size",
        "layer",
        "layers",
        "pooling",
        "template",
        "refusals",
        "method",
        "fit_data",
        "layer_scores",
        "sign_convention",
    ):
        assert key in config
    torch.testing.assert_close(loaded.unit.norm(), torch.tensor(1.0))


def test_fingerprint_changes_with_vector_and_options():
    a = make_direction()
    assert a.fingerprint() != make_direction(pooling="mean").fingerprint()
    b = make_direction()
    b.vectors[4][0] += 1e-3
    assert a.fingerprint() != b.fingerprint()


def test_evaluation_scores_travel_with_the_artifact_and_show_in_its_card(tmp_path):
    scores = [
        {
            "dataset": "graded test pairs",
            "metric": "pair_accuracy",
            "value": 0.75,
            "interval": [0.6, 0.9],
            "target": ">= 0.75",
        },
        {"dataset": "HH-RLHF harmless test", "metric": "pair_accuracy", "value": 0.61},
        {"dataset": "all pairs", "metric": "length_spearman", "value": -0.2, "target": "|ρ| <= 0.2"},
    ]
    direction = make_direction(evaluation=scores)
    assert direction.fingerprint() == make_direction().fingerprint()  # scores describe, they do not define
    direction.save_pretrained(tmp_path)
    assert SafetyDirection.from_pretrained(tmp_path).evaluation == scores
    card = (tmp_path / "README.md").read_text()
    assert "| graded test pairs | pair_accuracy | 0.750 | [0.60, 0.90] | >= 0.75 |" in card
    assert "| HH-RLHF harmless test | pair_accuracy | 0.610 |  |  |" in card
    assert (
        "| all pairs | length_spearman | -0.200 |  | \\|ρ\\| <= 0.2 |" in card
    )  # a cell's pipes are escaped
    assert (
        "## Evaluation"
        not in (make_direction().save_pretrained(tmp_path / "plain") / "README.md").read_text()
    )
    with pytest.raises(ValueError, match=r"evaluation\[0\] lacks \['value'\]"):
        make_direction(evaluation=[{"dataset": "x", "metric": "pair_accuracy"}])


def test_a_card_names_each_evaluation_sets_source_when_the_scores_give_one(tmp_path):
    scores = [
        {"dataset": "graded test pairs", "metric": "pair_accuracy", "value": 0.85, "source": "one author"},
        {"dataset": "team held-out", "metric": "response_auc", "value": 0.823, "target": ">= 0.90"},
    ]
    direction = make_direction(evaluation=scores)
    direction.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "| data | source: where it comes from, who wrote it | statistic |" in card
    assert "| graded test pairs | one author | pair_accuracy | 0.850 |  |  |" in card
    assert "| team held-out |  | response_auc | 0.823 |  | >= 0.90 |" in card


def test_shipped_directions_load_by_name():
    from legend_hf.data_io import SHIPPED_DIRECTIONS

    for name, folder in SHIPPED_DIRECTIONS.items():
        direction = SafetyDirection.from_pretrained(name)
        assert direction.fingerprint() == SafetyDirection.from_pretrained(folder).fingerprint()
        assert direction.name == SafetyDirection.from_pretrained(folder).name == name


@pytest.mark.parametrize("ref", ["./smv-smolm2", "smv-smolm2"])
def test_a_misspelt_shipped_name_is_answered_at_once(ref, monkeypatch):
    """A bare name is never sent to the Hub (its repo ids are owner/name): no wait, the near shipped name."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", None)  # any Hub call would fail differently
    with pytest.raises(FileNotFoundError) as info:
        SafetyDirection.from_pretrained(ref)
    assert str(info.value) == (
        f"{ref}: no such direction folder, and not a Hub repo id (owner/name); did you mean smv-smollm2? "
        "The shipped directions are smv-smollm2, smv-gemma3-270m"
    )


def test_a_local_folder_named_like_a_shipped_direction_warns_and_is_recorded_apart(tmp_path, monkeypatch):

    monkeypatch.chdir(tmp_path)
    mine = make_direction()
    mine.save_pretrained("smv-smollm2")  # what the README's fit snippet did
    with pytest.warns(UserWarning, match=r"loading the local folder smv-smollm2/, not the shipped direction"):
        loaded = SafetyDirection.from_pretrained("smv-smollm2")
    assert loaded.fingerprint() == mine.fingerprint()
    assert loaded.name == "./smv-smollm2" == loaded.record().direction
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SafetyDirection.from_pretrained("./smv-smollm2").name == "./smv-smollm2"
        shipped = SafetyDirection.from_pretrained(legend_hf.DEFAULT_DIRECTION)
    assert shipped.name == "smv-smollm2" and shipped.fingerprint() != mine.fingerprint()


def _populate_hub_cache(cache: Path, repo_id: str, direction: SafetyDirection, sha: str) -> None:
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    direction.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)


def test_hub_download_through_offline_cache(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    _populate_hub_cache(tmp_path / "hub", "me/smv-tiny", make_direction(), sha)
    script = textwrap.dedent("""
        from legend_hf import SafetyDirection
        d = SafetyDirection.from_pretrained("me/smv-tiny", revision="main")
        print(d.source, d.source_revision, d.layer)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["me/smv-tiny", sha, "4"]


def test_offline_errors_name_repo_revision_and_file(tmp_path):
    sha = "0123456789abcdef0123456789abcdef01234567"
    _populate_hub_cache(tmp_path, "me/smv-tiny", make_direction(), sha)
    with pytest.raises(HubLookupError, match=r"direction_config.json of model repo 'me/not-there' is not in"):
        SafetyDirection.from_pretrained("me/not-there", cache_dir=tmp_path, local_files_only=True)
    with pytest.raises(
        HubLookupError, match=r"'me/smv-tiny' at revision 'v2' is not in the local Hub cache.*online"
    ):
        SafetyDirection.from_pretrained(
            "me/smv-tiny", revision="v2", cache_dir=tmp_path, local_files_only=True
        )
    loaded = SafetyDirection.from_pretrained("me/smv-tiny", cache_dir=tmp_path, local_files_only=True)
    assert loaded.source_revision == sha  # the commit, from huggingface_hub's own resolution


@pytest.mark.parametrize("name", ["./smv-typo", "smv/typo/folder", "~/nowhere/smv"])
def test_a_local_path_typo_says_no_such_folder(name):
    with pytest.raises(FileNotFoundError, match="no such direction folder"):
        SafetyDirection.from_pretrained(name)


def test_the_weights_file_instead_of_its_folder_says_pass_the_folder(tmp_path):
    make_direction().save_pretrained(tmp_path, card=False)
    with pytest.raises(FileNotFoundError, match="pass the direction's folder"):
        SafetyDirection.from_pretrained(tmp_path / WEIGHTS_NAME)


def test_push_to_hub_and_back_through_a_loopback_hub(hub_server):
    direction = make_direction()
    commit = direction.push_to_hub("user/smv", private=True)
    files = hub_server.files("user/smv")
    assert {WEIGHTS_NAME, CONFIG_NAME, "README.md"} <= set(files)
    assert json.loads(files[CONFIG_NAME])["model_id"] == "org/tiny"
    assert 'SafetyDirection.from_pretrained("user/smv")' in files["README.md"].decode()
    loaded = SafetyDirection.from_pretrained("user/smv")
    assert loaded.fingerprint() == direction.fingerprint()
    assert (loaded.source, loaded.source_revision) == ("user/smv", commit.oid)


def test_push_to_a_new_branch_and_as_a_pull_request(hub_server):
    make_direction().push_to_hub("user/smv")
    other = make_direction(pooling="mean")
    other.push_to_hub("user/smv", revision="v1")  # the branch does not exist yet: it is created
    assert SafetyDirection.from_pretrained("user/smv", revision="v1").pooling == "mean"
    assert SafetyDirection.from_pretrained("user/smv").pooling == "last"
    pr = make_direction(template="chat").push_to_hub("user/smv", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_url
    assert SafetyDirection.from_pretrained("user/smv", revision=pr.pr_revision).template == "chat"


def test_hub_not_found_errors_name_repo_revision_and_file(hub_server):
    with pytest.raises(HubLookupError, match="model repo 'user/nothing' does not exist"):
        SafetyDirection.from_pretrained("user/nothing")
    make_direction().push_to_hub("user/smv")
    with pytest.raises(HubLookupError, match="'user/smv' at revision 'v9': the repo has no such branch"):
        SafetyDirection.from_pretrained("user/smv", revision="v9")
    HfApi().create_repo("user/empty")
    with pytest.raises(
        HubLookupError, match="'user/empty' has no file direction_config.json: not a legend-hf"
    ):
        SafetyDirection.from_pretrained("user/empty")


# ---------------------------------------------------------------- bad artifacts


@pytest.fixture
def saved(tmp_path) -> Path:
    make_direction().save_pretrained(tmp_path, card=False)
    return tmp_path


def test_corrupted_safetensors_names_the_file(saved):
    (saved / WEIGHTS_NAME).write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"direction\.safetensors is not a valid safetensors file"):
        SafetyDirection.from_pretrained(saved)


def test_truncated_safetensors_names_the_file(saved):
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[: len(data) - 10])
    with pytest.raises(ValueError, match=r"direction\.safetensors is not a valid safetensors file"):
        SafetyDirection.from_pretrained(saved)


def test_pickle_only_folder_is_refused(tmp_path):
    torch.save({"layer_4": torch.randn(8)}, tmp_path / "direction.bin")
    with pytest.raises(ValueError, match=r"direction\.bin.*never pickles"):
        SafetyDirection.from_pretrained(tmp_path)


def test_nan_vector_is_refused(saved):
    save_file(
        {"layer_2": torch.randn(8), "layer_4": torch.full((8,), float("nan"))}, str(saved / WEIGHTS_NAME)
    )
    with pytest.raises(ValueError, match="'layer_4' holds NaN or inf"):
        SafetyDirection.from_pretrained(saved)


def test_unknown_format_version_is_refused(saved):
    config = json.loads((saved / CONFIG_NAME).read_text())
    config["format_version"] = 99
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"direction_config\.json has format_version 99"):
        SafetyDirection.from_pretrained(saved)


def test_invalid_json_and_wrong_shape(saved):
    config_text = (saved / CONFIG_NAME).read_text()
    (saved / CONFIG_NAME).write_text(config_text[:20])
    with pytest.raises(ValueError, match=r"direction_config\.json is not valid JSON"):
        SafetyDirection.from_pretrained(saved)
    config = json.loads(config_text)
    config["hidden_size"] = 16
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="expected hidden_size=16"):
        SafetyDirection.from_pretrained(saved)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a legend-hf direction folder"):
        SafetyDirection.from_pretrained(tmp_path)


def test_score_names_of_version_0_1_are_an_error_naming_file_layer_and_names(saved):
    config = json.loads((saved / CONFIG_NAME).read_text())
    config["layer_scores"] = {"2": {"accuracy": 0.9, "auc": 0.95, "n_heldout": 4.0}}  # 0.1's names
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"direction_config.json: layer_scores\[2\] has unknown scores \['accuracy', 'auc'\]"
    ):
        SafetyDirection.from_pretrained(saved)


def test_the_artifact_saves_through_huggingface_hubs_mixin(tmp_path):
    from huggingface_hub import ModelCard, ModelHubMixin

    direction = make_direction()
    assert isinstance(direction, ModelHubMixin)
    assert direction.save_pretrained(tmp_path) == tmp_path
    # The mixin's hooks write the files and the card; no config.json beside direction_config.json.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["README.md", CONFIG_NAME, "direction.safetensors"]
    )
    assert ModelCard.load(tmp_path / "README.md").text == direction.generate_model_card().text
    (tmp_path / "README.md").write_text("stale")
    direction.save_pretrained(tmp_path, model_card_kwargs={"repo_id": "me/smv"})  # a re-save renews the card
    assert 'SafetyDirection.from_pretrained("me/smv")' in (tmp_path / "README.md").read_text()
    assert SafetyDirection.from_pretrained(tmp_path).fingerprint() == direction.fingerprint()
