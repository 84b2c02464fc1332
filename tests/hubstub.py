"""A stand-in for the Hugging Face Hub on a real socket: neurons under test are pointed at it
with ``HF_ENDPOINT``, since the real Hub is unreachable here.

It answers the model-info API (``GET /api/models/OWNER/NAME[/revision/REV]``, and its
``/tree/REV`` listing) with the files a test lists, and serves the files a test gives it
(``/OWNER/NAME/resolve/REV/FILE``) at the pace the test allows: no byte goes out beyond what
``allow()`` has let through, so a test can hold a download part-way and look at it. Every request is counted; anything else is a 404.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

COMMIT = "b" * 40
# Bytes written between two checks of what the test allows.
CHUNK = 1 << 20
# Seconds a download waits for the test to allow more before the stub gives up on it.
HELD_AT_MOST = 300.0


class HubStub:
    """The Hub's model-info API for ``repos`` (each a list of sibling entries), and the files
    of ``files`` (``(repo, filename)`` to a local file, served with its sha256 as etag)."""

    def __init__(
        self,
        repos: dict[str, list[dict[str, Any]]],
        files: dict[tuple[str, str], tuple[Path, str]] | None = None,
    ) -> None:
        self.repos = repos
        self.files = files or {}
        self.requests: list[str] = []
        self.allowed = 0  # bytes of downloads the test has let through, in all
        self.sent = 0
        self._pace = threading.Condition()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stub.requests.append(self.path)
                path = self.path.split("?", 1)[0]
                if not path.startswith("/api/models/"):
                    stub._serve_file(self, path)
                    return
                parts = path.split("/")
                repo = "/".join(parts[3:5])
                if repo not in stub.repos:
                    self.send_error(404)
                    return
                if parts[5:6] == ["tree"]:  # the listing a download reads its files from
                    body = json.dumps([_tree_entry(s) for s in stub.repos[repo]]).encode()
                else:
                    body = json.dumps(
                        {"id": repo, "sha": COMMIT, "siblings": stub.repos[repo]}
                    ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_HEAD(self) -> None:
                self.do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def about(self, repo: str) -> list[str]:
        return [r for r in self.requests if repo in r]

    def downloads(self) -> list[str]:
        """File requests (HEAD and GET alike)."""
        return [r for r in self.requests if not r.startswith("/api/")]

    def allow(self, total: int) -> None:
        """Let downloads send ``total`` bytes in all (never fewer than already allowed)."""
        with self._pace:
            self.allowed = max(self.allowed, total)
            self._pace.notify_all()

    def holding(self) -> bool:
        """Whether the downloads have sent all they may (less than a chunk short of it)."""
        with self._pace:
            return self.allowed - self.sent < CHUNK

    def close(self) -> None:
        self.allow(1 << 62)
        self.server.shutdown()
        self.server.server_close()

    def _serve_file(self, request: BaseHTTPRequestHandler, path: str) -> None:
        # /OWNER/NAME/resolve/REVISION/FILE
        parts = path.strip("/").split("/", 4)
        found = None
        if len(parts) == 5 and parts[2] == "resolve":
            found = self.files.get(("/".join(parts[:2]), parts[4]))
        if found is None:
            request.send_error(404)
            return
        file, sha256 = found
        size = file.stat().st_size
        request.send_response(200)
        request.send_header("Content-Length", str(size))
        request.send_header("ETag", f'"{sha256}"')
        request.send_header("X-Repo-Commit", COMMIT)
        request.end_headers()
        if request.command == "HEAD":
            return
        with open(file, "rb") as f:
            while chunk := f.read(CHUNK):
                if not self._take(len(chunk)):
                    return
                request.wfile.write(chunk)

    def _take(self, n: int) -> bool:
        """Wait until ``n`` more bytes may go out and count them; False if never allowed."""
        with self._pace:
            if not self._pace.wait_for(lambda: self.sent + n <= self.allowed, HELD_AT_MOST):
                return False
            self.sent += n
            return True


def _tree_entry(sibling: dict[str, Any]) -> dict[str, Any]:
    """A model-info sibling as the tree API lists it."""
    entry = {"type": "file", "path": sibling["rfilename"], "size": sibling["size"]}
    entry["oid"] = sibling["blobId"]
    if "lfs" in sibling:
        lfs = sibling["lfs"]
        entry["lfs"] = {"oid": lfs["sha256"], "size": lfs["size"], "pointerSize": 134}
    return entry
