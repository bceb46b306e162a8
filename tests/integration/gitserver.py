"""A local stand-in for GitHub: a real ``git daemon`` serving bare repositories on
127.0.0.1, app repositories made from examples/ by real git commands, and webhook
deliveries signed and shaped exactly as GitHub sends them."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentproc import REPO, free_port, wait_listening

EXAMPLES = REPO / "examples"
GIT_ENV = {"GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "Test",
           "GIT_COMMITTER_EMAIL": "test@example.com", "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent"}


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV},
                          timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip()


@dataclass
class GitServer:
    """``git daemon`` exporting every bare repository under ``root``, pushes allowed."""

    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    # Where it listens and what the URLs name: loopback for agents on this host; a Docker
    # network's gateway for nodes in containers.
    host: str = "127.0.0.1"

    def start(self) -> GitServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", "--export-all", "--enable=receive-pack", f"--listen={self.host}",
             f"--port={self.port}", f"--base-path={self.root}", str(self.root)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.proc, self.host, self.port, 10, "git daemon")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def url(self, name: str) -> str:
        return f"git://{self.host}:{self.port}/{name}.git"

    def create(self, name: str) -> str:
        bare = self.root / f"{name}.git"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
        return self.url(name)


@dataclass
class AppRepo:
    """A working copy made from an example, pushing to the git server."""

    work: Path
    url: str
    head: str = ""
    before: str = "0" * 40

    @classmethod
    def from_example(cls, example: str, work: Path, url: str) -> AppRepo:
        shutil.copytree(EXAMPLES / example, work)
        git("init", "-q", "-b", "main", cwd=work)
        git("remote", "add", "origin", url, cwd=work)
        return cls(work, url)

    def commit_and_push(self, message: str, branch: str = "main", change: dict[str, str] | None = None) -> str:
        for rel, text in (change or {}).items():
            (self.work / rel).write_text(text)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "--allow-empty", "-m", message, cwd=self.work)
        git("push", "-q", "origin", f"HEAD:refs/heads/{branch}", cwd=self.work)
        self.before, self.head = self.head or "0" * 40, git("rev-parse", "HEAD", cwd=self.work)
        return self.head


def repository(url: str, full_name: str = "pleaco-test/app") -> dict[str, Any]:
    """GitHub's ``repository`` object (the fields pleaco and most receivers read)."""
    owner, name = full_name.split("/")
    return {
        "id": 123456, "node_id": "R_kgDOtest", "name": name, "full_name": full_name, "private": False,
        "owner": {"login": owner, "id": 1, "type": "Organization"},
        "html_url": f"https://github.com/{full_name}", "url": f"https://api.github.com/repos/{full_name}",
        "clone_url": url, "git_url": f"git://github.com/{full_name}.git",
        "ssh_url": f"git@github.com:{full_name}.git", "default_branch": "main", "master_branch": "main",
    }


def push_payload(url: str, before: str, after: str, branch: str = "main", deleted: bool = False,
                 ref: str | None = None) -> dict[str, Any]:
    ref = ref or f"refs/heads/{branch}"
    head = None if deleted else {
        "id": after, "tree_id": "0" * 40, "distinct": True, "message": "change", "timestamp": "2026-01-01T00:00:00Z",
        "url": f"https://github.com/pleaco-test/app/commit/{after}",
        "author": {"name": "Test", "email": "test@example.com"}, "committer": {"name": "Test", "email": "t@e.com"},
        "added": [], "removed": [], "modified": ["serve.sh"],
    }
    return {
        "ref": ref, "before": before, "after": after, "created": before == "0" * 40, "deleted": deleted,
        "forced": False, "base_ref": None, "compare": f"https://github.com/pleaco-test/app/compare/{before[:12]}...{after[:12]}",
        "commits": [head] if head else [], "head_commit": head, "repository": repository(url),
        "pusher": {"name": "test", "email": "test@example.com"}, "sender": {"login": "test", "id": 2},
    }


def ping_payload(url: str) -> dict[str, Any]:
    return {"zen": "Keep it logically awesome.", "hook_id": 42,
            "hook": {"type": "Repository", "id": 42, "events": ["push"], "active": True,
                     "config": {"content_type": "json", "url": "http://example/v1/hooks/github", "insecure_ssl": "0"}},
            "repository": repository(url), "sender": {"login": "test", "id": 2}}


@dataclass
class Delivery:
    status: int
    body: dict[str, Any]


def deliver(api_url: str, secret: str | None, event: str, payload: dict[str, Any] | bytes,
            delivery: str | None = None, signature: str | None = None) -> Delivery:
    """POST a webhook delivery as GitHub does: compact JSON, HMAC-SHA256 and SHA-1 headers."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "GitHub-Hookshot/abc1234",
               "X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
               "X-GitHub-Hook-ID": "42", "X-GitHub-Hook-Installation-Target-Type": "repository",
               "X-GitHub-Hook-Installation-Target-ID": "123456"}
    if signature is not None:
        headers["X-Hub-Signature-256"] = signature
    elif secret is not None:
        headers["X-Hub-Signature-256"] = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers["X-Hub-Signature"] = "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
    req = urllib.request.Request(api_url + "/v1/hooks/github", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return Delivery(resp.status, json.loads(resp.read() or b"{}"))
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            return Delivery(exc.code, json.loads(exc.read()))
        return Delivery(exc.code, {})


class HttpGitServer:
    """``git http-backend`` behind a small HTTP server on 127.0.0.1 that demands a token, as
    GitHub does for a private repository over HTTPS (Basic auth, any user, token as the
    password). Serves the same bare repositories as a GitServer on ``root``."""

    def __init__(self, root: Path, token: str) -> None:
        import base64
        import http.server
        import threading

        expected = {base64.b64encode(f"{user}:{token}".encode()).decode() for user in ("x-access-token", "git")}
        self.requests: list[tuple[str, bool]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _cgi(self) -> None:
                auth = self.headers.get("Authorization", "")
                ok = auth.startswith("Basic ") and auth[6:] in expected
                outer.requests.append((self.path, ok))
                if not ok:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="git"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path, _, query = self.path.partition("?")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                env = {"GIT_PROJECT_ROOT": str(root), "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path,
                       "QUERY_STRING": query, "REQUEST_METHOD": self.command,
                       "CONTENT_TYPE": self.headers.get("Content-Type", ""), "REMOTE_USER": "git",
                       "REMOTE_ADDR": "127.0.0.1", "GIT_PROTOCOL": self.headers.get("Git-Protocol", ""),
                       "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
                if self.headers.get("Content-Encoding"):
                    env["HTTP_CONTENT_ENCODING"] = self.headers["Content-Encoding"]
                out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True,
                                     timeout=60).stdout
                head, _, payload = out.partition(b"\r\n\r\n")
                status = 200
                headers = []
                for line in head.decode().split("\r\n"):
                    k, _, v = line.partition(": ")
                    if k.lower() == "status":
                        status = int(v.split()[0])
                    elif k:
                        headers.append((k, v))
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _cgi
            do_POST = _cgi

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}.git"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
