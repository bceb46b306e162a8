"""A small synchronous client for the pleaco API (stdlib only, so the CLI starts fast).

Every method returns decoded JSON or raises ApiError with the server's code and message;
a server that cannot be reached raises ApiError with code ``unreachable``.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from pleaco.api.errors import ApiError

DEFAULT_API = "http://127.0.0.1:7400"


def resolve_token(flag: str | None, token_file: Path | None = None) -> str | None:
    """PLEACO_TOKEN, then --token, then the admin token file when it is readable.

    The file is DATA_DIR/admin.token, DATA_DIR being PLEACO_DATA_DIR (the variable the
    agent reads too) or /var/lib/pleaco, so on a node the CLI works with no set-up.
    """
    if os.environ.get("PLEACO_TOKEN"):
        return os.environ["PLEACO_TOKEN"]
    if flag:
        return flag
    if token_file is None:
        token_file = Path(os.environ.get("PLEACO_DATA_DIR") or "/var/lib/pleaco") / "admin.token"
    try:
        return token_file.read_text().strip() or None
    except OSError:
        return None


class Client:
    def __init__(self, base_url: str = DEFAULT_API, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _open(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            return urllib.request.urlopen(req, timeout=timeout if timeout is not None else self.timeout)
        except urllib.error.HTTPError as exc:
            raise _error_from(exc) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ApiError(0, "unreachable", f"cannot reach the pleaco API at {self.base_url}: {reason}") from None

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        with self._open(method, path, body, timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def read_bytes(self, path: str) -> bytes:
        """A GET whose answer is not JSON (a job run's log)."""
        with self._open("GET", path) as resp:
            return resp.read()  # type: ignore[no-any-return]

    def upload(self, path: str, file: Path, on_progress: Callable[[int, int], None] = lambda sent, total: None,
               timeout: float | None = None) -> Any:
        """POST a file as the raw body, streamed, calling ``on_progress(sent, total)``."""
        total = file.stat().st_size
        with open(file, "rb") as f:
            body = _Progress(f, total, on_progress)
            req = urllib.request.Request(self.base_url + path, data=body, method="POST")
            req.add_header("Content-Type", "application/octet-stream")
            req.add_header("Content-Length", str(total))
            if self.token:
                req.add_header("Authorization", f"Bearer {self.token}")
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as exc:
                raise _error_from(exc) from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise ApiError(0, "unreachable", f"cannot reach the pleaco API at {self.base_url}: {reason}") from None
        return json.loads(raw) if raw else None

    # -- verbs ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return self.request("GET", "/v1/status")  # type: ignore[no-any-return]

    def nodes(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/nodes")  # type: ignore[no-any-return]

    def apps(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/apps")  # type: ignore[no-any-return]

    def app(self, name: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/apps/{_q(name)}")  # type: ignore[no-any-return]

    def deploy(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.request("PUT", f"/v1/apps/{_q(name)}", spec)  # type: ignore[no-any-return]

    def scale(self, name: str, replicas: int) -> dict[str, Any]:
        return self.request("POST", f"/v1/apps/{_q(name)}/scale", {"replicas": replicas})  # type: ignore[no-any-return]

    def autoscale(self, name: str, policy: dict[str, Any]) -> dict[str, Any]:
        return self.request("PUT", f"/v1/apps/{_q(name)}/autoscale", policy)  # type: ignore[no-any-return]

    def autoscale_off(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/apps/{_q(name)}/autoscale")  # type: ignore[no-any-return]

    def rollback(self, name: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/apps/{_q(name)}/rollback")  # type: ignore[no-any-return]

    def remove(self, name: str) -> dict[str, Any]:
        return self.request("DELETE", f"/v1/apps/{_q(name)}")  # type: ignore[no-any-return]

    def logs(self, name: str, follow: bool = False, tail: int | str = 100) -> Iterator[bytes]:
        query = urllib.parse.urlencode({"tail": tail, "follow": "1" if follow else "0"})
        resp = self._open("GET", f"/v1/apps/{_q(name)}/logs?{query}", timeout=None if follow else self.timeout)
        with resp:
            yield from resp


    def run(self, name: str, command: list[str]) -> Iterator[dict[str, Any]]:
        """A one-off job (pleaco/api/jobs.py): its JSON lines as they come."""
        resp = self._open("POST", f"/v1/apps/{_q(name)}/run", {"command": command}, timeout=None)
        with resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)

    # -- builds (pleaco/api/builds.py) ----------------------------------------------------

    def connect(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", f"/v1/apps/{_q(name)}/connect", body)  # type: ignore[no-any-return]

    def builds(self, app: str | None = None) -> list[dict[str, Any]]:
        query = "?" + urllib.parse.urlencode({"app": app}) if app else ""
        return self.request("GET", f"/v1/builds{query}")  # type: ignore[no-any-return]

    def build(self, build_id: str) -> dict[str, Any]:
        return self.request("GET", f"/v1/builds/{_q(build_id)}")  # type: ignore[no-any-return]

    def cancel_build(self, build_id: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/builds/{_q(build_id)}/cancel")  # type: ignore[no-any-return]

    def build_logs(self, build_id: str, follow: bool = False) -> Iterator[bytes]:
        path = f"/v1/builds/{_q(build_id)}/logs?follow={'1' if follow else '0'}"
        resp = self._open("GET", path, timeout=None if follow else self.timeout)
        with resp:
            while chunk := resp.read1(65536) if hasattr(resp, "read1") else resp.read(65536):
                yield chunk

    # -- volumes (pleaco/api/volumes.py) --------------------------------------------------

    def volumes(self) -> list[dict[str, Any]]:
        return self.request("GET", "/v1/volumes")  # type: ignore[no-any-return]

    def volume_snapshot(self, app: str, volume: str) -> Iterator[bytes]:
        """The volume's tar, in chunks as they come (no timeout between them but the client's)."""
        with self._open("GET", f"/v1/volumes/{_q(app)}/{_q(volume)}/snapshot") as resp:
            while chunk := resp.read(1 << 16):
                yield chunk

    def volume_restore(self, app: str, volume: str, file: Path) -> dict[str, Any]:
        return self.upload(f"/v1/volumes/{_q(app)}/{_q(volume)}/restore", file)  # type: ignore[no-any-return]

    def volume_snapshot_to_store(self, app: str, volume: str) -> dict[str, Any]:
        # No timeout: the agent answers once the whole snapshot is in the object store.
        return self.request("POST", f"/v1/volumes/{_q(app)}/{_q(volume)}/snapshots",  # type: ignore[no-any-return]
                            timeout=None)

    def volume_stored_snapshots(self, app: str, volume: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/v1/volumes/{_q(app)}/{_q(volume)}/snapshots")  # type: ignore[no-any-return]

    def volume_restore_from_store(self, app: str, volume: str, key: str) -> dict[str, Any]:
        return self.request("POST", f"/v1/volumes/{_q(app)}/{_q(volume)}/restore?"  # type: ignore[no-any-return]
                            + urllib.parse.urlencode({"key": key}), timeout=None)

    def remove_volumes(self, app: str, volume: str | None = None) -> dict[str, Any]:
        path = f"/v1/volumes/{_q(app)}" + (f"/{_q(volume)}" if volume else "")
        return self.request("DELETE", path)  # type: ignore[no-any-return]


class _Progress:
    """A file read by urllib in blocks, telling how far it got."""

    def __init__(self, f: BinaryIO, total: int, on_progress: Callable[[int, int], None]) -> None:
        self.f, self.total, self.sent, self.on_progress = f, total, 0, on_progress

    def read(self, size: int = -1) -> bytes:
        chunk = self.f.read(size if size and size > 0 else 1 << 16)
        self.sent += len(chunk)
        self.on_progress(self.sent, self.total)
        return chunk


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _error_from(exc: urllib.error.HTTPError) -> ApiError:
    try:
        err = json.loads(exc.read())["error"]
        return ApiError(exc.code, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        return ApiError(exc.code, "http_error", f"HTTP {exc.code} {exc.reason}")
