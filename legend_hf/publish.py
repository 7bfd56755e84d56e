"""Publishing an annotated dataset: its card and margin histogram, rendered for a ``Dataset``, and the push of
data, card and histogram to the Hub.

:mod:`legend_hf.cards` and :mod:`legend_hf.plots` render from plain data; this module reads what they need
from the dataset (its record, its report, its raw margins) and :mod:`legend_hf.hub` carries the files.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cards import dataset_card as render_dataset_card
from .cards import fit_description
from .data_io import write_dataset
from .direction import SafetyDirection
from .names import public_name
from .plots import HISTOGRAM_NAME, has_matplotlib, margin_histogram
from .provenance import AnnotationRecord, read_record
from .report import AnnotationReport, annotation_report
from .stats import clean, margin_values

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo, DatasetCard


def dataset_histogram(dataset: Any, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write the PNG histogram of an annotated dataset's raw margins (``margin_raw`` when present, else
    ``margin``) with the bin edges its record holds, in raw units."""
    values, column = margin_values(dataset)
    record = read_record(dataset)
    edges = None
    if record is not None and record.bin_edges and column == "margin_raw":
        edges = [edge / record.scale_factor for edge in record.bin_edges]
    return margin_histogram(values, path, bin_edges=edges, title=title, before_scaling=column == "margin_raw")


def dataset_card(
    dataset: Any,
    direction: SafetyDirection | None = None,
    *,
    source_dataset: str | None = None,
    source_revision: str | None = None,
    license: str | None = None,
    pretty_name: str | None = None,
    language: str | list[str] | None = None,
    repo_id: str | None = None,
    histogram: str | None = None,
    group_by: str | None = None,
    record: AnnotationRecord | None = None,
    report: AnnotationReport | None = None,
) -> DatasetCard:
    """The card of an annotated dataset (:func:`legend_hf.cards.dataset_card` rendered for ``dataset``).

    Settings come from the dataset's provenance record (``record`` overrides it); ``direction``, when given,
    adds how it was fitted and must be the one the record names. ``histogram`` is the image the card shows
    (write it with :func:`dataset_histogram`); ``repo_id`` names the dataset in the usage snippet; ``group_by``
    (default ``pair_type`` when present) splits the statistics by the values of a column. ``report`` is the
    dataset's :func:`legend_hf.annotation_report` (default: computed with the default column names,
    ``prompt``/``chosen``/``rejected`` or HH-RLHF dialogues). ``license`` defaults to ``dataset.info.license``:
    carry the source dataset's license.
    """
    record = record or read_record(dataset)
    if (
        record is not None
        and direction is not None
        and record.direction_fingerprint != direction.fingerprint()
    ):
        raise ValueError(
            f"the dataset was annotated with direction fingerprint {record.direction_fingerprint} (from "
            f"{record.direction!r}), not with this direction ({direction.fingerprint()}): pass the direction "
            "that annotated it"
        )
    if record is None and direction is None:
        raise ValueError(
            "the dataset has no legend-hf record (annotated by a plain Dataset.map?): pass the direction "
            "that annotated it"
        )
    if group_by is None and "pair_type" in dataset.column_names:
        group_by = "pair_type"
    report = report or annotation_report(dataset, group_column=group_by)
    return render_dataset_card(
        record if record is not None else direction.record(),  # type: ignore[union-attr]
        report.to_dict(),
        n_rows=len(dataset),
        columns=dataset.column_names,
        recorded=record is not None,
        fit=fit_description(direction.config_dict()) if direction is not None else None,
        source_dataset=source_dataset,
        source_revision=source_revision,
        license=license or getattr(dataset.info, "license", None) or None,
        pretty_name=pretty_name,
        language=language,
        repo_id=repo_id,
        histogram=histogram,
        group_by=group_by,
    )


