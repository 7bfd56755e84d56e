"""A loopback stand-in for the Hugging Face Hub: tests run the real `huggingface_hub` and `datasets` offline.

`HubServer` serves, from memory, the HTTP routes those clients call to create repos and branches, commit
files (to a branch or as a pull request `refs/pr/N`), read repo info, refs and trees, and download files.
Files are uploaded as "regular" git files (base64 inside the commit payload), except `*.parquet`, which go
through a one-PUT LFS transfer (`datasets` deletes each shard right after pre-uploading it); Xet is disabled.
A request that matches no route gets a 404 and lands in `HubServer.unhandled`, which the `hub_server`
fixture asserts is empty at teardown.

    pytest_plugins = ["hub_server"]  # in a test module under tests/ (or `from hub_server import hub_server`)

    def test_upload(hub_server):  # HfApi(), hf_hub_download, datasets... now talk to hub_server.url
        HfApi().create_repo("user/model")
        assert hub_server.files("user/model") == {".gitattributes": hub_server.GITATTRIBUTES}
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def blob_sha(data: bytes) -> str:
    """Git blob id: what the Hub gives as a file's oid and ETag."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """An error response. The client maps the X-Error-Code header (`code`) to its exception types."""

    def __init__(
        self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None, **body: Any
    ):
        super().__init__(message)
        self.status, self.code, self.headers, self.body = status, code, headers or {}, body


@dataclass
class Commit:
    sha: str
    title: str
    parent: str | None
    files: dict[str, bytes]
    date: str


@dataclass
class Repo:
    type: str
    id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit sha
    prs: dict[int, str] = field(default_factory=dict)  # N -> commit sha of refs/pr/N
    discussions: dict[int, dict[str, Any]] = field(default_factory=dict)  # N -> details (JSON)

    def resolve(self, rev: str) -> str:
        """The commit sha of a branch, `refs/heads/<branch>`, `refs/pr/<N>` or commit sha."""
        sha = self.branches.get(rev.removeprefix("refs/heads/"))
        if sha is None and rev.startswith("refs/pr/") and rev[8:].isdigit():
            sha = self.prs.get(int(rev[8:]))
        if sha is None and rev in self.commits:
            sha = rev
        if sha is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha

    def commit(self, parent: str | None, files: dict[str, bytes], title: str) -> str:
        sha = hashlib.sha1(f"{self.type}/{self.id}/{len(self.commits)}/{parent}/{title}".encode()).hexdigest()
        date = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        self.commits[sha] = Commit(sha, title, parent, files, date)
        return sha

    def entries(self, sha: str) -> dict[str, dict[str, Any]]:
        """The files and folders of a commit by path, as the `/tree` and `/paths-info` routes list them."""
        out: dict[str, dict[str, Any]] = {}
        for path, data in self.commits[sha].files.items():
            out[path] = {"type": "file", "oid": blob_sha(data), "size": len(data), "path": path}
            for i in range(1, path.count("/") + 1):
                folder = path.rsplit("/", i)[0]
                oid = hashlib.sha1(f"{sha}/{folder}".encode()).hexdigest()
                out[folder] = {"type": "directory", "oid": oid, "size": 0, "path": folder}
        return out


