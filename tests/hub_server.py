"""A tiny in-memory stand-in for the Hugging Face Hub, for tests that run the real ``huggingface_hub`` client offline.

It serves only what ``create_repo``, ``upload_folder`` / ``create_commit``, ``repo_info``, ``list_repo_tree``,
``create_branch``, ``whoami`` and ``snapshot_download`` / ``hf_hub_download`` send (as of huggingface_hub 2.4):

- ``POST /api/repos/create``; ``GET /api/whoami-v2``; ``POST /api/validate-yaml`` (parses the YAML front matter);
- ``GET /api/models/<repo>[/revision/<rev>]``, ``GET /api/models/<repo>/tree/<rev>`` (recursive, one page);
- ``POST /api/models/<repo>/preupload/<rev>``: every file is answered ``uploadMode: regular``, so file contents
  travel base64-encoded inside the commit. **Git LFS and Xet uploads are not implemented**: the real Hub would send
  the safetensors file through LFS/Xet, so that path of the client is not exercised here;
- ``POST /api/models/<repo>/commit/<rev>`` (NDJSON: ``file``, ``deletedFile``, ``deletedFolder``; ``lfsFile`` is
  refused with 400); ``POST /api/models/<repo>/branch/<name>``;
- ``GET``/``HEAD /<repo>/resolve/<rev>/<path>`` with ``ETag`` (git blob sha1), ``X-Repo-Commit`` and Range support.

Revisions are branch names or (prefixes of) commit ids; every commit is a full snapshot kept in memory. No auth is
checked, model repos only, no pull requests, no pagination. Errors carry the ``X-Error-Code`` headers the client maps
to ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``EntryNotFoundError``.

Usage::

    with HubServer() as server:           # binds 127.0.0.1 on a free port, serves from a daemon thread
        api = HfApi(endpoint=server.url)
        ...
        server.files("user/repo")         # {path: bytes} at the head of main, to compare with what was pushed

``point_client_at(monkeypatch, server, cache_dir)`` re-points an already imported ``huggingface_hub`` at the server
(``HF_ENDPOINT`` is read once, at import) and sets ``HF_ENDPOINT`` for subprocesses.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_API = re.compile(rf"^/api/models/{_REPO}(?:/(?P<op>revision|tree|preupload|commit|branch)/(?P<rest>.+?))?/?$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_sha1(data: bytes) -> str:
    """The id git (and the Hub) gives a file's content; the client compares it to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Repo:
    def __init__(self):
        self.commits: dict[str, dict[str, bytes]] = {}  # commit id -> full snapshot {path: content}
        self.branches: dict[str, str] = {}
        self.log: list[str] = []  # commit ids, oldest first
        self._commit("main", {}, "initial commit")

    def _commit(self, branch: str, files: dict[str, bytes], message: str) -> str:
        parent = self.branches.get(branch, "")
        sha = hashlib.sha1(f"{parent}\n{message}\n{len(self.log)}".encode() + repr(sorted(files)).encode())
        oid = sha.hexdigest()
        self.commits[oid] = files
        self.branches[branch] = oid
        self.log.append(oid)
        return oid

    def resolve(self, revision: str) -> str | None:
        revision = unquote(revision)
        if revision in self.branches:
            return self.branches[revision]
        matches = [c for c in self.commits if len(revision) >= 7 and c.startswith(revision)]
        return matches[0] if len(matches) == 1 else None


