"""The Docker Engine calls the build pipeline needs, typed, and cancellable from another thread.

Kept apart from ``pleaco.runtime.docker`` (the app containers' adapter) because build
calls are long and streaming: an image build, a test container, a push. Each
can be aborted by a ``Cancel`` token from another thread (a newer push, the time limit, the
agent stopping): a build's HTTP stream is shut down, which makes the engine cancel it; a
test container is killed.

Containers made here carry ``pleaco.build`` (the build id), ``pleaco.build-node`` (the node
id) and ``pleaco.build-role`` and never the app labels, so the app reconciler never sees
them, and an agent that restarts removes the ones its dead predecessor left behind. Built
images carry no label of pleaco's: the engine's classic builder turns each build-time label
into a build step of its own (a container created and committed, about 0.12 s), and an
image label would be inherited by the app's containers. The tag (``pleaco-build/APP:COMMIT12``)
names app and commit, and the build record names the node and the image id.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import docker
import docker.errors

from pleaco.errors import PleacoError
from pleaco.runtime.docker import API_VERSION, DockerRuntime, EngineUnavailable, NotFound, _wrap

LABEL_BUILD = "pleaco.build"
LABEL_BUILD_NODE = "pleaco.build-node"
LABEL_BUILD_ROLE = "pleaco.build-role"

LogFn = Callable[[str], None]


class Cancelled(PleacoError, RuntimeError, code="cancelled"):
    """The operation was aborted through its Cancel token; the message says why."""


class BuildFailed(PleacoError, RuntimeError, code="build_failed"):
    """The engine reported an error for the build (a Dockerfile step failed, ...)."""


class PushFailed(BuildFailed):
    """The engine could not push the image to the registry; the message is the engine's."""


