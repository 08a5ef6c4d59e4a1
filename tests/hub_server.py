"""A Hugging Face Hub on loopback for the tests: the HTTP calls huggingface_hub 2.4 makes to

- create a repo (``POST /api/repos/create``, its ``visibility`` recorded as ``Repo.private``),
- create a branch (``POST /api/models/{repo}/branch/{branch}``, 409 when it exists),
- upload files (``POST /api/models/{repo}/preupload|commit/{revision}``, ``?create_pr=1`` opens a pull request
  ``refs/pr/N``; the NDJSON commit carries its files inline in base64; its summary, description and Authorization
  header are recorded),
- download them (``HEAD``/``GET /{repo}/resolve/{revision}/{path}``, a revision being a branch, ``refs/pr/N`` or a
  commit sha, URL-encoded), sharded checkpoints through ``snapshot_download`` (``GET /api/models/{repo}/revision/
  {revision}``: the commit sha; ``GET /api/models/{repo}/tree/{revision}``: every file, one page).

Each commit is a snapshot of every file; a ref names the commit it points at, as in git. Errors carry the
``X-Error-Code`` the client turns into typed exceptions (RepoNotFound, RevisionNotFound, EntryNotFound). Not a Hub:
no auth, no LFS, no listing; just enough of one to run the real client end to end.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

API = re.compile(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch|revision|tree)/([^/]+)")
RESOLVE = re.compile(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)")


def _oid(data: bytes) -> str:
    """The id the client caches a file under (ETag of a download, ``oid`` in a tree listing): the same in both."""
    return hashlib.sha1(data).hexdigest()


@dataclass
class Repo:
    """One model repo: a snapshot of its files per commit, the commit each ref points at, and the commits made."""

    private: bool
    snapshots: dict[str, dict[str, bytes]]  # commit sha -> path -> bytes
    refs: dict[str, str]  # "main", a branch, or "refs/pr/N" -> commit sha
    commits: list[dict] = field(default_factory=list)  # the ref written, summary, description, pr_url, token

    def files(self, ref: str = "main") -> dict[str, bytes]:
        """The files at ``ref`` (a branch, ``refs/pr/N`` or a commit sha)."""
        return self.snapshots[self.refs.get(ref, ref)]


class LoopbackHub:
    """The server (``with LoopbackHub() as hub``; ``hub.url`` is the client's ``HF_ENDPOINT``); ``hub.repos`` holds
    what was uploaded and ``hub.requests`` every request line, for debugging."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        lock = threading.Lock()  # the client uploads from a thread pool
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, status, body: bytes = b"", headers=None):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, status, body):
                self._reply(status, json.dumps(body).encode(), {"Content-Type": "application/json"})

            def _error(self, status, code, message, **body):
                self._reply(status, json.dumps({"error": message, **body}).encode(),
                            {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message})

            def do_POST(self):
                hub.requests.append(f"POST {self.path}")
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                url = urlsplit(self.path)
                with lock:
                    if url.path == "/api/repos/create":
                        return self._create_repo(json.loads(body))
                    if url.path == "/api/validate-yaml":
                        return self._json(200, {})
                    match = API.fullmatch(url.path)
                    if not match:
                        return self._error(404, "NotFound", f"unknown endpoint: {self.path}")
                    repo = hub.repos.get(match[1])
                    if repo is None:
                        return self._error(404, "RepoNotFound", f"Repository {match[1]} not found")
                    revision = unquote(match[3])
                    if match[2] == "branch":
                        return self._create_branch(repo, revision, json.loads(body or b"{}"))
                    if revision not in repo.refs:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                    if match[2] == "preupload":
                        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                 for f in json.loads(body)["files"]]
                        return self._json(200, {"files": files, "commitOid": repo.refs[revision]})
                    create_pr = parse_qs(url.query).get("create_pr") == ["1"]
                    return self._commit(match[1], repo, revision, body, create_pr)

            def _create_repo(self, request):
                name = "/".join(part for part in (request.get("organization"), request["name"]) if part)
                url = f"http://{self.headers['Host']}/{name}"
                if name in hub.repos:  # the client reads the url of the repo it asked for from the 409
                    return self._error(409, "RepoExists", "You already created this model repo", url=url)
                initial = hashlib.sha1(name.encode()).hexdigest()
                private = request.get("visibility") == "private" or bool(request.get("private"))
                hub.repos[name] = Repo(private=private, snapshots={initial: {}}, refs={"main": initial})
                return self._json(200, {"url": url, "name": name})

            def _create_branch(self, repo, branch, request):
                if branch in repo.refs:
                    return self._error(409, "BranchExists", f"Branch {branch} already exists")
                start = request.get("startingPoint") or "main"
                repo.refs[branch] = repo.refs.get(start, start)
                return self._json(200, {})

            def _commit(self, name, repo, revision, body, create_pr):
                lines = [json.loads(line) for line in body.decode().splitlines()]
                files = dict(repo.files(revision))
                for item in lines:
                    if item["key"] == "file":
                        files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        files.pop(item["value"]["path"], None)
                sha = hashlib.sha1(repo.refs[revision].encode() + body).hexdigest()
                repo.snapshots[sha] = files
                pr_url = None
                if create_pr:
                    number = 1 + sum(ref.startswith("refs/pr/") for ref in repo.refs)
                    revision, pr_url = f"refs/pr/{number}", f"http://{self.headers['Host']}/{name}/discussions/{number}"
                repo.refs[revision] = sha
                header = lines[0]["value"]
                repo.commits.append({"revision": revision, "summary": header["summary"],
                                     "description": header["description"], "pr_url": pr_url,
                                     "authorization": self.headers.get("Authorization")})
                url = f"http://{self.headers['Host']}/{name}/commit/{sha}"
                return self._json(200, {"commitUrl": url, "commitOid": sha, "pullRequestUrl": pr_url})

            def _resolve(self):
                hub.requests.append(f"{self.command} {self.path}")
                match = RESOLVE.fullmatch(urlsplit(self.path).path)
                repo = hub.repos.get(match[1]) if match else None
                if repo is None:
                    return self._error(404, "RepoNotFound", f"unknown: {self.path}")
                revision, path = unquote(match[2]), unquote(match[3])
                sha = repo.refs.get(revision, revision)
                if sha not in repo.snapshots:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                if path not in repo.snapshots[sha]:
                    return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}")
                data = repo.snapshots[sha][path]
                self._reply(200, data, {"ETag": f'"{_oid(data)}"', "X-Repo-Commit": sha})

            def _info(self):
                hub.requests.append(f"GET {self.path}")
                match = API.fullmatch(urlsplit(self.path).path)
                if not match or match[2] not in ("revision", "tree"):
                    return self._error(404, "NotFound", f"unknown endpoint: {self.path}")
                repo = hub.repos.get(match[1])
                if repo is None:
                    return self._error(404, "RepoNotFound", f"Repository {match[1]} not found")
                revision = unquote(match[3])
                sha = repo.refs.get(revision, revision)
                if sha not in repo.snapshots:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                files = repo.snapshots[sha]
                if match[2] == "tree":
                    return self._json(200, [{"type": "file", "path": path, "size": len(data), "oid": _oid(data)}
                                            for path, data in files.items()])
                return self._json(200, {"id": match[1], "sha": sha, "private": repo.private,
                                        "siblings": [{"rfilename": path} for path in files]})

            def do_HEAD(self):
                self._resolve()

            def do_GET(self):
                if self.path.startswith("/api/"):
                    return self._info()
                self._resolve()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
