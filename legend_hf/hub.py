"""The Hub transport, on huggingface_hub's own primitives: downloads whose errors name repo, revision and file
and say what to do, and pushes that work on new branches and hand back the pull request they open.

What to publish (a dataset with its card) is :mod:`legend_hf.publish`; how to name things is
:mod:`legend_hf.names`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo


class HubLookupError(FileNotFoundError):
    """A repo, revision or file was not found on the Hub or in its local cache (the message says which)."""


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