class Cancel:
    """A thread-safe cancellation token with abort hooks for the operation in progress."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []
        self.reason = ""

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self._event.set()
            hooks = list(self._hooks)
        for hook in hooks:
            with contextlib.suppress(Exception):
                hook()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)

    @contextlib.contextmanager
    def on_cancel(self, hook: Callable[[], None]) -> Iterator[None]:
        with self._lock:
            self._hooks.append(hook)
            run_now = self._event.is_set()
        if run_now:
            hook()
        try:
            yield
        finally:
            with self._lock:
                self._hooks.remove(hook)


class _Client(docker.APIClient):  # type: ignore[misc]
    """An APIClient that remembers the last streamed response, so it can be shut down."""

    last_response: Any = None

    def _stream_helper(self, response: Any, decode: bool = False) -> Any:
        self.last_response = response
        return super()._stream_helper(response, decode=decode)


def _shutdown(response: Any) -> None:
    raw = response.raw._fp.fp.raw
    sock = getattr(raw, "_sock", raw)
    sock.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class TestResult:
    exit_code: int | None  # None when it was killed at its time limit
    output: str
    timed_out: bool


class BuildEngine(DockerRuntime):
    """The engine calls builds make, on top of DockerRuntime's client and error mapping."""

    def __init__(self, base_url: str, timeout: float, node_id: str) -> None:
        super().__init__(base_url, timeout)
        self.timeout = timeout
        self.node_id = node_id
        self._removing: dict[str, list[threading.Thread]] = {}  # build id -> removals running
        self._removing_lock = threading.Lock()

    def labels(self, build_id: str, role: str) -> dict[str, str]:
        """Labels of a build's own containers (test, scan, kaniko)."""
        return {LABEL_BUILD: build_id, LABEL_BUILD_NODE: self.node_id, LABEL_BUILD_ROLE: role}

    # -- images --------------------------------------------------------------------------

    def image_id(self, ref: str) -> str | None:
        try:
            return str(self._call(self._api.inspect_image, ref)["Id"])
        except NotFound:
            return None

    def tag(self, image: str, repository: str, tag: str) -> None:
        self._call(self._api.tag, image, repository, tag, force=True)

    def build(self, context: IO[bytes], *, tag: str, dockerfile: str, build_args: dict[str, str],
              labels: dict[str, str], cache_from: list[str], log: LogFn, cancel: Cancel,
              network_mode: str | None = "none") -> str:
        """Build an image from a tar context with the engine's (classic) builder; its id.
        ``network_mode`` is what its RUN steps' containers get: a network's name, "none",
        or None for the engine's default bridge (see pleaco.builds.network)."""
        client = _Client(base_url=self.base_url, version=API_VERSION, timeout=None)
        image_id = ""
        try:
            cancel.check()
            stream = client.build(
                fileobj=context, custom_context=True, tag=tag, dockerfile=dockerfile,
                buildargs=build_args or None, labels=labels, cache_from=cache_from or None,
                rm=True, forcerm=True, decode=True, pull=False, network_mode=network_mode,
            )
            with cancel.on_cancel(lambda: _shutdown(client.last_response)):
                for msg in stream:
                    if "stream" in msg:
                        log(str(msg["stream"]))
                    if "error" in msg:
                        raise BuildFailed(str(msg["error"]).strip())
                    aux = msg.get("aux")
                    if isinstance(aux, dict) and "ID" in aux:
                        image_id = str(aux["ID"])
        except (BuildFailed, Cancelled):
            raise
        except Exception as exc:
            if cancel.cancelled:
                raise Cancelled(cancel.reason) from None
            err = _wrap(exc)
            raise (err if isinstance(err, EngineUnavailable) else BuildFailed(str(err))) from exc
        finally:
            client.close()
        cancel.check()
        return image_id or (self.image_id(tag) or "")

    def push(self, image: str, repository: str, tag: str, *, log: LogFn, cancel: Cancel) -> str:
        """Tag ``image`` as ``repository:tag`` and push it (``docker push``), its progress
        streamed to ``log``; returns the digest the registry reported (or ""). The engine
        pushes with the credentials this client sends: the agent's Docker client config
        (``docker login`` as the agent's user, or $DOCKER_CONFIG). Raises PushFailed."""
        self.tag(image, repository, tag)
        client = _Client(base_url=self.base_url, version=API_VERSION, timeout=None)
        digest = ""
        seen: dict[str, str] = {}
        try:
            cancel.check()
            stream = client.push(repository, tag=tag, stream=True, decode=True)
            with cancel.on_cancel(lambda: _shutdown(client.last_response)):
                for msg in stream:
                    if "error" in msg:
                        raise PushFailed(str(msg["error"]).strip())
                    aux = msg.get("aux")
                    if isinstance(aux, dict) and aux.get("Digest"):
                        digest = str(aux["Digest"])
                    status = str(msg.get("status") or "")
                    layer = str(msg.get("id") or "")
                    # One line per layer and state, not per progress tick.
                    if status and seen.get(layer) != status:
                        seen[layer] = status
                        log(f"{layer}: {status}\n" if layer else f"{status}\n")
        except (PushFailed, Cancelled):
            raise
        except Exception as exc:
            if cancel.cancelled:
                raise Cancelled(cancel.reason) from None
            err = _wrap(exc)
            raise (err if isinstance(err, EngineUnavailable) else PushFailed(str(err))) from exc
        finally:
            client.close()
        cancel.check()
        return digest

    def save(self, image: str) -> Iterator[bytes]:
        """``docker save``, streamed: what a node sends a peer that needs the image (the
        cluster's node-to-node channel carries it; ``load`` on the other side)."""
        return self._call(self._api.get_image, image, chunk_size=1 << 20)  # type: ignore[no-any-return]

    def load(self, tarball: IO[bytes] | Iterator[bytes]) -> list[str]:
        """``docker load``: the image ids (or names) the engine reports."""
        out = []
        for msg in self._call(self._api.load_image, tarball):
            if "error" in msg:
                raise BuildFailed(str(msg["error"]))
            stream = str(msg.get("stream", ""))
            for prefix in ("Loaded image ID: ", "Loaded image: "):
                if stream.startswith(prefix):
                    out.append(stream[len(prefix):].strip())
        return out

    # -- networks (the isolated build network, pleaco.builds.network) -------------------

    def network_inspect(self, name: str) -> dict[str, object] | None:
        try:
            return dict(self._call(self._api.inspect_network, name))
        except NotFound:
            return None

    def network_create(self, name: str, options: dict[str, str], labels: dict[str, str]) -> None:
        self._call(self._api.create_network, name, driver="bridge", options=options, labels=labels,
                   check_duplicate=True)

    def network_remove(self, name: str) -> None:
        with contextlib.suppress(NotFound):
            self._call(self._api.remove_network, name)

    # -- containers ----------------------------------------------------------------------

    def run_to_completion(self, image: str, command: list[str] | None, *, labels: dict[str, str],
                          time_limit: float, cancel: Cancel, network_mode: str | None = "none", mem_bytes: int = 0,
                          nano_cpus: int = 0, binds: list[str] | None = None,
                          log: LogFn | None = None) -> TestResult:
        """Run a fresh container to its end (killed at ``time_limit``); it is always removed.
        ``network_mode``: "none" (the default: tests run without a network), a network's
        name, or None for the engine's default bridge."""
        host_config = self._api.create_host_config(
            network_mode=network_mode, mem_limit=mem_bytes or None,
            nano_cpus=nano_cpus or None, binds=binds, init=True,
        )
        created = self._call(self._api.create_container, image, command=command, labels=labels,
                             host_config=host_config, network_disabled=network_mode == "none", detach=True)
        cid = str(created["Id"])
        timed_out = False
        try:
            with cancel.on_cancel(lambda: self._api.kill(cid)):
                cancel.check()
                self._call(self._api.start, cid)
                followed: list[bytes] = []
                complete = threading.Event()
                follower = threading.Thread(target=self._follow_logs, args=(cid, log, followed, complete),
                                            daemon=True)
                if log is not None:
                    follower.start()
                deadline = time.monotonic() + time_limit
                exit_code: int | None = None
                while True:
                    try:
                        res = self._api.wait(cid, timeout=max(0.1, min(5.0, deadline - time.monotonic())))
                        exit_code = int(res.get("StatusCode", -1))
                        break
                    except Exception as exc:  # read timeout of the wait: check the deadline
                        if not _is_timeout(exc):
                            raise _wrap(exc) from exc
                    if time.monotonic() >= deadline:
                        timed_out = True
                        with contextlib.suppress(Exception):
                            self._api.kill(cid)
                        break
                if log is not None:
                    follower.join(10)
            cancel.check()
            # A followed stream that ended with the container holds the whole output.
            raw = b"".join(followed) if complete.is_set() else self._call(self._api.logs, cid, stdout=True,
                                                                          stderr=True)
            return TestResult(None if timed_out else exit_code, raw.decode("utf-8", "replace"), timed_out)
        finally:
            self._remove_soon(cid, labels.get(LABEL_BUILD, ""))

    def _follow_logs(self, cid: str, log: LogFn | None, into: list[bytes], complete: threading.Event) -> None:
        if log is None:
            return
        with contextlib.suppress(Exception):
            for chunk in self._api.logs(cid, stream=True, follow=True):
                into.append(chunk)
                log(chunk.decode("utf-8", "replace"))
            complete.set()

    def _remove_soon(self, cid: str, build_id: str) -> None:
        """Remove a finished container in the background, off the build's path (the release
        does not wait for it); ``remove_leftovers`` of its build waits for it to be gone."""
        def remove() -> None:
            with contextlib.suppress(Exception):
                self._api.remove_container(cid, force=True)

        thread = threading.Thread(target=remove, name=f"remove-{cid[:12]}", daemon=True)
        with self._removing_lock:
            self._removing.setdefault(build_id, []).append(thread)
        thread.start()

    def wait_removals(self, build_ids: set[str] | None = None) -> None:
        """Wait for the background removals of ``build_ids``' containers (or all)."""
        with self._removing_lock:
            keys = list(self._removing) if build_ids is None else [k for k in build_ids if k in self._removing]
            threads = [t for k in keys for t in self._removing.pop(k)]
        for thread in threads:
            thread.join(self.timeout)

    @contextlib.contextmanager
    def image_tar(self, image: str) -> Iterator[IO[bytes]]:
        """The image as ``docker save`` streams it (its layers and manifest.json), read
        straight from the engine's image store: no container is created."""
        chunks = self._call(self._api.get_image, image, chunk_size=1 << 20)
        yield io.BufferedReader(_ChunkReader(chunks), 1 << 16)

    def remove_leftovers(self, build_ids: set[str] | None = None) -> int:
        """Remove this node's build containers (all, or those of ``build_ids``), once their
        background removals are done."""
        self.wait_removals(build_ids)
        rows = self._call(self._api.containers, all=True,
                          filters={"label": [f"{LABEL_BUILD_NODE}={self.node_id}", LABEL_BUILD, LABEL_BUILD_ROLE]})
        n = 0
        for row in rows:
            labels = row.get("Labels") or {}
            if labels.get(LABEL_BUILD_NODE) != self.node_id:
                continue
            if build_ids is None or labels.get(LABEL_BUILD) in build_ids:
                with contextlib.suppress(Exception):
                    self._api.remove_container(row["Id"], force=True)
                    n += 1
        return n


def _is_timeout(exc: Exception) -> bool:
    import requests

    return isinstance(exc, requests.exceptions.ReadTimeout | requests.exceptions.ConnectionError) and (
        "timed out" in str(exc).lower() or isinstance(exc, requests.exceptions.ReadTimeout))


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (the ``docker save`` stream), for tarfile."""

    def __init__(self, chunks: Any) -> None:
        self._chunks = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n