class _Handler(BaseHTTPRequestHandler):
    server: HubServer._Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep test output clean
        self.server.owner.requests.append(f"{self.command} {self.path}")
        self.server.owner.authorizations.append(self.headers.get("Authorization"))

    # ----------------------------------------------------------------------------- plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None):
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False):
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _repo(self, repo_id: str, head: bool = False) -> _Repo | None:
        repo = self.server.owner.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository not found: {repo_id}", "RepoNotFound", head=head)
        return repo

    def _commit_of(self, repo: _Repo, revision: str, head: bool = False) -> str | None:
        oid = repo.resolve(revision)
        if oid is None:
            self._error(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound", head=head)
        return oid

    # ----------------------------------------------------------------------------- verbs
    def do_HEAD(self):
        self._get(head=True)

    def do_GET(self):
        self._get(head=False)

    def _get(self, head: bool):
        path = unquote(urlsplit(self.path).path)
        owner = self.server.owner
        if path == "/api/whoami-v2":
            return self._json(200, {"type": "user", "name": owner.user, "auth": {"accessToken": {"role": "write"}}})
        if m := _RESOLVE.match(urlsplit(self.path).path):
            with owner.lock:
                repo = self._repo(m["repo"], head)
                oid = repo and self._commit_of(repo, m["rev"], head)
                if not oid:
                    return
                data = repo.commits[oid].get(unquote(m["path"]))
            if data is None:
                return self._error(404, f"Entry not found: {m['path']}", "EntryNotFound", head=head)
            headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": oid, "Accept-Ranges": "bytes"}
            if rng := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                start, end = int(rng[1]), int(rng[2]) if rng[2] else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start : end + 1], headers, head)
            return self._send(200, data, headers, head)
        m = _API.match(path)
        if not m or m["op"] not in (None, "revision", "tree"):
            return self._error(404, f"hub_server does not serve {self.command} {path}")
        with owner.lock:
            repo = self._repo(m["repo"], head)
            if repo is None:
                return
            rest = m["rest"] or "main"
            revision = rest.split("/", 1)[0] if m["op"] == "tree" else rest
            oid = self._commit_of(repo, revision, head)
            if not oid:
                return
            files = dict(repo.commits[oid])
        if m["op"] == "tree":
            tree = [{"type": "file", "path": p, "size": len(d), "oid": git_blob_sha1(d)} for p, d in files.items()]
            return self._json(200, sorted(tree, key=lambda e: e["path"]))
        siblings = [{"rfilename": p, "size": len(d)} for p, d in sorted(files.items())]
        return self._json(200, {"id": m["repo"], "modelId": m["repo"], "sha": oid, "private": False,
                                "siblings": siblings, "tags": [], "downloads": 0, "likes": 0})

    def do_POST(self):
        path = unquote(urlsplit(self.path).path)
        owner = self.server.owner
        body = self._body()
        if path == "/api/repos/create":
            payload = json.loads(body or b"{}")
            if payload.get("type", "model") != "model":
                return self._error(400, "hub_server serves model repos only")
            repo_id = f"{payload.get('organization') or owner.user}/{payload['name']}"
            with owner.lock:
                if repo_id in owner.repos:  # the Hub's 409 still names the repo's url, which the client reads
                    message = "You already created this model repo"
                    return self._json(409, {"error": message, "url": f"{owner.url}/{repo_id}"},
                                      {"X-Error-Message": message})
                owner.repos[repo_id] = _Repo()
            return self._json(200, {"url": f"{owner.url}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body)["content"])
        m = _API.match(path)
        if not m or m["op"] not in ("preupload", "commit", "branch"):
            return self._error(404, f"hub_server does not serve {self.command} {path}")
        with owner.lock:
            repo = self._repo(m["repo"])
            if repo is None:
                return
            if m["op"] == "branch":
                if m["rest"] in repo.branches:
                    return self._error(409, f"Branch {m['rest']} already exists")
                start = json.loads(body or b"{}").get("startingPoint") or "main"
                oid = self._commit_of(repo, start)
                if oid:
                    repo.branches[m["rest"]] = oid
                    self._json(200, {})
                return
            oid = self._commit_of(repo, m["rest"])
            if not oid:
                return
            if m["op"] == "preupload":
                current = repo.commits[oid]
                files = [
                    {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                     "oid": git_blob_sha1(current[f["path"]]) if f["path"] in current else None}
                    for f in json.loads(body)["files"]
                ]
                return self._json(200, {"files": files, "commitOid": oid})
            return self._commit(repo, unquote(m["rest"]), oid, body)

    def _validate_yaml(self, content: str):
        match = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            meta = yaml.safe_load(match[1]) if match else {}
        except yaml.YAMLError as e:
            return self._json(400, {"errors": [{"message": f"invalid YAML: {e}"}], "warnings": []})
        if meta is not None and not isinstance(meta, dict):
            return self._json(400, {"errors": [{"message": "metadata must be a YAML mapping"}], "warnings": []})
        return self._json(200, {"errors": [], "warnings": []})

    def _commit(self, repo: _Repo, revision: str, oid: str, body: bytes):
        if revision not in repo.branches:
            return self._error(400, f"hub_server commits to branches only, not to {revision}")
        files = dict(repo.commits[oid])
        summary = ""
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: d for p, d in files.items() if not p.startswith(prefix)}
            else:
                return self._error(400, f"hub_server does not implement commit operation {key!r} (LFS / Xet)")
        new = repo._commit(revision, files, summary)
        owner = self.server.owner
        return self._json(200, {"commitUrl": f"{owner.url}/{self._repo_id(repo)}/commit/{new}", "commitOid": new,
                                "success": True, "pullRequestUrl": None})

    def _repo_id(self, repo: _Repo) -> str:
        return next(k for k, v in self.server.owner.repos.items() if v is repo)


def point_client_at(monkeypatch, server: HubServer, cache_dir: str) -> None:
    """Make the ``huggingface_hub`` client of this process (and of its subprocesses) talk to ``server`` only."""
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api

    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_CACHE", cache_dir)
    monkeypatch.setenv("HF_TOKEN", "hf_local_test_token")  # never read a real token from this machine
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    template = server.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", cache_dir)
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)  # behind the module-level create_repo, upload_folder, ...
    try:  # transformers keeps one HfApi (Trainer's pushes go through it): let it be rebuilt with this endpoint
        import transformers.utils.hub as transformers_hub

        monkeypatch.setattr(transformers_hub, "_hf_api", None)
    except ImportError:
        pass


class HubServer:
    """Serve an in-memory Hub on ``127.0.0.1`` from a daemon thread; use as a context manager."""

    class _Server(ThreadingHTTPServer):
        daemon_threads = True  # a stuck client never keeps the test process alive
        request_queue_size = 16
        owner: HubServer

    def __init__(self, user: str = "tester"):
        self.user = user
        self.repos: dict[str, _Repo] = {}
        self.requests: list[str] = []  # "METHOD /path" of every request served, oldest first
        self.authorizations: list[str | None] = []  # the Authorization header of each of those requests
        self.lock = threading.Lock()
        self._server = self._Server(("127.0.0.1", 0), _Handler)
        self._server.timeout = 10
        self._server.owner = self
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub_server", daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The repo's files at ``revision`` (a branch or commit id)."""
        with self.lock:
            repo = self.repos[repo_id]
            return dict(repo.commits[repo.resolve(revision)])

    def commits(self, repo_id: str) -> list[str]:
        """Commit ids of ``repo_id``, oldest first (the first is the empty initial commit)."""
        with self.lock:
            return list(self.repos[repo_id].log)
