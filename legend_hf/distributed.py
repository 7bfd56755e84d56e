"""Resumable annotation in shards, over one or many processes (``torchrun``, ``accelerate launch``, Slurm).

A run splits the dataset into fixed row ranges of ``shard_size`` rows and writes each annotated range
to ``<output_dir>/shard-00003.parquet``, next to ``legend_hf_run.json`` (what the run computes). A shard
is written to a temporary file and renamed once complete, so a killed run leaves only finished shards;
a restart checks every shard's Parquet metadata (row range, hash of the input rows, annotator settings)
and computes only the missing ones. Process ``rank`` of ``world_size`` (torchrun's ``RANK`` and
``WORLD_SIZE`` by default) takes shards ``rank, rank + world_size, ...``: the ranks need no
coordination, and a resumed run may use another number of processes. :func:`load_annotated` merges
the shards into one ``Dataset`` in input order (and reads the output of :mod:`legend_hf.ray_engine`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from .annotate import MarginAnnotator
from .direction import SafetyDirection
from .options import RuntimeOptions
from .provenance import RECORD_KEY

logger = logging.getLogger(__name__)

MANIFEST_NAME = "legend_hf_run.json"
ROW_COLUMN = "legend_hf_row"  # input row index, added by engines whose workers see rows out of order
_SHARD_KEY = b"legend_hf_shard"  # a shard's rows and the run it belongs to (the record is under legend_hf)


@dataclass
class ShardRun:
    """What one process did: the shard indices it computed and the finished ones it skipped."""

    output_dir: Path
    num_shards: int
    rank: int = 0
    world_size: int = 1
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)


def run_settings(annotator: MarginAnnotator, run: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an annotation computes, in the provenance record's schema: the record of its margins
    (:class:`legend_hf.provenance.AnnotationRecord`, under ``legend_hf``; ``run``: how the model ran, default
    loaded) and the text ``columns`` it reads. Device, batch sizes and warnings change no margin and are not in it."""
    return {RECORD_KEY: annotator.record(run).to_dict(), "columns": list(annotator.columns)}


def _run_fingerprint(settings: dict[str, Any]) -> str:
    """What a finished shard must have been computed with (the library version aside)."""
    record = {k: v for k, v in settings[RECORD_KEY].items() if k != "library_version"}
    return _fingerprint({**settings, RECORD_KEY: record})


def _fingerprint(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=repr).encode()).hexdigest()[:32]


