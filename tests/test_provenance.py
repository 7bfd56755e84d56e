"""The provenance record: one writer (annotate_margins/scale_margins), one reader (read_record), and it
survives every way people save and share data (the Hub route is in test_cards.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import HARMFUL, PAIRS
from datasets import Dataset, load_dataset, load_from_disk

from legend_hf import (
    MarginAnnotator,
    SafetyDirection,
    __version__,
    annotate_margins,
    dataset_card,
    fit_direction,
    read_record,
    scale_margins,
)
from legend_hf.provenance import AnnotationRecord


@pytest.fixture(scope="module")
def direction(tiny_llama_path, tmp_path_factory) -> SafetyDirection:
    folder = tmp_path_factory.mktemp("smv-tiny")
    fit_direction(str(tiny_llama_path), HARMFUL, layer=[2, -1]).save_pretrained(folder, card=False)
    return SafetyDirection.from_pretrained(folder)


@pytest.fixture(scope="module")
def binned(direction) -> Dataset:
    return annotate_margins(Dataset.from_list(PAIRS * 3), direction, scale="standardize", bins=3)


def test_the_record_says_how_the_margins_were_made(binned, direction):
    record = read_record(binned)
    assert isinstance(record, AnnotationRecord)
    assert record.direction == Path(direction.source).name  # a folder's name, never a machine path
    assert record.direction_fingerprint == direction.fingerprint()
    assert (record.layer, record.num_layers, record.pooling, record.template, record.method) == (
        direction.layer,
        direction.num_layers,
        direction.pooling,
        direction.template,
        direction.method,
    )
    assert record.model_id == Path(direction.model_id).name  # the local model folder's name, no machine path
    assert record.library_version == __version__
    assert record.scale == "standardize" and record.bins == 3 and len(record.bin_edges) == 2


def test_to_parquet_and_load_dataset_keep_the_record(binned, tmp_path):
    binned.to_parquet(tmp_path / "train.parquet")
    back = load_dataset("parquet", data_files=str(tmp_path / "train.parquet"), split="train")
    assert read_record(back) == read_record(binned)
    assert back.info.description == ""  # what used to carry the settings is gone, the record is not


def test_save_to_disk_map_filter_select_keep_the_record(binned, tmp_path):
    binned.save_to_disk(tmp_path / "disk")
    back = load_from_disk(str(tmp_path / "disk"))
    assert read_record(back) == read_record(binned)
    changed = back.map(lambda row: {"note": "x"}).filter(lambda row: True).select(range(5))
    assert read_record(changed) == read_record(binned)


def test_json_lines_lose_the_schema_and_the_card_carries_the_record(binned, tmp_path):
    binned.to_json(tmp_path / "train.jsonl")
    back = load_dataset("json", data_files=str(tmp_path / "train.jsonl"), split="train")
    assert read_record(back) is None
    dataset_card(binned).save(tmp_path / "README.md")
    assert read_record(back, tmp_path / "README.md") == read_record(binned)


def test_a_plain_map_has_no_record_and_says_so(direction):
    plain = Dataset.from_list(PAIRS).map(MarginAnnotator(direction), batched=True)
    assert read_record(plain) is None


def test_a_margin_rewritten_by_hand_is_not_described_by_the_record(binned, direction):
    """`datasets` keeps the feature (and the record) through a map that rewrites ``margin``: read_record
    checks the margins against the record and refuses a stale one; scale_margins keeps it true."""
    halved = binned.map(lambda row: {"margin": 0.5 * row["margin"]})
    with pytest.warns(UserWarning, match="changed after annotation"):
        assert read_record(halved) is None
    raw = annotate_margins(Dataset.from_list(PAIRS), direction)
    with pytest.warns(UserWarning, match="changed after annotation"):
        assert read_record(raw.map(lambda row: {"margin": 2 * row["margin"]})) is None
    rescaled = scale_margins(binned, scale=0.5)
    assert read_record(rescaled).scale_factor == 0.5 and read_record(rescaled).bins is None


def test_the_record_says_how_the_model_ran(direction, tmp_path):
    """Non-default runtime options are what the record holds, also after a Parquet round trip."""
    from legend_hf import RuntimeOptions

    runtime = RuntimeOptions(dtype="bfloat16", max_length=24, model_revision="main")
    annotated = annotate_margins(Dataset.from_list(PAIRS), direction, runtime=runtime)
    record = read_record(annotated)
    assert (record.dtype, record.residual_dtype) == ("bfloat16", "float32")  # bf16 matmuls, float32 stream
    assert record.max_length == 24 != direction.max_length
    assert record.model_revision == "main"
    annotated.to_parquet(tmp_path / "train.parquet")
    back = load_dataset("parquet", data_files=str(tmp_path / "train.parquet"), split="train")
    assert read_record(back) == record
    exact = read_record(
        annotate_margins(Dataset.from_list(PAIRS), direction, runtime=RuntimeOptions(dtype="float32"))
    )
    assert (exact.dtype, exact.residual_dtype, exact.max_length) == (
        "float32",
        "float32",
        direction.max_length,
    )
