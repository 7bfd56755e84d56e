"""Annotate on a Ray cluster with Ray Data: one :class:`MarginAnnotator` (one model) per actor.

Needs the optional extra ``pip install "legend-hf[ray]"``. Rows get their input index in a
``legend_hf_row`` column before they are spread over the actors; the output is a folder of Parquet
files (in no particular order) plus ``legend_hf_run.json``, and :func:`legend_hf.distributed.load_annotated`
returns the rows in input order after checking that each one is there exactly once.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

from .annotate import MarginAnnotator
from .direction import SafetyDirection
from .distributed import ROW_COLUMN, run_settings, write_manifest
from .provenance import COLUMN_TYPES

RUN_KEY = "legend_hf_run"  # Parquet schema metadata: how the actor's model ran (Scorer.run_fields)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError('annotate_with_ray needs Ray Data: pip install "legend-hf[ray]"') from err
    return ray


class _RayAnnotator:
    """The Ray actor: loads the model once (on the GPU Ray assigns it, if any) and annotates Arrow batches."""

    def __init__(self, annotator: MarginAnnotator) -> None:
        self.annotator = annotator

    def __call__(self, table: Any) -> Any:
        import pyarrow as pa
        from datasets import Value

        out = self.annotator(
            table.to_pydict(), table.column(ROW_COLUMN).to_pylist()
        )  # errors name input rows
        # How this actor's model ran, for the record the driver writes (it never loads the model).
        run = json.dumps(self.annotator.scorer.run_fields())
        table = table.replace_schema_metadata({RUN_KEY: run})
        for column in self.annotator.new_columns:
            table = table.append_column(
                column, pa.array(out[column], type=Value(COLUMN_TYPES[column]).pa_type)
            )
        return table


def _filesystem(path: str) -> tuple[Any, str]:
    """A pyarrow filesystem and path for a local path or a URI (``s3://``, ``gs://``, ...)."""
    import pyarrow.fs as pafs

    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def parquet_pieces(paths: str | os.PathLike[str] | list[str]) -> tuple[list[dict[str, Any]], int, Any]:
    """One piece per Parquet row group, in input order (folders: their ``*.parquet`` files sorted by name),
    with the index of its first row; and the number of rows and the Arrow schema. Reads footers only."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    files: list[str] = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        uri = str(path)
        fs, local = _filesystem(uri)
        if fs.get_file_info(local).type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(local, recursive=True))
            found = sorted(i.path for i in infos if i.is_file and i.path.endswith(".parquet"))
            prefix = uri.split("://")[0] + "://" if "://" in uri else ""
            files.extend(prefix + f for f in found)
        else:
            files.append(uri)
    if not files:
        raise FileNotFoundError(f"no Parquet files in {paths}")
    pieces, start, schema = [], 0, None
    for file in files:
        fs, local = _filesystem(file)
        meta = pq.read_metadata(local, filesystem=fs)
        schema = schema or meta.schema.to_arrow_schema()
        for group in range(meta.num_row_groups):
            pieces.append({"path": file, "row_group": group, "start": start})
            start += meta.row_group(group).num_rows
    return pieces, start, schema


def _run_fields(folder: Path) -> dict[str, Any]:
    """How the actors' models ran, from the schema metadata of the Parquet files they wrote."""
    import pyarrow.parquet as pq

    part = next(iter(sorted(folder.rglob("*.parquet"))))
    metadata = pq.read_schema(part).metadata or {}
    return dict(json.loads(metadata[RUN_KEY.encode()])) if RUN_KEY.encode() in metadata else {}


def _read_pieces(batch: Any) -> Any:
    """Ray task: read the row groups named in ``batch`` and add their input row indices."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for piece in batch.to_pylist():
        fs, local = _filesystem(piece["path"])
        table = pq.ParquetFile(local, filesystem=fs).read_row_group(piece["row_group"])
        index = pa.array(range(piece["start"], piece["start"] + table.num_rows), type=pa.int64())
        tables.append(table.replace_schema_metadata(None).append_column(ROW_COLUMN, index))
    return pa.concat_tables(tables)


def annotate_with_ray(
    source: Any,
    direction: SafetyDirection,
    *,
    output: str | os.PathLike[str],
    num_actors: int | None = None,
    num_gpus_per_actor: float | None = None,
    num_cpus_per_actor: float = 1,
    batch_size: int = 1000,
    **annotator_options: Any,
) -> Path:
    """Annotate ``source`` (a ``datasets.Dataset``, or Parquet files/folders, local or ``s3://``-style URIs)
    with Ray Data ``map_batches`` over a pool of ``num_actors`` actors, each holding one model, and write
    Parquet files to the folder ``output`` (local or shared storage; it must be empty).

    Connects to the running Ray cluster (``ray.init()``: ``RAY_ADDRESS``, or a local runtime). By default
    each actor takes one GPU when the cluster has GPUs and there is one actor per GPU (else per
    ``num_cpus_per_actor`` CPUs). Read the result with :func:`legend_hf.distributed.load_annotated`.
    ``annotator_options`` go to :class:`MarginAnnotator` (the model is loaded by the actors only).
    """
    ray = _import_ray()
    import pyarrow as pa
    from datasets import Dataset, Features, Value

    if "://" in str(output):
        raise ValueError(f"output must be a folder on a local or shared filesystem, got {output}")
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty: Ray would add files to it")
    annotator = MarginAnnotator(direction, lazy=True, **annotator_options)  # the actors load the model
    if isinstance(source, Dataset):
        if ROW_COLUMN in source.column_names:
            raise ValueError(f"the dataset already has a {ROW_COLUMN!r} column; remove it first")
        input_features, num_rows = source.features, len(source)
        table = source.with_format("arrow")[:]
        table = table.replace_schema_metadata(None).append_column(
            ROW_COLUMN, pa.array(range(num_rows), pa.int64())
        )
    else:
        pieces, num_rows, schema = parquet_pieces(source)
        input_features = Features.from_arrow_schema(schema)
    annotator.check_columns(list(input_features))
    run: dict[str, Any] = {}  # how the actors' models ran: read back from their output
    if num_rows:
        if not ray.is_initialized():
            ray.init()
        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0)
        if num_gpus_per_actor is None:
            num_gpus_per_actor = 1 if gpus else 0
        if num_actors is None:
            # On CPUs, leave one CPU to Ray Data's read and write tasks (actors holding all CPUs stall the run).
            num_actors = (
                int(gpus // num_gpus_per_actor)
                if num_gpus_per_actor
                else int(resources.get("CPU", 1) // num_cpus_per_actor) - 1
            )
        num_actors = max(1, num_actors)
        # Enough blocks to keep every actor busy: the pool hands out whole blocks.
        num_blocks = min(num_rows, max(4 * num_actors, math.ceil(num_rows / 20_000)))
        if isinstance(source, Dataset):
            # from_huggingface's path for a local Dataset (minus its Hub lookup), cut into blocks.
            bounds = [round(i * num_rows / num_blocks) for i in range(num_blocks + 1)]
            data = ray.data.from_arrow([table.slice(a, b - a) for a, b in itertools.pairwise(bounds)])
        else:
            data = (
                ray.data.from_items(pieces, override_num_blocks=len(pieces))
                .map_batches(_read_pieces, batch_size=1, batch_format="pyarrow")
                .repartition(num_blocks)
            )
        data.map_batches(
            _RayAnnotator,
            fn_constructor_kwargs={"annotator": annotator},
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_gpus=num_gpus_per_actor,
            num_cpus=num_cpus_per_actor,
        ).write_parquet(str(out))
        run = _run_fields(out)
    out.mkdir(parents=True, exist_ok=True)
    features = annotator.features(input_features, run)
    features[ROW_COLUMN] = Value("int64")
    write_manifest(
        out,
        {
            "engine": "ray",
            "num_rows": num_rows,
            **run_settings(annotator, run),
            "features": features.to_dict(),
        },
    )
    return out