def write_manifest(output_dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``legend_hf_run.json``, or check that the one there describes the same run."""
    path = output_dir / MANIFEST_NAME
    if path.is_file():
        existing = json.loads(path.read_text())
        differing = sorted(k for k in set(existing) | set(manifest) if existing.get(k) != manifest.get(k))
        if differing:
            details = "; ".join(f"{k}: {existing.get(k)!r} there, {manifest.get(k)!r} now" for k in differing)
            raise ValueError(
                f"{output_dir} holds another annotation run ({details}); use a new output folder "
                "or delete this one"
            )
        return
    _atomic_write(path, lambda f: f.write(json.dumps(manifest, indent=2).encode()))


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename: readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def shard_ranges(num_rows: int, shard_size: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` row ranges of ``shard_size`` rows (the last one shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return [(start, min(start + shard_size, num_rows)) for start in range(0, num_rows, shard_size)]


def shard_path(output_dir: Path, index: int) -> Path:
    return output_dir / f"shard-{index:05d}.parquet"


def _shard_metadata(path: Path) -> dict[str, Any] | None:
    """The ``legend_hf`` Parquet metadata of a finished shard file, ``None`` when there is none (or unreadable)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        return None
    try:
        meta = pq.read_metadata(path)
    except (OSError, pa.ArrowException) as err:
        logger.warning("%s is unreadable (%s): recomputing it", path, err)
        return None
    data = (meta.metadata or {}).get(_SHARD_KEY)
    if data is None:
        return None
    return {**json.loads(data), "num_rows": meta.num_rows}


def annotate_shards(
    dataset: Any,
    direction: SafetyDirection,
    output_dir: str | os.PathLike[str],
    *,
    shard_size: int = 10_000,
    batch_size: int = 1000,
    rank: int | None = None,
    world_size: int | None = None,
    **annotator_options: Any,
) -> ShardRun:
    """Annotate this process's shards of ``dataset`` into ``output_dir``, skipping the ones already finished.

    ``rank``/``world_size`` default to the ``RANK``/``WORLD_SIZE`` environment variables (torchrun,
    accelerate) or 0/1. The model loads only when a shard needs computing. Merge with :func:`load_annotated`
    once every process has finished. ``annotator_options`` go to :class:`MarginAnnotator` (fixed ``scale``
    and ``bin_edges`` only: dataset-wide standardisation needs all margins first).
    """
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"annotate_shards needs a datasets.Dataset (rows by index), got {type(dataset).__name__}"
        )
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    # Lazy: the model loads at the first shard to compute, not when every shard is done.
    annotator = MarginAnnotator(direction, lazy=True, **annotator_options)
    annotator.check_columns(dataset.column_names)
    run_fields = annotator.scorer.run_fields()
    settings = run_settings(annotator, run_fields)
    ranges = shard_ranges(len(dataset), shard_size)
    features = annotator.features(dataset.features, run_fields)
    write_manifest(
        output,
        {
            "engine": "shards",
            "num_rows": len(dataset),
            "shard_size": shard_size,
            "num_shards": len(ranges),
            **settings,
            "features": features.to_dict(),
        },
    )
    config_fp = _run_fingerprint(settings)
    rows = dataset.with_format(None)
    run = ShardRun(output, len(ranges), rank, world_size)
    for index in range(rank, len(ranges), world_size):
        start, stop = ranges[index]
        path = shard_path(output, index)
        expected = {
            "start": start,
            "stop": stop,
            "input_sha256": _fingerprint(rows[start:stop]),
            "run_fingerprint": config_fp,
        }
        found = _shard_metadata(path)
        if found is not None and found.pop("num_rows") == stop - start and found == expected:
            run.skipped.append(index)
            continue
        if found is not None:
            logger.warning(
                "%s holds other rows or settings than rows %d-%d of this run: recomputing it",
                path,
                start,
                stop,
            )
        began = time.perf_counter()
        table = _annotate_range(rows, annotator, features, start, stop, batch_size)
        metadata = {**(table.schema.metadata or {}), _SHARD_KEY: json.dumps(expected).encode()}
        _write_table(path, table.replace_schema_metadata(metadata))
        run.computed.append(index)
        logger.info(
            "shard %d/%d (rows %d-%d) annotated in %.1f s",
            index + 1,
            len(ranges),
            start,
            stop,
            time.perf_counter() - began,
        )
    return run


def _annotate_range(
    rows: Any, annotator: MarginAnnotator, features: Any, start: int, stop: int, batch_size: int
) -> Any:
    """Rows ``[start, stop)`` with the new columns, as an Arrow table carrying the `datasets` features."""
    import pyarrow as pa

    new: dict[str, list[Any]] = {c: [] for c in annotator.new_columns}
    for begin in range(start, stop, batch_size):
        end = min(begin + batch_size, stop)
        out = annotator(rows[begin:end], list(range(begin, end)))  # errors name dataset rows
        for column in new:
            new[column].extend(out[column])
    table = rows.with_format("arrow")[start:stop]
    for column, values in new.items():
        table = table.append_column(column, pa.array(values, type=features[column].pa_type))
    return table.cast(features.arrow_schema)


def _write_table(path: Path, table: Any) -> None:
    import pyarrow.parquet as pq

    _atomic_write(path, lambda f: pq.write_table(table, f))


def worker_runtime(runtime: RuntimeOptions | None = None) -> RuntimeOptions:
    """The runtime of this process's worker: ``runtime`` as given, on ``cuda:$LOCAL_RANK`` (made the current
    CUDA device) when GPUs exist and ``runtime`` names no device."""
    runtime = runtime or RuntimeOptions()
    if runtime.device is None and torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        runtime = replace(runtime, device=f"cuda:{local_rank}")
    return runtime


