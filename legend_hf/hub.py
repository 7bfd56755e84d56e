"""The Hub, on huggingface_hub's own primitives: downloads whose errors name repo, revision and file and
say what to do, and pushes that work on new branches and hand back the pull request they open.

Local paths always win: a name that exists on disk, or looks like a path (``./x``, ``/x``, ``~/x``, a file
extension, more than one ``/``), is never sent to the Hub, so a typo says "no such folder" rather than
"invalid repo id".
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from .direction import SafetyDirection

LOCAL_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet", ".pq", ".safetensors", ".arrow", ".txt")


class HubLookupError(FileNotFoundError):
    """A repo, revision or file was not found on the Hub or in its local cache (the message says which)."""


def looks_local(ref: str | os.PathLike[str]) -> bool:
    """Whether ``ref`` is meant as a local path (it exists, or cannot be a Hub ``owner/name`` id)."""
    text = str(ref)
    return (
        Path(text).exists()
        or Path(text).suffix.lower() in LOCAL_SUFFIXES
        or text.startswith((".", "/", "~"))
        or text.count("/") > 1
    )


def public_name(ref: str | os.PathLike[str] | None) -> str | None:
    """What to record or publish for a model, direction or dataset reference: a Hub id as it is, a local
    path by its last component only (absolute machine paths never reach a card, a report or the Hub)."""
    if ref is None:
        return None
    return Path(str(ref)).name if looks_local(ref) else str(ref)


def download(
    repo_id: str,
    filenames: Sequence[str],
    *,
    repo_type: str = "model",
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
    missing_hint: str = "",
) -> tuple[list[Path], str]:
    """Download ``filenames`` of one commit of a Hub repo (through the cache; offline aware).

    Returns the local paths and the commit they come from (the first file's commit is resolved first and
    every file is then read at that commit, so a push in between cannot mix two versions). Errors are
    :class:`HubLookupError` naming repo, revision and file; ``missing_hint`` completes the message of a
    file the repo lacks.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_type} repo {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    options: dict[str, Any] = dict(
        repo_id=repo_id,
        repo_type=repo_type,
        cache_dir=cache_dir,
        force_download=force_download,
        token=token,
        local_files_only=local_files_only,
    )
    filename = filenames[0]
    try:
        commit = hf_hub_download(filename=filename, revision=revision, dry_run=True, **options).commit_hash
        paths = [Path(hf_hub_download(filename=f, revision=commit, **options)) for f in filenames]
        return paths, commit
    except HFValidationError as e:
        raise HubLookupError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({e})") from e
    except LocalEntryNotFoundError as e:  # before EntryNotFoundError, its base class
        reason = (
            "HF_HUB_OFFLINE is set"
            if constants.HF_HUB_OFFLINE or local_files_only
            else "the Hub could not be reached"
        )
        raise HubLookupError(
            f"{filename} of {where} is not in the local Hub cache and {reason}: check the repo id and "
            "revision, download it once online (it is cached for offline use), or pass a local folder"
        ) from e
    except RevisionNotFoundError as e:
        raise HubLookupError(f"{where}: the repo has no such branch, tag or commit") from e
    except RepositoryNotFoundError as e:
        raise HubLookupError(
            f"{where} does not exist on the Hub, or it is private or gated: check the id, or log in "
            "(`hf auth login`, or token=)"
        ) from e
    except EntryNotFoundError as e:
        raise HubLookupError(
            f"{where} has no file {filename}" + (f": {missing_hint}" if missing_hint else "")
        ) from e


def push_folder(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    repo_type: str = "model",
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str,
    private: bool | None = None,
    token: str | None = None,
) -> CommitInfo:
    """Upload ``folder`` in one commit, as transformers' ``push_to_hub`` does: create the repo if needed, and
    the branch ``revision`` if it does not exist yet (``create_branch(exist_ok=True)``); with ``create_pr``
    the commit opens a pull request, whose reference the returned ``CommitInfo.pr_revision`` holds."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type=repo_type,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
    )


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
    report: dict[str, Any] | None = None,
    commit_message: str = "Add the legend-hf dataset card and margin histogram",
    **push_kwargs: Any,
) -> CommitInfo:
    """Push an annotated dataset with its card and margin histogram.

    1. ``dataset.push_to_hub`` uploads the data (``push_kwargs``: ``split``, ``config_name``, ``max_shard_size``...;
       a new branch ``revision`` is created) and writes a README whose YAML describes it;
    2. the card (:func:`legend_hf.cards.dataset_card`, with the provenance record in its YAML; ``group_by`` and
       ``report`` go to it) keeps that YAML and is uploaded with the histogram in one commit to the same branch,
       or the same pull request.

    Returns the card commit's ``CommitInfo``; with ``create_pr`` its ``pr_url`` and ``pr_revision`` name the
    pull request that holds data and card. With ``source_dataset`` and no ``license`` / ``source_revision``,
    both are read from the source's Hub page.
    """
    import tempfile

    from huggingface_hub import CommitInfo, DatasetCard, HfApi

    from .cards import dataset_card
    from .plots import HISTOGRAM_NAME, has_matplotlib, margin_histogram

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
            histogram = margin_histogram(dataset, Path(tmp) / HISTOGRAM_NAME).name
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
