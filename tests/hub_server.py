"""A Hugging Face Hub on loopback for the tests: the HTTP calls huggingface_hub makes to create a repo, upload files
(preupload + NDJSON commit, files inline in base64) and download them (HEAD/GET .../resolve/...). Files live in
memory; each commit gets a new sha. Not a Hub: just enough of one to run the real client end to end."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class LoopbackHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _json(self, status, body, headers=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                hub.requests.append(f"POST {self.path}")
                body = self._body()
                if self.path == "/api/repos/create":
                    request = json.loads(body)
                    repo = f"{request['organization']}/{request['name']}" if request.get("organization") else request["name"]
                    if repo in hub.repos:
                        return self._json(409, {"error": "You already created this model repo", "url": repo})
                    hub.repos[repo] = {}
                    hub.commits[repo] = hashlib.sha1(repo.encode()).hexdigest()
                    return self._json(200, {"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
                if self.path == "/api/validate-yaml":
                    return self._json(200, {})
                match = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/([^/?]+)(\?.*)?", self.path)
                if not match or match[1] not in hub.repos:
                    return self._json(404, {"error": f"unknown: {self.path}"})
                repo = match[1]
                if match[2] == "preupload":
                    files = json.loads(body)["files"]
                    return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                      for f in files], "commitOid": hub.commits[repo]})
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        hub.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        hub.repos[repo].pop(item["value"]["path"], None)
                hub.commits[repo] = hashlib.sha1((hub.commits[repo] + line).encode()).hexdigest()
                url = f"http://{self.headers['Host']}/{repo}/commit/{hub.commits[repo]}"
                return self._json(200, {"commitUrl": url, "commitOid": hub.commits[repo], "pullRequestUrl": None})

            def _resolve(self, send_body: bool):
                hub.requests.append(f"{self.command} {self.path}")
                match = re.fullmatch(r"/(.+?/[^/]+)/resolve/([^/]+)/(.+?)(\?.*)?", self.path)
                if match and match[1] in hub.repos and match[3] in hub.repos[match[1]]:
                    data = hub.repos[match[1]][match[3]]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
                    self.send_header("X-Repo-Commit", hub.commits[match[1]])
                    self.end_headers()
                    if send_body:
                        self.wfile.write(data)
                    return
                code = "RepoNotFound" if not match or match[1] not in hub.repos else "EntryNotFound"
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_HEAD(self):
                self._resolve(send_body=False)

            def do_GET(self):
                if self.path.startswith("/api/"):
                    hub.requests.append(f"GET {self.path}")
                    return self._json(404, {"error": f"unknown: {self.path}"})
                self._resolve(send_body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