def annotate_distributed(
    dataset: Any,
    direction: SafetyDirection,
    output_dir: str | os.PathLike[str],
    *,
    shard_size: int = 10_000,
    batch_size: int = 1000,
    timeout: timedelta = timedelta(hours=24),
    runtime: RuntimeOptions | None = None,
    **annotator_options: Any,
) -> Any:
    """Resumable annotation under ``torchrun``/``accelerate launch`` (or alone): returns the merged ``Dataset``
    on rank 0 and ``None`` on the other ranks.

    Every rank annotates its shards (:func:`annotate_shards`) with :func:`worker_runtime` (``runtime``, on
    ``cuda:$LOCAL_RANK`` when GPUs exist and ``runtime`` names no device), then
    waits for the others at a ``torch.distributed`` barrier (``gloo`` on CPU, ``nccl`` on GPU, created here
    when the launcher has not; ``timeout`` bounds the wait for the slowest rank), and rank 0 merges the
    shards. Without a launcher it is a single resumable process. Rerun the same command after a crash: only
    the missing shards are computed.
    """
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    runtime = worker_runtime(runtime)
    created = world_size > 1 and not dist.is_initialized()
    if created:
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    try:
        annotate_shards(
            dataset,
            direction,
            output_dir,
            shard_size=shard_size,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            runtime=runtime,
            **annotator_options,
        )
        if world_size > 1:
            dist.barrier()
        return load_annotated(output_dir) if rank == 0 else None
    finally:
        if created:
            dist.destroy_process_group()


def load_annotated(path: str | os.PathLike[str]) -> Any:
    """The ``Dataset`` an engine wrote to ``path`` (a shard run or Ray output), in input order.

    Checks that every input row is there exactly once; an unfinished shard run is an error naming the
    missing shards.
    """
    from datasets import Dataset, Features

    folder = Path(path)
    manifest_file = folder / MANIFEST_NAME
    if not manifest_file.is_file():
        raise FileNotFoundError(f"{manifest_file} not found: {folder} is not the output of a legend-hf run")
    manifest = json.loads(manifest_file.read_text())
    num_rows = manifest["num_rows"]
    if manifest["engine"] == "shards":
        files = [shard_path(folder, i) for i in range(manifest["num_shards"])]
        ranges = shard_ranges(num_rows, manifest["shard_size"])
        config_fp = _run_fingerprint({k: manifest[k] for k in (RECORD_KEY, "columns")})
        missing = []
        for i, (file, (start, stop)) in enumerate(zip(files, ranges, strict=True)):
            meta = _shard_metadata(file)
            if meta is None or (
                meta["start"],
                meta["stop"],
                meta["num_rows"],
                meta["run_fingerprint"],
            ) != (start, stop, stop - start, config_fp):
                missing.append(i)
        if missing:
            raise ValueError(
                f"{folder}: {len(missing)} of {len(files)} shards are not finished ({missing[:20]}"
                f"{' ...' if len(missing) > 20 else ''}); rerun the annotation to complete them"
            )
        merged = Dataset.from_parquet([str(f) for f in files]) if files else _empty(manifest)
    elif manifest["engine"] == "ray":
        parts = sorted(str(f) for f in folder.rglob("*.parquet"))
        features = Features.from_dict(manifest["features"]) if manifest.get("features") else None
        merged = Dataset.from_parquet(parts, features=features) if parts else _empty(manifest)
        merged = _in_input_order(merged, num_rows, folder)
    else:
        raise ValueError(f"{manifest_file}: unknown engine {manifest['engine']!r}")
    if len(merged) != num_rows:
        raise ValueError(f"{folder} holds {len(merged)} rows, the input had {num_rows}")
    return merged


def _in_input_order(dataset: Any, num_rows: int, folder: Path) -> Any:
    """Sort rows by ``legend_hf_row`` and drop it, after checking it holds each of 0..num_rows-1 once."""
    import numpy as np

    if len(dataset) == 0:
        return dataset.remove_columns(ROW_COLUMN) if ROW_COLUMN in dataset.column_names else dataset
    index = np.asarray(dataset.data.column(ROW_COLUMN).to_numpy())
    order = np.argsort(index, kind="stable")
    expected = np.arange(num_rows)
    if len(index) != num_rows or not np.array_equal(index[order], expected):
        counts = np.bincount(index, minlength=num_rows)
        raise ValueError(
            f"{folder}: rows missing {np.flatnonzero(counts == 0)[:20].tolist()}, duplicated "
            f"{np.flatnonzero(counts > 1)[:20].tolist()} (of {num_rows}); was the folder written twice?"
        )
    if not np.array_equal(order, expected):
        dataset = dataset.select(order).flatten_indices()
    return dataset.remove_columns(ROW_COLUMN)


def _empty(manifest: dict[str, Any]) -> Any:
    from datasets import Dataset, Features

    features = Features(
        {c: f for c, f in Features.from_dict(manifest["features"]).items() if c != ROW_COLUMN}
    )
    return Dataset.from_dict({c: [] for c in features}, features=features)