class HubServer:
    """The in-memory Hub on 127.0.0.1: `with HubServer() as hub:` serves at `hub.url` until the block ends."""

    GITATTRIBUTES = b"*.parquet filter=lfs diff=lfs merge=lfs -text\n"  # the initial commit of every new repo
    LFS_SUFFIXES = (".parquet",)  # files uploaded through LFS; everything else is a "regular" upload

    def __init__(self, user: str = "user") -> None:
        self.user = user  # whoami, and the namespace of repos created without one
        self.repos: dict[tuple[str, str], Repo] = {}  # (repo_type, repo_id) -> Repo
        self.lfs: dict[str, bytes] = {}  # sha256 -> content PUT through the LFS transfer
        self.log: list[str] = []  # "METHOD /path?query -> status", every request in order
        self.unhandled: list[str] = []  # requests that matched no route or broke the server
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.hub = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        if (repo_type, repo_id) not in self.repos:
            raise HubError(404, "RepoNotFound", "Repository not found")
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repo at a revision, for assertions."""
        repo = self.repo(repo_id, repo_type)
        return repo.commits[repo.resolve(revision)].files

    def repo_url(self, repo: Repo) -> str:
        return f"{self.url}/{URL_PREFIX[repo.type]}{repo.id}"

    def dispatch(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> Any:
        """Serve one request: a JSON-able answer, or `(bytes, headers)` for a file. Raises HubError."""
        parts = path.strip("/").split("/")  # still percent-encoded, so a quoted revision is one segment
        route = (method, *parts[:2])
        if parts[-4:] == ["info", "lfs", "objects", "batch"] and method == "POST":  # <repo>.git/info/lfs/...
            return self.lfs_batch(json.loads(body))
        if route[:2] == ("PUT", "lfs-upload") and hashlib.sha256(body).hexdigest() == parts[1]:
            self.lfs[parts[1]] = body
            return {}
        if route == ("GET", "api", "whoami-v2"):
            return {"type": "user", "name": self.user, "fullname": self.user, "orgs": [], "auth": {}}
        if route == ("POST", "api", "validate-yaml"):
            return {"errors": [], "warnings": []}
        if route == ("POST", "api", "repos") and parts[2:] == ["create"]:
            return self.create_repo(json.loads(body))
        if parts[0] != "api":
            return self.resolve_file(method, parts)
        if len(parts) < 4 or parts[1] not in ("models", "datasets", "spaces"):
            raise NotImplementedError
        repo = self.repo(f"{parts[2]}/{parts[3]}", parts[1][:-1])
        action, rest = (parts[4], parts[5:]) if len(parts) > 4 else ("", [])
        if action == "branch" and len(rest) == 1 and method in ("POST", "DELETE"):
            return self.branch(repo, method, unquote(rest[0]), json.loads(body or b"{}"))
        if (method, action) == ("GET", "refs"):
            return self.refs(repo)
        if (method, action, rest) == ("POST", "discussions", []):
            payload = json.loads(body)
            return {"num": self.open_discussion(repo, payload["title"], payload.get("pullRequest", False))}
        if (method, action) == ("GET", "discussions") and len(rest) == 1 and rest[0].isdigit():
            return repo.discussions[int(rest[0])]
        rev, rest = _split_revision(rest) if rest else ("main", [])
        if (method, action) in (("GET", ""), ("GET", "revision")):
            return self.info(repo, rev)
        if (method, action) == ("POST", "preupload"):
            return self.preupload(repo, rev, json.loads(body))
        if (method, action) == ("POST", "commit"):
            return self.create_commit(repo, rev, body, create_pr=query.get("create_pr") == ["1"])
        if (method, action) == ("GET", "tree"):
            recursive = query.get("recursive", [""])[0].lower() in ("true", "1")
            return self.tree(repo, rev, "/".join(unquote(p) for p in rest), recursive)
        if (method, action) == ("POST", "paths-info"):
            form = json.loads(body) if body.startswith(b"{") else parse_qs(body.decode())
            entries = repo.entries(repo.resolve(rev))
            return [entries[p] for p in form.get("paths", []) if p in entries]
        raise NotImplementedError

    def create_repo(self, payload: dict[str, Any]) -> dict[str, Any]:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if (repo_type, repo_id) in self.repos:
            url = self.repo_url(self.repos[(repo_type, repo_id)])
            raise HubError(409, None, f"You already created this {repo_type} repo", url=url)
        repo = self.repos[(repo_type, repo_id)] = Repo(repo_type, repo_id)
        repo.branches["main"] = repo.commit(None, {".gitattributes": self.GITATTRIBUTES}, "initial commit")
        return {"url": self.repo_url(repo), "name": repo_id}

    def branch(self, repo: Repo, method: str, name: str, payload: dict[str, Any]) -> dict[str, Any]:
        if method == "DELETE":
            if repo.branches.pop(name, None) is None:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {name}")
        elif name in repo.branches:
            raise HubError(409, None, f"Reference already exists: refs/heads/{name}")
        elif name.startswith("refs/") or not name:
            raise HubError(400, None, f"Invalid reference for a branch: {name}")
        else:
            repo.branches[name] = repo.resolve(payload.get("startingPoint") or "main")
        return {}

    def refs(self, repo: Repo) -> dict[str, Any]:
        def ref(name: str, ref: str, sha: str) -> dict[str, str]:
            return {"name": name, "ref": ref, "targetCommit": sha}

        return {
            "branches": [ref(name, f"refs/heads/{name}", sha) for name, sha in repo.branches.items()],
            "tags": [],
            "converts": [],
            "pullRequests": [ref(f"refs/pr/{n}", f"refs/pr/{n}", sha) for n, sha in repo.prs.items()],
        }

    def open_discussion(self, repo: Repo, title: str, pull_request: bool, sha: str | None = None) -> int:
        """Open discussion N; a pull request also gets the ref `refs/pr/N`, at `sha` (default: main)."""
        number = max(repo.discussions, default=0) + 1
        if pull_request:
            repo.prs[number] = sha or repo.branches["main"]
        repo.discussions[number] = {
            "num": number,
            "title": title,
            "status": "draft" if pull_request and sha is None else "open",
            "isPullRequest": pull_request,
            "createdAt": repo.commits[repo.prs.get(number) or repo.branches["main"]].date,
            "author": {"name": self.user},
            "repo": {"name": repo.id, "type": repo.type},
            "events": [],
            "changes": {"base": "refs/heads/main"},
            "filesWithConflicts": [],
        }
        return number

    def info(self, repo: Repo, rev: str) -> dict[str, Any]:
        commit = repo.commits[repo.resolve(rev)]
        return {
            "id": repo.id,
            "author": repo.id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": next(iter(repo.commits.values())).date,
            "private": False,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [
                {"rfilename": p, "size": len(d), "blobId": blob_sha(d)} for p, d in commit.files.items()
            ],
        }

    def preupload(self, repo: Repo, rev: str, payload: dict[str, Any]) -> dict[str, Any]:
        files, out = repo.commits[repo.resolve(rev)].files, []
        for path in (f["path"] for f in payload["files"]):
            lfs, data = path.endswith(self.LFS_SUFFIXES), files.get(path)
            oid = None if data is None else hashlib.sha256(data).hexdigest() if lfs else blob_sha(data)
            out.append(
                {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return {"files": out}

    def lfs_batch(self, payload: dict[str, Any]) -> dict[str, Any]:
        objects = [{"oid": o["oid"], "size": o["size"]} for o in payload["objects"]]
        for o in objects:
            if o["oid"] not in self.lfs:  # no "actions" means the object is already stored
                o["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}}
        return {"transfer": "basic", "objects": objects}

    def create_commit(self, repo: Repo, rev: str, body: bytes, create_pr: bool) -> dict[str, Any]:
        header, *operations = [json.loads(line) for line in body.splitlines() if line.strip()]
        parent = repo.resolve(rev)
        if not create_pr and rev in repo.commits:
            raise HubError(400, None, "Can only commit to a branch or a pull request ref")
        if not create_pr and header["value"].get("parentCommit") not in (None, parent):
            raise HubError(412, None, "A commit has happened since. Please refresh and try again.")
        files = dict(repo.commits[parent].files)
        for key, value in ((op["key"], op["value"]) for op in operations):
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile" and value["oid"] in self.lfs:
                files[value["path"]] = self.lfs[value["oid"]]
            elif key == "deletedFile" and value["path"] in files:
                del files[value["path"]]
            elif key == "deletedFolder":
                files = {p: d for p, d in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                raise HubError(404, "EntryNotFound", f"Cannot apply {key} {value.get('path')}")
        sha = repo.commit(parent, files, header["value"]["summary"])
        pr_url = None
        if create_pr:
            number = self.open_discussion(repo, header["value"]["summary"], True, sha)
            pr_url = f"{self.repo_url(repo)}/discussions/{number}"
        elif rev.startswith("refs/pr/"):
            repo.prs[int(rev[8:])] = sha
        else:
            repo.branches[rev.removeprefix("refs/heads/")] = sha
        url = f"{self.repo_url(repo)}/commit/{sha}"
        return {"success": True, "commitOid": sha, "commitUrl": url, "pullRequestUrl": pr_url}

    def tree(self, repo: Repo, rev: str, path: str, recursive: bool) -> list[dict[str, Any]]:
        entries = repo.entries(repo.resolve(rev))
        if path and entries.get(path, {}).get("type") != "directory":
            raise HubError(404, "EntryNotFound", f"{path} is not a folder on {rev}")
        prefix = f"{path}/" if path else ""
        return [
            e
            for p, e in sorted(entries.items())
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])
        ]

    def resolve_file(self, method: str, parts: list[str]) -> tuple[bytes, dict[str, str]]:
        repo_type = "model"
        if parts[0] in ("datasets", "spaces"):
            repo_type, parts = parts[0][:-1], parts[1:]
        if len(parts) < 5 or parts[2] != "resolve" or method not in ("GET", "HEAD"):
            raise NotImplementedError
        repo = self.repo(f"{parts[0]}/{parts[1]}", repo_type)
        rev, rest = _split_revision(parts[3:])
        sha, path = repo.resolve(rev), "/".join(unquote(p) for p in rest)
        if path not in repo.commits[sha].files:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {rev}", {"X-Repo-Commit": sha})
        data = repo.commits[sha].files[path]
        return data, {"X-Repo-Commit": sha, "ETag": f'"{blob_sha(data)}"', "Accept-Ranges": "bytes"}


def _split_revision(parts: list[str]) -> tuple[str, list[str]]:
    """Split `[revision, *path]` url segments; the client quotes revisions (`refs%2Fpr%2F1`)."""
    if parts[0] == "refs" and len(parts) >= 3:
        return "/".join(parts[:3]), parts[3:]
    return unquote(parts[0]), parts[1:]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers once the server stops

    def log_message(self, format: str, *args: Any) -> None:  # quiet: see HubServer.log
        pass

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
        self.rfile.readline()
        return b"".join(chunks)

    def answer(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        method = self.command
        url, body = urlsplit(self.path), self.read_body()
        status, headers, content_type = 200, dict[str, str](), "application/json"
        try:
            with hub.lock:
                result = hub.dispatch(method, url.path, parse_qs(url.query), body)
            if isinstance(result, tuple):
                (payload, headers), content_type = result, "application/octet-stream"
            else:
                payload = json.dumps(result).encode()
        except HubError as e:
            message = str(e).encode("ascii", "backslashreplace").decode()  # headers are latin-1
            status, headers = e.status, {**e.headers, "X-Error-Message": message}
            headers.update({"X-Error-Code": e.code} if e.code else {})
            payload = json.dumps({"error": str(e), **e.body}).encode()
        except Exception as e:  # NotImplementedError: no such route; anything else: a bug here
            hub.unhandled.append(f"{method} {self.path} {e!r}")
            status, payload = 404, json.dumps({"error": f"hub_server cannot serve {url.path}"}).encode()
        hub.log.append(f"{method} {self.path} -> {status}")
        start, end = 0, len(payload) - 1
        ranges = self.headers.get("Range", "")
        if status == 200 and ranges.startswith("bytes=") and "," not in ranges:  # HfFileSystem reads ranges
            first, _, last = ranges[6:].partition("-")
            start, end = int(first or 0), min(int(last or end), end)
            status, headers["Content-Range"] = 206, f"bytes {start}-{end}/{len(payload)}"
        self.send_response(status)
        for key, value in {"Content-Type": content_type, **headers}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(end + 1 - start))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload[start : end + 1])

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = answer


@contextmanager
def hub_clients(url: str, home: Path, token: str = "hf_fake") -> Iterator[None]:
    """Point the real `huggingface_hub` and `datasets` at the Hub at `url`, in this process, with a fresh
    HF_HOME at `home` and a fake token; everything is restored on exit.

    Both packages copy environment variables into module globals at import time, so besides the environment
    (for modules imported later) every such global of an already imported module is patched."""
    import datasets.config
    import huggingface_hub.constants as hf_constants
    from huggingface_hub import HfFileSystem, hf_api, hf_file_system

    cache, downloads = str(home / "hub"), home / "datasets" / "downloads"
    # global name -> value, in every huggingface_hub.* or datasets.* module that has one
    values: dict[str, Any] = {
        "ENDPOINT": url,  # huggingface_hub.constants, utils._git_credential, cli.auth
        "HF_ENDPOINT": url,  # datasets.config
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HUB_DATASETS_URL": url + "/datasets/{repo_id}/resolve/{revision}/{path}",
        "HF_HOME": str(home),
        "HF_CACHE_HOME": str(home),
        **dict.fromkeys(["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"], cache),
        **dict.fromkeys(["HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE"], str(home / "assets")),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_DATASETS_CACHE": home / "datasets",
        "HF_MODULES_CACHE": home / "modules",
        "DOWNLOADED_DATASETS_PATH": downloads,
        "EXTRACTED_DATASETS_PATH": downloads / "extracted",
        **dict.fromkeys(["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"], False),
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_XET": True,  # no Xet here: uploads go in commits or by LFS
    }
    env = {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        for (
            name
        ) in "HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE HF_HUB_CACHE HF_DATASETS_CACHE".split():
            mp.delenv(name, raising=False)
        for module_name, module in list(sys.modules.items()):
            if module_name.split(".")[0] in ("huggingface_hub", "datasets"):
                for name, value in values.items():
                    if type(vars(module).get(name)) is type(value):
                        mp.setattr(module, name, value)
        mp.setattr(hf_constants, "HF_URL_HOSTS", hf_constants.HF_URL_HOSTS | {"127.0.0.1"})
        mp.setattr(hf_api.api, "endpoint", url)  # the HfApi behind huggingface_hub.create_repo() & co
        hffs = hf_file_system.hffs  # the HfFileSystem behind `from huggingface_hub import hffs`
        mp.setattr(hffs, "endpoint", url)
        mp.setattr(hffs._api, "endpoint", url)
        for cache in ("dircache", "_repo_and_revision_exists_cache"):
            mp.setattr(hffs, cache, {})
        assert datasets.config.HF_ENDPOINT == url == hf_constants.ENDPOINT
        HfFileSystem.clear_instance_cache()  # fsspec caches instances by endpoint: a port can be reused
        try:
            yield
        finally:
            HfFileSystem.clear_instance_cache()


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[HubServer]:
    """A fresh in-memory Hub that the real clients talk to during the test, with HF_HOME under tmp_path."""
    with HubServer() as hub, hub_clients(hub.url, tmp_path / "hf_home"):
        yield hub
    assert not hub.unhandled, f"requests hub_server could not serve: {hub.unhandled}"
