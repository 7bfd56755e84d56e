"""The real huggingface_hub and datasets clients against the loopback Hub of hub_server.py (no mocks)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import huggingface_hub
import pytest
from huggingface_hub import CommitOperationAdd, DatasetCard, DryRunFileInfo, HfApi, RepoFile, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

if TYPE_CHECKING:  # imported by pytest_plugins first, so that pytest rewrites its asserts
    from hub_server import HubServer

pytest_plugins = ["hub_server"]

SHA = re.compile(r"[0-9a-f]{40}")


def _initial(hub: HubServer) -> dict[str, bytes]:
    """The files of a new repo."""
    return {".gitattributes": hub.GITATTRIBUTES}


def _folder(tmp_path: Path, **files: str) -> Path:
    folder = tmp_path / "upload"
    for name, text in files.items():
        (folder / name.replace("__", "/")).parent.mkdir(parents=True, exist_ok=True)
        (folder / name.replace("__", "/")).write_text(text)
    return folder


def test_clients_point_at_the_server(hub_server: HubServer, tmp_path: Path) -> None:
    assert huggingface_hub.constants.ENDPOINT == datasets.config.HF_ENDPOINT == hub_server.url
    assert huggingface_hub.constants.HF_HUB_CACHE == str(tmp_path / "hf_home" / "hub")
    assert huggingface_hub.get_token() == "hf_fake"
    assert HfApi().whoami()["name"] == "user"


def test_hub_clients_restores_everything(tmp_path: Path) -> None:
    from hub_server import HubServer, hub_clients

    def state() -> tuple[object, ...]:
        hf, config = huggingface_hub, datasets.config
        return hf.constants.ENDPOINT, hf.hf_api.api.endpoint, config.HF_ENDPOINT, config.HF_DATASETS_CACHE

    before = state()
    with HubServer() as hub, hub_clients(hub.url, tmp_path):
        assert state() == (hub.url, hub.url, hub.url, tmp_path / "datasets")
    assert state() == before


def test_create_repo(hub_server: HubServer) -> None:
    api = HfApi()
    url = api.create_repo("user/model", exist_ok=True)
    assert (url, url.repo_id, url.repo_type) == (f"{hub_server.url}/user/model", "user/model", "model")
    assert api.create_repo("user/model", exist_ok=True) == url
    with pytest.raises(HfHubHTTPError) as error:
        api.create_repo("user/model")
    assert error.value.response.status_code == 409
    # the module-level function, as well
    data = huggingface_hub.create_repo("org/data", repo_type="dataset", exist_ok=True)
    assert (data, data.repo_type) == (f"{hub_server.url}/datasets/org/data", "dataset")
    assert set(hub_server.repos) == {("model", "user/model"), ("dataset", "org/data")}
    assert hub_server.files("org/data", repo_type="dataset") == _initial(hub_server)


def test_branches_and_refs(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo("user/model")
    for _ in range(2):
        api.create_branch("user/model", branch="dev", exist_ok=True)
    with pytest.raises(HfHubHTTPError):
        api.create_branch("user/model", branch="dev")
    refs = api.list_repo_refs("user/model", include_pull_requests=True)
    main = hub_server.repos[("model", "user/model")].branches["main"]
    assert {(b.name, b.ref, b.target_commit) for b in refs.branches} == {
        ("main", "refs/heads/main", main),
        ("dev", "refs/heads/dev", main),
    }
    assert refs.pull_requests == [] and refs.tags == []
    with pytest.raises(RevisionNotFoundError):
        api.create_branch("user/model", branch="topic", revision="nope")
    with pytest.raises(RepositoryNotFoundError):
        api.list_repo_refs("user/missing")


def test_upload_folder_to_branch(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo("user/model")
    api.create_branch("user/model", branch="dev")
    info = api.upload_folder(
        repo_id="user/model", folder_path=_folder(tmp_path, a_txt="A", sub__b_json="{}"), revision="dev"
    )
    assert SHA.fullmatch(info.oid) and info.pr_url is None
    assert info.commit_url == f"{hub_server.url}/user/model/commit/{info.oid}"
    assert hub_server.files("user/model", "dev") == {
        **_initial(hub_server),
        "a_txt": b"A",
        "sub/b_json": b"{}",
    }
    assert hub_server.files("user/model") == _initial(hub_server)  # main untouched
    assert api.model_info("user/model", revision="dev").sha == info.oid
    assert api.repo_info("user/model", revision="dev").sha == info.oid
    assert api.list_repo_files("user/model", revision="dev") == [".gitattributes", "a_txt", "sub/b_json"]
    tree = api.list_repo_tree("user/model", revision="dev")
    assert [(type(e).__name__, e.path) for e in tree] == [
        ("RepoFile", ".gitattributes"),
        ("RepoFile", "a_txt"),
        ("RepoFolder", "sub"),
    ]
    assert [e.path for e in api.list_repo_tree("user/model", "sub", revision="dev")] == ["sub/b_json"]
    paths = api.get_paths_info("user/model", ["a_txt", "sub", "missing"], revision="dev")
    assert [(type(e).__name__, e.path) for e in paths] == [("RepoFile", "a_txt"), ("RepoFolder", "sub")]
    assert isinstance(paths[0], RepoFile) and paths[0].size == 1
    assert paths[0].blob_id == "8c7e5a667f1b771847fe88c01c3de34413a1b220"  # `git hash-object` of "A"


def test_upload_to_missing_branch_is_revision_not_found(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo("user/model")
    with pytest.raises(RevisionNotFoundError):
        api.upload_folder(repo_id="user/model", folder_path=_folder(tmp_path, a="A"), revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"A", path_in_repo="a", repo_id="user/model", revision="nope")
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"A", path_in_repo="a", repo_id="user/missing")
    assert list(hub_server.repos[("model", "user/model")].branches) == ["main"]


def test_create_pr(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo("user/model")
    first = api.upload_folder(repo_id="user/model", folder_path=_folder(tmp_path, a="A"), create_pr=True)
    assert (first.pr_revision, first.pr_num) == ("refs/pr/1", 1)
    assert first.pr_url == f"{hub_server.url}/user/model/discussions/1"
    second = api.create_commit(
        "user/model", [CommitOperationAdd("b", b"B")], commit_message="add b", create_pr=True
    )
    assert (second.pr_revision, second.pr_url) == ("refs/pr/2", f"{hub_server.url}/user/model/discussions/2")
    assert hub_server.files("user/model", "refs/pr/1") == {**_initial(hub_server), "a": b"A"}
    assert hub_server.files("user/model", "refs/pr/2") == {**_initial(hub_server), "b": b"B"}
    assert hub_server.files("user/model") == _initial(hub_server)  # main untouched
    # a further commit to the PR ref updates the PR
    third = api.upload_file(
        path_or_fileobj=b"C", path_in_repo="c", repo_id="user/model", revision="refs/pr/1"
    )
    refs = api.list_repo_refs("user/model", include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests or []] == [
        ("refs/pr/1", third.oid),
        ("refs/pr/2", second.oid),
    ]
    assert api.get_discussion_details("user/model", 1).git_reference == "refs/pr/1"


def test_download_by_branch_commit_and_pr(hub_server: HubServer, tmp_path: Path) -> None:
    api = HfApi()
    api.create_repo("user/model")
    api.create_branch("user/model", branch="dev")
    on_dev = api.upload_file(
        path_or_fileobj=b"dev", path_in_repo="f/x.txt", repo_id="user/model", revision="dev"
    )
    on_pr = api.upload_file(
        path_or_fileobj=b"pr", path_in_repo="f/x.txt", repo_id="user/model", create_pr=True
    )
    for revision, sha, content in [
        ("dev", on_dev.oid, b"dev"),
        (on_dev.oid, on_dev.oid, b"dev"),
        (on_pr.pr_revision, on_pr.oid, b"pr"),
        (on_pr.oid, on_pr.oid, b"pr"),
    ]:
        dry = hf_hub_download("user/model", "f/x.txt", revision=revision, dry_run=True)
        assert isinstance(dry, DryRunFileInfo)
        assert (dry.commit_hash, dry.file_size, dry.will_download) == (
            sha,
            len(content),
            not Path(dry.local_path).exists(),
        )
        path = hf_hub_download("user/model", "f/x.txt", revision=revision)
        assert Path(path).read_bytes() == content and f"snapshots/{sha}/f/x.txt" in path
    data = api.create_repo("user/data", repo_type="dataset")
    api.upload_file(path_or_fileobj=b"d", path_in_repo="d.txt", repo_id=data.repo_id, repo_type="dataset")
    assert Path(hf_hub_download("user/data", "d.txt", repo_type="dataset")).read_bytes() == b"d"


def test_not_found_flavours(hub_server: HubServer) -> None:
    api = HfApi()
    api.create_repo("user/model")
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("user/model", "missing.txt")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("user/model", "missing.txt", dry_run=True)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/model", ".gitattributes", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("user/model", ".gitattributes", revision="refs/pr/9")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/missing", ".gitattributes")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/model", ".gitattributes", repo_type="dataset")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("user/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("user/model", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files("user/model", revision="nope")
    assert api.file_exists("user/model", ".gitattributes") and not api.file_exists("user/model", "missing")
    assert not api.repo_exists("user/missing") and api.repo_exists("user/model")


def test_offline_cache_after_download(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    api = HfApi()
    api.create_repo("user/model")
    api.create_branch("user/model", branch="dev")
    commit = api.upload_file(path_or_fileobj=b"w", path_in_repo="w.bin", repo_id="user/model", revision="dev")
    online = hf_hub_download("user/model", "w.bin", revision="dev")
    requests = len(hub_server.log)

    assert hf_hub_download("user/model", "w.bin", revision="dev", local_files_only=True) == online
    assert hf_hub_download("user/model", "w.bin", revision=commit.oid, local_files_only=True) == online
    dry = hf_hub_download("user/model", "w.bin", revision="dev", local_files_only=True, dry_run=True)
    assert isinstance(dry, DryRunFileInfo)
    assert (dry.commit_hash, dry.is_cached, dry.will_download, dry.local_path) == (
        commit.oid,
        True,
        False,
        online,
    )
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("user/model", "w.bin", revision="main", local_files_only=True)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1
    assert hf_hub_download("user/model", "w.bin", revision="dev") == online
    dry = hf_hub_download("user/model", "w.bin", revision="dev", dry_run=True)
    assert isinstance(dry, DryRunFileInfo) and dry.commit_hash == commit.oid
    assert len(hub_server.log) == requests  # none of the above reached the server


FEATURES = datasets.Features(
    {
        "prompt": datasets.Value("string"),
        "margin": datasets.Value("float64", id=json.dumps({"legend": {"layer": 3, "unit": "logit"}})),
        "label": datasets.ClassLabel(names=["unsafe", "safe"]),
    }
)


def _dataset(*margins: float) -> datasets.Dataset:
    rows = {
        "prompt": [f"p{i}" for i in range(len(margins))],
        "margin": list(margins),
        "label": [1] * len(margins),
    }
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def test_dataset_push_to_hub_and_load_dataset(hub_server: HubServer) -> None:
    info = _dataset(0.5, -1.25).push_to_hub("user/margins")
    assert SHA.fullmatch(info.oid)
    files = hub_server.files("user/margins", repo_type="dataset")
    assert set(files) == {".gitattributes", "README.md", "data/train-00000-of-00001.parquet"}
    card = DatasetCard(files["README.md"].decode())
    yaml_features = card.data.to_dict()["dataset_info"]["features"]
    assert {"name": "margin", "dtype": "float64", "id": FEATURES["margin"].id} in yaml_features
    assert card.data.to_dict()["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}
    ]

    assert HfApi().dataset_info("user/margins").sha == info.oid
    loaded = datasets.load_dataset("user/margins", split="train")
    assert loaded.features == FEATURES and loaded.features["margin"].id == FEATURES["margin"].id
    assert loaded.to_dict() == _dataset(0.5, -1.25).to_dict()
    assert datasets.load_dataset("user/margins", split="train", revision=info.oid)["margin"] == [0.5, -1.25]


def test_dataset_push_to_branch_and_pr(hub_server: HubServer) -> None:
    _dataset(1.0).push_to_hub("user/margins")
    HfApi().create_branch("user/margins", branch="dev", repo_type="dataset")
    _dataset(2.0, 3.0).push_to_hub("user/margins", revision="dev")
    pr = _dataset(4.0).push_to_hub("user/margins", create_pr=True)
    assert (pr.pr_revision, pr.pr_url) == (
        "refs/pr/1",
        f"{hub_server.url}/datasets/user/margins/discussions/1",
    )
    assert HfApi().dataset_info("user/margins", revision="refs/pr/1").sha == pr.oid
    assert datasets.load_dataset("user/margins", split="train")["margin"] == [1.0]
    assert datasets.load_dataset("user/margins", split="train", revision="dev")["margin"] == [2.0, 3.0]
    by_pr = datasets.load_dataset("user/margins", split="train", revision="refs/pr/1")
    assert by_pr["margin"] == [4.0] and by_pr.features == FEATURES
    _dataset(5.0).push_to_hub("user/margins")  # pushing again replaces the shards of main
    assert datasets.load_dataset("user/margins", split="train")["margin"] == [5.0]
