"""An in-memory twin of Docker Engine behind the ``Engine`` protocol, for unit tests.

It keeps the rules the adapter (pleaco.runtime.docker) and Docker give the loops, so a
loop's unit test exercises the same paths as against the real engine:

- container names are unique: a second create of a name raises ``Conflict``;
- ``run`` of an image the engine does not have raises ``NotFound`` (pleaco never pulls);
- states ``created`` -> ``running`` -> ``exited`` (with an exit code), and back to
  ``running`` on ``start``; a stop ends with 143 (SIGTERM through tini, as the adapter runs
  replicas with ``init``);
- a replica's published host port and its network address exist while it runs only, a
  new one at each start (Docker allocates them at start and frees them at stop);
- a replica's limits (memory, CPUs, processes) are kept as ``run`` was given them, and a
  container the test ``crash``es with ``oom=True`` exits 137 marked OOM-killed, as the
  kernel's OOM killer leaves one under Docker (``exit_info``); more CPUs than the engine
  has (``cpus``, default 4) are refused, with Docker's message;
- ``list_managed`` shows only containers with all four pleaco labels and that node's id,
  and ``stop``/``remove``/``remove_infra`` refuse (PermissionError) anything not the
  given node's: one twin can serve several nodes, as one engine serves several agents.

What a test controls (none of it is part of ``Engine``): ``add_image``/``remove_image``,
``crash``, ``set_down`` (every ``Engine`` call then raises ``EngineUnavailable``),
``set_healthy``, ``create`` (a replica created but never started: an agent killed in
between) and ``run_by_hand`` (a container pleaco did not make). ``probe`` answers the app
loop's HTTP health probes from the containers' health flags; ``actions`` records every
change the loops made, in order.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp

from pleaco.runtime.docker import (
    LABEL_APP,
    LABEL_NODE,
    LABEL_RELEASE,
    LABEL_REPLICA,
    LABEL_ROLE,
    MANAGED_LABELS,
    Conflict,
    ContainerInfo,
    EngineCallFailed,
    EngineUnavailable,
    ExitInfo,
    InfraInfo,
    InfraSpec,
    NotFound,
    RunSpec,
)
from pleaco.runtime.engine import Engine

# Where Docker's port allocator starts by default (the kernel's ephemeral range).
FIRST_HOST_PORT = 32768
# Docker's default bridge network: the gateway is .1, containers get .2 upward.
BRIDGE_PREFIX = "172.17.0."
# Exit code of a replica stopped with SIGTERM (tini exits 128 + the signal's number).
STOPPED_EXIT_CODE = 143
# Exit code of a replica the kernel killed for its memory limit (SIGKILL: 128 + 9).
OOM_EXIT_CODE = 137
# The twin's clock, in Unix seconds: each creation and start is one second after the last
# one, so ``created`` orders containers by creation, as Docker's does.
EPOCH = 1_700_000_000


@dataclass
class MemoryContainer:
    """One container of the twin, as a test inspects it (``MemoryEngine.inspect``)."""

    id: str
    name: str
    image: str
    labels: dict[str, str]
    created: int
    port: int | None = None  # the container port to publish
    publish_host: str = ""
    state: str = "created"  # created | running | exited
    exit_code: int | None = None
    host_port: int | None = None
    ip: str = ""
    started_at: str = ""
    starts: int = 0
    healthy: bool = True  # what the health probe answers while it runs
    output: list[bytes] = field(default_factory=list)
    mounts: tuple[tuple[str, str], ...] = ()  # infrastructure containers' bind mounts
    # HostConfig's Memory, NanoCpus and PidsLimit (None: no limit), as ``run`` set them.
    memory: int | None = None
    nano_cpus: int | None = None
    pids: int | None = None
    dns: tuple[str, ...] = ()  # HostConfig's Dns
    oom_killed: bool = False
    # Docker's Healthcheck as ``run`` set it: with one, the listing reports ``healthy`` as
    # the engine's verdict ("healthy"/"unhealthy") instead of answering HTTP probes.
    healthcheck: dict[str, Any] | None = None

    @property
    def running(self) -> bool:
        return self.state == "running"


class MemoryEngine:
    base_url = "memory://"

    def __init__(self, images: tuple[str, ...] = (), cpus: int = 4) -> None:
        self.cpus = cpus  # the machine's CPUs: a replica may not ask for more
        self._lock = threading.Lock()  # the loops call from several executor threads at once
        self._containers: dict[str, MemoryContainer] = {}
        self._images: dict[str, bool] = {ref: True for ref in images}  # ref -> health of its replicas
        self._down = False
        self._made = 0
        # Every change the loops made (not the test's controls): (verb, container name).
        self.actions: list[tuple[str, str]] = []

    # -- a test's controls ---------------------------------------------------------------

    def add_image(self, ref: str, healthy: bool = True) -> None:
        """Make the image present; its containers answer health probes with ``healthy``."""
        with self._lock:
            self._images[ref] = healthy

    def remove_image(self, ref: str) -> None:
        with self._lock:
            self._images.pop(ref, None)

    def set_down(self, down: bool = True) -> None:
        """Down: every ``Engine`` call raises EngineUnavailable (the containers live on)."""
        with self._lock:
            self._down = down

    def crash(self, container_id: str, exit_code: int = 1, oom: bool = False) -> None:
        """The container's process exits on its own with ``exit_code``; with ``oom`` the
        kernel killed it for its memory limit (exit 137, SIGKILL through tini)."""
        with self._lock:
            c = self._get(container_id)
            if not c.running:
                raise ValueError(f"container {container_id[:12]} is {c.state}, not running: it cannot crash")
            if oom and c.memory is None:
                raise ValueError(f"container {container_id[:12]} has no memory limit: it cannot be OOM-killed")
            self._exit(c, OOM_EXIT_CODE if oom else exit_code)
            c.oom_killed = oom

    def set_healthy(self, container_id: str, healthy: bool) -> None:
        with self._lock:
            self._get(container_id).healthy = healthy

    def healthy(self, container_id: str) -> bool:
        """Whether a health probe of the container passes now (it must run)."""
        with self._lock:
            c = self._containers.get(container_id)
            return c is not None and c.running and c.healthy

    def inspect(self, container_id: str) -> MemoryContainer:
        """A copy of the container's state; NotFound when there is none (down or not)."""
        with self._lock:
            c = self._get(container_id)
            return MemoryContainer(**{**c.__dict__, "labels": dict(c.labels), "output": list(c.output)})

    def container_ids(self) -> set[str]:
        """Every container's id, any node's, any labels, any state."""
        with self._lock:
            return set(self._containers)

    def create(self, spec: RunSpec) -> str:
        """Create a replica's container without starting it, as ``run`` would name and
        label it: what an agent killed between Docker's create and start leaves behind."""
        with self._lock:
            c = self._containers[self._create(spec.name, spec.image, spec.labels(), spec.port, spec.publish_host)]
            c.memory, c.nano_cpus, c.pids, c.dns = spec.memory, spec.nano_cpus, spec.pids, spec.dns
            c.healthcheck = spec.healthcheck
            return c.id

    def run_by_hand(self, image: str, name: str, labels: dict[str, str] | None = None,
                    port: int | None = None, publish_host: str = "127.0.0.1") -> str:
        """A running container pleaco did not make (``docker run`` by someone)."""
        with self._lock:
            c = self._containers[self._create(name, image, dict(labels or {}), port, publish_host)]
            self._start(c)
            return c.id

    def write_output(self, container_id: str, data: bytes) -> None:
        """What the container's process prints (``logs`` returns it, line by line)."""
        with self._lock:
            self._get(container_id).output.extend(data.splitlines(keepends=True))

    async def probe(self, session: aiohttp.ClientSession, host: str, port: int, path: str, timeout: float) -> bool:
        """A stand-in for pleaco.runtime.health.probe: True when a running container is
        published on ``port`` at an address ``host`` reaches, and is healthy. (``path`` is
        not looked at: a container is healthy or not.)"""
        with self._lock:
            return any(
                c.running and c.host_port == port and c.publish_host in (host, "0.0.0.0") and c.healthy
                for c in self._containers.values()
            )

    # -- Engine: app replicas ------------------------------------------------------------

    def list_managed(self, node_id: str, app: str | None = None) -> list[ContainerInfo]:
        with self._lock:
            self._answer()
            out = []
            for c in sorted(self._containers.values(), key=lambda c: c.created, reverse=True):
                info = self._info(c)
                if info is not None and info.node == node_id and (app is None or info.app == app):
                    out.append(info)
            return out

    def run(self, spec: RunSpec) -> str:
        with self._lock:
            self._answer()
            if spec.nano_cpus is not None and spec.nano_cpus > self.cpus * 10**9:
                raise EngineCallFailed(f"docker engine: Range of CPUs is from 0.01 to {self.cpus}.00, as there are "
                                       f"only {self.cpus} CPUs available")
            c = self._containers[self._create(spec.name, spec.image, spec.labels(), spec.port, spec.publish_host)]
            c.memory, c.nano_cpus, c.pids, c.dns = spec.memory, spec.nano_cpus, spec.pids, spec.dns
            c.healthcheck = spec.healthcheck
            self._start(c)
            self.actions.append(("run", c.name))
            return c.id

    def exit_info(self, container_id: str) -> ExitInfo:
        with self._lock:
            self._answer()
            c = self._get(container_id)
            return ExitInfo(exit_code=c.exit_code, oom_killed=c.oom_killed)

    def start(self, container_id: str) -> None:
        with self._lock:
            self._answer()
            c = self._get(container_id)
            if not c.running:
                self._start(c)
                self.actions.append(("start", c.name))

    def stop(self, container_id: str, node_id: str, stop_timeout: int = 10) -> None:
        with self._lock:
            self._answer()
            c = self._owned(container_id, node_id)
            if c.running:
                self._exit(c, STOPPED_EXIT_CODE)
                self.actions.append(("stop", c.name))

    def remove(self, container_id: str, node_id: str, stop_timeout: int = 10) -> None:
        with self._lock:
            self._answer()
            c = self._owned(container_id, node_id)
            del self._containers[c.id]
            self.actions.append(("remove", c.name))

    def logs(self, container_id: str, tail: int | str = "all", follow: bool = False) -> Iterator[bytes]:
        """The output so far (also with ``follow``: the twin's stream ends there)."""
        with self._lock:
            self._answer()
            lines = list(self._get(container_id).output)
        if tail != "all":
            lines = lines[-int(tail):] if int(tail) > 0 else []
        return iter(lines)

    # -- Engine: images ------------------------------------------------------------------

    def image_exists(self, ref: str) -> bool:
        with self._lock:
            self._answer()
            return ref in self._images

    # -- Engine: infrastructure containers -------------------------------------------------

    def find_infra(self, node_id: str, role: str) -> InfraInfo | None:
        with self._lock:
            self._answer()
            mine = [c for c in self._containers.values()
                    if c.labels.get(LABEL_ROLE) == role and c.labels.get(LABEL_NODE) == node_id]
            if not mine:
                return None
            c = max(mine, key=lambda c: c.created)
            return InfraInfo(id=c.id, name=c.name, image=c.image, state=c.state, started_at=c.started_at,
                             labels=dict(c.labels), mounts=c.mounts)

    def run_infra(self, spec: InfraSpec) -> str:
        with self._lock:
            self._answer()
            labels = {LABEL_ROLE: spec.role, LABEL_NODE: spec.node, **spec.labels}
            c = self._containers[self._create(spec.name, spec.image, labels, None, "")]
            c.mounts = tuple((src, dst) for src, dst, _ in spec.binds)
            self._start(c)
            self.actions.append(("run_infra", c.name))
            return c.id

    def list_infra(self, role: str) -> list[InfraInfo]:
        with self._lock:
            self._answer()
            return [InfraInfo(id=c.id, name=c.name, image=c.image, state=c.state, started_at="",
                              labels=dict(c.labels), mounts=c.mounts)
                    for c in self._containers.values() if c.labels.get(LABEL_ROLE) == role and LABEL_NODE in c.labels]

    def remove_infra(self, container_id: str, node_id: str, role: str) -> None:
        with self._lock:
            self._answer()
            c = self._get(container_id)
            if c.labels.get(LABEL_ROLE) != role or c.labels.get(LABEL_NODE) != node_id:
                raise PermissionError(f"container {container_id[:12]} is not node {node_id}'s {role}")
            del self._containers[c.id]
            self.actions.append(("remove_infra", c.name))

    # -- the rules (called with the lock held) -----------------------------------------------

    def _answer(self) -> None:
        if self._down:
            raise EngineUnavailable("docker engine unreachable: the memory engine is down (set_down)")

    def _get(self, container_id: str) -> MemoryContainer:
        c = self._containers.get(container_id)
        if c is None:
            raise NotFound(f"No such container: {container_id}")
        return c

    def _owned(self, container_id: str, node_id: str) -> MemoryContainer:
        """The adapter's rule: only this node's pleaco containers are touched."""
        c = self._get(container_id)
        if any(name not in c.labels for name in MANAGED_LABELS) or c.labels[LABEL_NODE] != node_id:
            raise PermissionError(f"container {container_id[:12]} is not managed by node {node_id}")
        return c

    def _create(self, name: str, image: str, labels: dict[str, str], port: int | None, publish_host: str) -> str:
        # Docker looks the image up before it reserves the name.
        if image not in self._images:
            raise NotFound(f"No such image: {image}")
        if any(c.name == name for c in self._containers.values()):
            raise Conflict(f'Conflict. The container name "/{name}" is already in use')
        self._made += 1
        cid = hashlib.sha256(f"memory-container-{self._made}".encode()).hexdigest()
        self._containers[cid] = MemoryContainer(
            id=cid, name=name, image=image, labels=labels, created=EPOCH + self._made, port=port,
            publish_host=publish_host, healthy=self._images[image],
        )
        return cid

    def _start(self, c: MemoryContainer) -> None:
        running = [o for o in self._containers.values() if o.running]
        taken_ports = {o.host_port for o in running}
        taken_ips = {o.ip for o in running}
        if c.port is not None:
            c.host_port = next(p for p in range(FIRST_HOST_PORT, 65536) if p not in taken_ports)
        if LABEL_ROLE not in c.labels:  # infrastructure runs in the host's network: no address
            c.ip = next(f"{BRIDGE_PREFIX}{n}" for n in range(2, 255) if f"{BRIDGE_PREFIX}{n}" not in taken_ips)
        c.state, c.exit_code, c.oom_killed = "running", None, False
        c.starts += 1
        self._made += 1  # the clock: a start is a second after the last event
        c.started_at = datetime.fromtimestamp(EPOCH + self._made, UTC).isoformat()

    def _exit(self, c: MemoryContainer, exit_code: int) -> None:
        c.state, c.exit_code = "exited", exit_code
        c.host_port, c.ip = None, ""

    def _info(self, c: MemoryContainer) -> ContainerInfo | None:
        """The adapter's view of a container (pleaco.runtime.docker._parse_row)."""
        try:
            release, replica = int(c.labels[LABEL_RELEASE]), int(c.labels[LABEL_REPLICA])
            app, node = c.labels[LABEL_APP], c.labels[LABEL_NODE]
        except (KeyError, ValueError):
            return None  # not a container pleaco made
        return ContainerInfo(
            id=c.id, name=c.name, app=app, node=node, release=release, replica=replica, state=c.state,
            exit_code=c.exit_code if c.state == "exited" else None, image=c.image, host_port=c.host_port,
            created=c.created, ip=c.ip, host_ip=c.publish_host if c.host_port is not None else "",
            health=("healthy" if c.healthy else "unhealthy") if c.healthcheck and c.running else "",
        )


# The twin satisfies the protocol (checked by mypy).
_memory_is_an_engine: type[Engine] = MemoryEngine
