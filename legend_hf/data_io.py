"""Reading and writing the datasets the command line works on, and the data that ships with the package.

``load_data`` takes a local CSV/JSON/JSONL/Parquet file, a folder written by ``save_to_disk``, a local
dataset folder, or a Hub dataset id; ``pku_saferlhf_to_pairs`` turns PKU-SafeRLHF's raw schema
(``response_0``/``response_1`` + ``safer_response_id``) into chosen/rejected pairs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .formatting import InputError
from .hub import HubLookupError
from .names import looks_local

PACKAGE_DIR = Path(__file__).parent
DATA_DIR = PACKAGE_DIR / "data"
SAMPLE_PREFERENCES = DATA_DIR / "sample_preferences.jsonl"
FIT_HARMFUL = DATA_DIR / "fit_harmful.jsonl"
REFUSALS = DATA_DIR / "refusals.json"
SAFE_COMPLETIONS = DATA_DIR / "safe_completions.json"
ADVBENCH_FIT = DATA_DIR / "advbench_fit.jsonl"
GRADED_FIT = DATA_DIR / "graded_fit.jsonl"
DEFAULT_DIRECTION = DATA_DIR / "smv-smollm2"
GEMMA_DIRECTION = DATA_DIR / "smv-gemma3-270m"
SHIPPED_DIRECTIONS = {"smv-smollm2": DEFAULT_DIRECTION, "smv-gemma3-270m": GEMMA_DIRECTION}
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".pq": "parquet"}
PKU_COLUMNS = ("response_0", "response_1")


def shipped_folder(installed: str, source: str) -> Path:
    """A folder kept once at the repository's top level (``source``, e.g. ``hub_cards``) that wheels ship
    inside the package (``installed``, see pyproject.toml's package-dir): the wheel's copy, else the source."""
    inside = PACKAGE_DIR / installed
    return inside if inside.is_dir() else PACKAGE_DIR.parent / source


# The `evaluate` metric's folder: evaluate.load(str(METRIC_PATH), ...), which legend_hf.load_metric does.
METRIC_PATH = shipped_folder("metrics/legend_margin", "metrics/legend_margin")


def default_fit_data() -> tuple[list[list[dict[str, Any]]], list[str], list[str]]:
    """The shipped direction's fit data: harmful groups (100 AdvBench rows, the 160 written harmful answers),
    refusals and safe completions, as ``legend_hf.recipes.fit_balanced`` takes them."""
    import json

    groups = [[json.loads(line) for line in path.open()] for path in (ADVBENCH_FIT, FIT_HARMFUL)]
    return groups, json.loads(REFUSALS.read_text()), json.loads(SAFE_COMPLETIONS.read_text())


def graded_fit_data() -> list[dict[str, Any]]:
    """The graded fit prompts (40): each with unsafe answers at severities 1-3, a hedged one (severity 2), and
    three safe ones (severity 0: a curt refusal, an explained refusal, a helpful answer), as
    ``legend_hf.recipes.fit_graded`` takes them (the fit split of ``bench/data/graded``)."""
    import json

    return [json.loads(line) for line in GRADED_FIT.open()]


def load_data(
    source: str | os.PathLike[str],
    *,
    split: str = "train",
    name: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
) -> Any:
    """One split of a dataset as a ``datasets.Dataset``, from a local file or folder or a Hub dataset id.

    Local files are read with the ``datasets`` builder for their extension (their single split is used,
    whatever ``split`` says); ``limit`` keeps the first rows.
    """
    import datasets

    path = Path(source)
    if path.is_file():
        builder = FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise InputError(f"{path}: unknown file type {path.suffix!r}; use one of {sorted(FILE_BUILDERS)}")
        if path.stat().st_size == 0:
            raise InputError(f"{path}: no rows (the file is empty)")
        try:
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        except datasets.exceptions.DatasetGenerationError as e:
            raise InputError(
                f"{path}{_bad_line(path) or f': cannot be read as {builder} ({e.__cause__ or e})'}"
            ) from e
    elif path.is_dir() and (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        dataset = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    elif path.is_dir() or looks_local(source):
        if not path.exists():
            raise FileNotFoundError(f"{source}: no such file or folder")
        dataset = datasets.load_dataset(str(path), name=name, split=split)
    else:
        try:
            dataset = datasets.load_dataset(str(source), name=name, split=split, revision=revision)
        except ConnectionError as e:
            raise HubLookupError(
                f"dataset {source!r}"
                + (f" at revision {revision!r}" if revision else "")
                + f": {e}; check the "
                "id, load it once online (it is cached for offline use), or pass a local file"
            ) from e
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset


def _bad_line(path: Path) -> str | None:
    """``, line N, column C: not valid JSON (...)`` for the first broken line of a JSON Lines file, else ``None``."""
    import json

    if path.suffix.lower() != ".jsonl":
        return None
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            try:
                if line.strip():
                    json.loads(line)
            except json.JSONDecodeError as e:
                return f", line {number}, column {e.colno}: not valid JSON ({e.msg})"
    return None


def write_dataset(dataset: Any, path: str | os.PathLike[str]) -> Path:
    """Write Parquet (``.parquet``) or JSON Lines (``.jsonl``/``.json``), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        dataset.to_parquet(str(path))
    elif path.suffix in (".jsonl", ".json"):
        dataset.to_json(str(path), lines=True, force_ascii=False)
    else:
        raise ValueError(f"{path}: write .parquet or .jsonl")
    return path


def is_pku_saferlhf(column_names: Sequence[str]) -> bool:
    return all(c in column_names for c in (*PKU_COLUMNS, "safer_response_id"))


def pku_pair(row: Mapping[str, Any], index: int, *, preference: str = "safer") -> dict[str, Any]:
    """One PKU-SafeRLHF row's chosen/rejected columns and the labels that follow them (see
    :func:`pku_saferlhf_to_pairs`)."""
    id_column = f"{preference}_response_id"
    first = row.get(id_column)
    if first not in (0, 1):
        raise InputError(f"column {id_column!r}, row {index}: expected 0 or 1, got {first!r}")
    second = 1 - first
    out: dict[str, Any] = {"chosen": row[f"response_{first}"], "rejected": row[f"response_{second}"]}
    if "safer_response_id" in row:
        out["chosen_is_safer"] = row["safer_response_id"] == first
    for side, i in (("chosen", first), ("rejected", second)):
        if f"is_response_{i}_safe" in row:
            out[f"{side}_is_safe"] = row[f"is_response_{i}_safe"]
        if f"response_{i}_severity_level" in row:
            out[f"{side}_severity"] = row[f"response_{i}_severity_level"]
    return out


def pku_saferlhf_to_pairs(dataset: Any, *, preference: str = "safer") -> Any:
    """PKU-SafeRLHF rows (prompt, response_0, response_1, ``safer_response_id``...) as preference pairs.

    ``chosen`` is the safer response (``preference="better"``: the more helpful one, ``better_response_id``),
    ``rejected`` the other. The per-response labels follow the pair as ``chosen_is_safe``/``rejected_is_safe``
    and ``chosen_severity``/``rejected_severity`` so that ``legend-hf report`` can score margins against them;
    ``chosen_is_safer`` records whether chosen is the safer one. The original columns are kept.
    """
    if preference not in ("safer", "better"):
        raise ValueError(f"preference must be 'safer' or 'better', got {preference!r}")
    missing = [c for c in (*PKU_COLUMNS, f"{preference}_response_id") if c not in dataset.column_names]
    if missing:
        raise KeyError(
            f"not PKU-SafeRLHF data: missing column(s) {missing}; the dataset has {dataset.column_names}"
        )
    taken = [c for c in ("chosen", "rejected") if c in dataset.column_names]
    if taken:
        raise ValueError(f"the dataset already has {taken} column(s): it needs no PKU-SafeRLHF conversion")
    return dataset.map(
        pku_pair,
        with_indices=True,
        fn_kwargs={"preference": preference},
        desc="PKU-SafeRLHF to chosen/rejected",
    )