def save_annotated(
    dataset: Any,
    folder: str | os.PathLike[str],
    direction: SafetyDirection | None = None,
    *,
    split: str = "train",
    format: str = "parquet",
    source_dataset: str | None = None,
    source_revision: str | None = None,
    license: str | None = None,
    repo_id: str | None = None,
    report: AnnotationReport | None = None,
) -> list[Path]:
    """Write an annotated dataset to ``folder`` as ``legend-hf annotate`` does: ``<split>.<format>`` (``parquet``
    or ``jsonl``), its card (README.md) and margin histogram (with matplotlib) and ``report.json`` (``report``:
    its :func:`legend_hf.annotation_report`, default computed with the default column names). The local
    counterpart of :func:`push_annotated_dataset`; returns the paths written."""
    folder = Path(folder)
    report = report or annotation_report(dataset)
    written = [write_dataset(dataset, folder / f"{split}.{format}")]
    histogram = (
        dataset_histogram(dataset, folder / HISTOGRAM_NAME) if has_matplotlib() and len(dataset) else None
    )
    card = dataset_card(
        dataset,
        direction,
        source_dataset=public_name(source_dataset),
        source_revision=source_revision,
        license=license,
        histogram=histogram.name if histogram else None,
        repo_id=repo_id,
        report=report,
    )
    card.save(folder / "README.md")
    written.append(folder / "README.md")
    written += [histogram] if histogram else []
    summary = {"dataset": public_name(source_dataset), **report.to_dict()}
    (folder / "report.json").write_text(json.dumps(clean(summary), indent=2) + "\n")
    return [*written, folder / "report.json"]


def push_annotated_dataset(
    dataset: Any,
    repo_id: str,
    direction: SafetyDirection | None = None,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    source_dataset: str | None = None,
    source_revision: str | None = None,
    license: str | None = None,
    pretty_name: str | None = None,
    language: str | list[str] | None = None,
    group_by: str | None = None,
    report: AnnotationReport | None = None,
    commit_message: str = "Add the legend-hf dataset card and margin histogram",
    **push_kwargs: Any,
) -> CommitInfo:
    """Push an annotated dataset with its card and margin histogram.

    1. ``dataset.push_to_hub`` uploads the data (``push_kwargs``: ``split``, ``config_name``, ``max_shard_size``...;
       a new branch ``revision`` is created) and writes a README whose YAML describes it;
    2. the card (:func:`dataset_card`, with the provenance record in its YAML; ``group_by`` and ``report`` go to
       it) keeps that YAML and is uploaded with the histogram in one commit to the same branch, or the same
       pull request.

    Returns the card commit's ``CommitInfo``; with ``create_pr`` its ``pr_url`` and ``pr_revision`` name the
    pull request that holds data and card. With ``source_dataset`` and no ``license`` / ``source_revision``,
    both are read from the source's Hub page.
    """
    from huggingface_hub import CommitInfo, DatasetCard, HfApi

    api = HfApi(token=token)
    if source_dataset and (license is None or source_revision is None):
        info = api.dataset_info(source_dataset, revision=source_revision)
        license = license or (info.card_data.get("license") if info.card_data is not None else None)
        source_revision = source_revision or info.sha
    pushed = dataset.push_to_hub(
        repo_id, private=private, token=token, revision=revision, create_pr=create_pr, **push_kwargs
    )
    repo_id = pushed.repo_url.repo_id
    target = pushed.pr_revision or revision
    readme = api.hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=pushed.oid)
    data_card = DatasetCard(Path(readme).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        histogram = None
        if has_matplotlib() and len(dataset):
            histogram = dataset_histogram(dataset, Path(tmp) / HISTOGRAM_NAME).name
        card = dataset_card(
            dataset,
            direction,
            source_dataset=source_dataset,
            source_revision=source_revision,
            license=license,
            pretty_name=pretty_name,
            language=language,
            repo_id=repo_id,
            histogram=histogram,
            group_by=group_by,
            report=report,
        )
        for key in ("dataset_info", "configs"):
            if key in data_card.data:
                card.data[key] = data_card.data[key]
        card.save(Path(tmp) / "README.md")
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            repo_type="dataset",
            revision=target,
            create_pr=create_pr and pushed.pr_url is None,  # the data had not changed: the card opens the PR
            commit_message=commit_message,
        )
    if pushed.pr_url is None or commit.pr_url is not None:
        return commit
    return CommitInfo(
        commit_url=commit.commit_url,
        commit_message=commit.commit_message,
        commit_description=commit.commit_description,
        oid=commit.oid,
        pr_url=pushed.pr_url,
    )
