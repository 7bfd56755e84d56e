"""The error table (docs/reference.md), row by row: the same situation gives the same error class in Python and, in the CLI,
one line on stderr with the exit code the table promises."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import HARMFUL, PAIRS
from datasets import Dataset

from legend_hf import RuntimeOptions, SafetyDirection, annotate_margins, cli, fit_direction
from legend_hf.data_io import load_data
from legend_hf.direction import DirectionModelWarning
from legend_hf.formatting import InputError
from legend_hf.hub import HubLookupError

REPO = Path(__file__).resolve().parents[1]
# The "situation" column of docs/reference.md's error table, each with the exit code the table gives.
ROWS = {
    "an option value the command cannot use": 2,
    "an unknown or misspelt option": 2,
    "a missing local file or folder": 3,
    "a Hub repo, revision or file that is not there, or not cached when offline": 3,
    "a missing column": 3,
    "a value of the wrong type in a row": 3,
    "a corrupted, pickle-only or unknown-version direction": 3,
    "a direction fitted on another hidden size or layer count": 3,
    "the direction's model cannot be loaded (model not given)": 3,
    "a direction fitted on another model id, same shapes": 0,
    "interrupted (Ctrl-C)": 130,
    "anything else (e.g. out of memory on a single text)": 1,
}


def test_the_readme_table_is_this_table():
    readme = (REPO / "docs" / "reference.md").read_text()
    table = {m[0]: int(m[1]) for m in re.findall(r"^\| (.+?) \| `[^|]+` \| (\d+) \|", readme, re.M)}
    assert table == ROWS


@pytest.fixture(scope="module")
def direction_dir(tiny_llama_path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("smv")
    fit_direction(str(tiny_llama_path), HARMFUL).save_pretrained(folder, card=False)
    return folder


def cli_error(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if ": error:" in line]
    assert len(lines) == (1 if code else 0), err
    return code, lines[0] if lines else err


def offline_cli(*argv: str, home: Path) -> tuple[int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "legend_hf.cli", *argv], env=env, capture_output=True, text=True, timeout=300
    )
    errors = [line for line in result.stderr.splitlines() if ": error:" in line]
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.returncode, errors[0]


def test_an_option_value_the_command_cannot_use(direction_dir, capsys):
    with pytest.raises(ValueError, match="bins must be an integer of at least 2"):
        annotate_margins(Dataset.from_list(PAIRS), SafetyDirection.from_pretrained(direction_dir), bins=1)
    code, line = cli_error(capsys, "annotate", "--direction", str(direction_dir), "--bins", "1")
    assert code == ROWS["an option value the command cannot use"] and "--bins must be at least 2" in line


def test_an_unknown_or_misspelt_option(direction_dir, capsys):
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        annotate_margins(
            Dataset.from_list(PAIRS), SafetyDirection.from_pretrained(direction_dir), chosen_colunm="x"
        )
    code, line = cli_error(capsys, "annotate", "--chosen_colunm", "x")
    assert code == ROWS["an unknown or misspelt option"] and "did you mean --chosen_column?" in line


def test_a_missing_local_file_or_folder(capsys):
    with pytest.raises(FileNotFoundError, match="no such direction folder"):
        SafetyDirection.from_pretrained("./smv-typo")
    with pytest.raises(FileNotFoundError, match="no/such/file.jsonl"):
        load_data("no/such/file.jsonl")
    for argv, text in (
        (["--direction", "./smv-typo"], "./smv-typo: no such direction folder"),
        (
            ["--direction", str(REPO / "legend_hf/data/smv-smollm2/direction.safetensors")],
            "pass the direction's folder",
        ),
        (["--dataset", "no/such/file.jsonl"], "no/such/file.jsonl"),
    ):
        code, line = cli_error(capsys, "annotate", *argv)
        assert code == ROWS["a missing local file or folder"] and text in line


def test_a_hub_repo_that_is_not_cached_when_offline(tmp_path):
    with pytest.raises(HubLookupError, match="'me/smv' is not in the local Hub cache"):
        SafetyDirection.from_pretrained("me/smv", cache_dir=tmp_path, local_files_only=True)
    situation = "a Hub repo, revision or file that is not there, or not cached when offline"
    code, line = offline_cli("annotate", "--direction", "me/smv", home=tmp_path)
    assert code == ROWS[situation] and "direction_config.json of model repo 'me/smv'" in line
    code, line = offline_cli("annotate", "--dataset", "me/pairs", home=tmp_path)
    assert code == ROWS[situation] and "dataset 'me/pairs'" in line


def test_a_missing_column(direction_dir, capsys):
    pku = Dataset.from_list([{"prompt": "p", "response_0": "a", "response_1": "b", "safer_response_id": 0}])
    with pytest.raises(KeyError, match="pku_saferlhf_to_pairs"):
        annotate_margins(pku, SafetyDirection.from_pretrained(direction_dir))
    code, line = cli_error(
        capsys, "annotate", "--direction", str(direction_dir), "--prompt_column", "question"
    )
    assert code == ROWS["a missing column"] and "['question']" in line


def test_a_value_of_the_wrong_type_in_a_row(direction_dir, tmp_path, capsys):
    with pytest.raises(InputError, match="column 'chosen', row 1"):
        rows = [dict(PAIRS[0]), {**PAIRS[1], "chosen": None}]
        annotate_margins(Dataset.from_list(rows), SafetyDirection.from_pretrained(direction_dir))
    rows = [dict(PAIRS[0]), {**PAIRS[1], "chosen": ["not", "messages"]}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, line = cli_error(capsys, "annotate", "--direction", str(direction_dir), "--dataset", str(path))
    assert code == ROWS["a value of the wrong type in a row"] and "'chosen', row 1" in line


def test_a_corrupted_direction(direction_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "direction_config.json").write_text((direction_dir / "direction_config.json").read_text())
    (broken / "direction.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="direction.safetensors is not a valid safetensors file"):
        SafetyDirection.from_pretrained(broken)
    code, line = cli_error(capsys, "annotate", "--direction", str(broken))
    assert (
        code == ROWS["a corrupted, pickle-only or unknown-version direction"]
        and "direction.safetensors" in line
    )


def test_a_direction_of_another_shape(tiny_bert_path, tmp_path, capsys):
    wrong = SafetyDirection(
        vectors={4: torch.randn(16)},
        layer=4,
        model_id="x",
        hidden_size=16,
        num_layers=4,
        pooling="last",
        template="none",
    )
    with pytest.raises(InputError, match="hidden_size=16.*cannot be used"):
        annotate_margins(Dataset.from_list(PAIRS), wrong, model=str(tiny_bert_path))
    wrong.save_pretrained(tmp_path / "wrong", card=False)
    code, line = cli_error(
        capsys, "annotate", "--direction", str(tmp_path / "wrong"), "--model", str(tiny_bert_path)
    )
    assert (
        code == ROWS["a direction fitted on another hidden size or layer count"]
        and "cannot be used with" in line
    )


def test_the_directions_model_cannot_be_loaded(direction_dir, tmp_path):
    config = json.loads((direction_dir / "direction_config.json").read_text())
    orphan = tmp_path / "orphan"
    SafetyDirection.from_pretrained(direction_dir).save_pretrained(orphan, card=False)
    (orphan / "direction_config.json").write_text(json.dumps({**config, "model_id": "org/not-there"}))
    situation = "the direction's model cannot be loaded (model not given)"
    code, line = offline_cli("annotate", "--direction", str(orphan), home=tmp_path)
    assert code == ROWS[situation] and "pass model= (CLI: --model)" in line


def test_a_direction_of_another_model_id(direction_dir, tiny_llama_path, tmp_path, capsys):
    import shutil

    copy = tmp_path / "renamed-llama"
    shutil.copytree(tiny_llama_path, copy)
    direction = SafetyDirection.from_pretrained(direction_dir)
    with pytest.warns(DirectionModelWarning, match="check_model_id=False"):
        annotate_margins(Dataset.from_list(PAIRS), direction, model=str(copy))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        annotate_margins(
            Dataset.from_list(PAIRS), direction, model=str(copy), runtime=RuntimeOptions(check_model_id=False)
        )
    argv = [
        "annotate",
        "--direction",
        str(direction_dir),
        "--model",
        str(copy),
        "--limit",
        "4",
        "--output_dir",
        str(tmp_path / "o"),
    ]
    assert cli.main(argv) == ROWS["a direction fitted on another model id, same shapes"]
    assert "legend-hf: warning: direction was fitted on" in capsys.readouterr().err
    assert cli.main([*argv, "--no_check_model_id"]) == 0
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("situation", "error"),
    [
        ("interrupted (Ctrl-C)", KeyboardInterrupt),
        ("anything else (e.g. out of memory on a single text)", torch.OutOfMemoryError),
    ],
)
def test_interrupted_and_everything_else(situation, error, monkeypatch, capsys):
    def fail(*args: object) -> int:
        raise error("out of memory on a single text or pair (8192 padded tokens)")

    monkeypatch.setitem(cli.COMMANDS, "report", fail)
    code = cli.main(["report"])
    assert code == ROWS[situation]
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
