"""A thin, typed adapter over Docker Engine (through the ``docker`` SDK's low-level API).

Callers see dataclasses and three exceptions, never raw HTTP. Every call is synchronous and
may block for up to the configured timeout; the async reconciler runs them in threads.

pleaco only ever touches containers that carry its labels, and each agent only those whose
``pleaco.node`` label is its own node id: several agents can share one engine.
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import docker
import docker.errors
import docker.types
import requests

from pleaco import errors

LABEL_APP = "pleaco.app"
LABEL_NODE = "pleaco.node"
LABEL_RELEASE = "pleaco.release"
LABEL_REPLICA = "pleaco.replica"
MANAGED_LABELS = (LABEL_APP, LABEL_NODE, LABEL_RELEASE, LABEL_REPLICA)
# Infrastructure containers (the proxy) carry this and LABEL_NODE instead of the four above.
LABEL_ROLE = "pleaco.role"
# One-off jobs (``pleaco run``) carry LABEL_ROLE = ROLE_JOB, LABEL_NODE, their id and their
# app under a label of their own: not the four above, so no replica loop ever sees them.
ROLE_JOB = "job"
# Short-lived containers that copy a volume's content out or in (volumes snapshot|restore).
ROLE_VOLUME_HELPER = "volume-helper"
LABEL_JOB = "pleaco.job"
LABEL_JOB_APP = "pleaco.job.app"
# An app's named volumes (pleaco.stacks.volumes) carry LABEL_APP, LABEL_NODE and this.
LABEL_VOLUME = "pleaco.volume"

# The oldest engine we support is Debian 12's docker.io (20.10, API 1.41). Pinning the
# version also means creating the client never has to reach the engine.
API_VERSION = "1.41"

# Seconds the first resize of an exec's terminal waits for the engine to report the command
# running (it is within milliseconds of the start; the bound keeps a stuck engine from
# holding the session).
RESIZE_WAIT = 2.0

_EXIT_CODE = re.compile(r"Exited \((-?\d+)\)")


class EngineError(errors.PleacoError, code="engine_error", status=502):
    """Docker Engine failed a call: the base of the four below. Each also keeps the builtin
    base it always had, which callers' except clauses rely on."""


class EngineUnavailable(errors.Unavailable, EngineError, RuntimeError, code="engine_unreachable"):
    """Docker Engine does not answer (down, socket missing, or timed out)."""


class NotFound(errors.NotFound, EngineError, LookupError):
    """The container or image does not exist."""


class Conflict(errors.Conflict, EngineError, RuntimeError):
    """The container name is taken (the container already exists)."""


class EngineCallFailed(EngineError, RuntimeError):
    """Docker Engine answered a call with an error other than the above."""


@dataclass(frozen=True)
class ContainerInfo:
    id: str
    name: str
    app: str
    node: str
    release: int
    replica: int
    state: str  # created | running | paused | restarting | exited | dead | removing
    exit_code: int | None
    image: str
    host_port: int | None
    created: int
    # The container's address on its Docker network ("" when it has none): the proxy, in the
    # host's network namespace, dials it directly rather than through the published port's
    # docker-proxy (a userland copy of every connection).
    ip: str = ""
    # The host address its port is published on (0.0.0.0 for every address): other nodes'
    # proxies dial HOST_IP:HOST_PORT (the routing mesh).
    host_ip: str = ""
    # The Docker network ``ip`` is on ("" when none).
    network: str = ""
    # Every (network, address) it has: a replica made before the agent managed the network
    # is connected to the agent's network as well, beside the default bridge.
    addresses: tuple[tuple[str, str], ...] = ()
    # The engine's verdict of its healthcheck, from the listing's status ("Up 5 s
    # (healthy)"): "starting", "healthy", "unhealthy", or "" when it has none.
    health: str = ""

    def address_on(self, network: str) -> str:
        """Its address on ``network``, "" when it is not on it."""
        return next((ip for name, ip in self.addresses if name == network), "")

    @property
    def running(self) -> bool:
        return self.state == "running"


def container_name(app: str, release: int, replica: int, node_id: str) -> str:
    """The one name a replica's container can have. Deterministic, so Docker's unique names
    make a second create of the same replica fail instead of making a duplicate (e.g. after
    the agent died between two steps)."""
    return f"pleaco-{app}-{release}-{replica}-{node_id[:12]}"


def volume_name(app: str, volume: str, node_id: str) -> str:
    """The Docker volume of an app's named volume on a node. App names hold no '.', and
    the node id has a fixed length at the end, so no two (app, volume) pairs share a name;
    the node is in it because several agents may share one engine."""
    return f"pleaco-{app}.{volume}.{node_id[:12]}"


@dataclass(frozen=True)
class RunSpec:
    """One replica to start."""

    app: str
    node: str
    release: int
    replica: int
    image: str
    port: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    publish_host: str = "127.0.0.1"
    # Publish the port on the host (publish_host:random). Off when proxies dial the
    # replica on its cluster address instead ([network] publish_ports).
    publish: bool = True
    # The Docker network to run on ("": the engine's default bridge): pleaco's own, on the
    # node's subnet, when the agent manages the network.
    network: str = ""
    # Limits (None: none): memory in bytes (swap included: no swap beyond it), CPU time in
    # billionths of a CPU (Docker's NanoCpus: --cpus 0.5 is 500000000), processes.
    memory: int | None = None
    nano_cpus: int | None = None
    pids: int | None = None
    # Bind mounts as (host path, container path, "ro" | "rw"): an app's secret files.
    binds: tuple[tuple[str, str, str], ...] = ()
    # The container's resolvers (HostConfig Dns; empty: the engine's default). On a
    # user-defined network the engine's embedded DNS answers container names and asks
    # these for everything else: the agent's service names (pleaco.net.names).
    dns: tuple[str, ...] = ()
    # The app's named volumes as (volume, container path): made, labelled, when missing.
    volumes: tuple[tuple[str, str], ...] = ()
    # Search domains of its resolver (HostConfig DnsSearch): a stack's services get
    # ``STACK.SUFFIX``, so a bare service name resolves as ``SERVICE.STACK.SUFFIX``.
    dns_search: tuple[str, ...] = ()
    # Docker's Cmd and Entrypoint (None: the image's own).
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    # Docker's Healthcheck (pleaco.healthcmd.HealthCommand.to_docker()); None: the image's.
    healthcheck: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return container_name(self.app, self.release, self.replica, self.node)

    def labels(self) -> dict[str, str]:
        return {
            LABEL_APP: self.app,
            LABEL_NODE: self.node,
            LABEL_RELEASE: str(self.release),
            LABEL_REPLICA: str(self.replica),
        }


@dataclass(frozen=True)
class NetworkSpec:
    """A bridge network of the agent's own: its subnet, its gateway, its Linux bridge."""

    name: str
    subnet: str  # CIDR
    gateway: str
    bridge: str  # the Linux bridge's name (com.docker.network.bridge.name)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NetworkInfo:
    id: str
    name: str
    driver: str
    subnets: tuple[str, ...]  # CIDRs of its IPAM config
    bridge: str
    labels: dict[str, str]
    containers: tuple[str, ...]  # ids of the containers attached


@dataclass(frozen=True)
class JobSpec(RunSpec):
    """A one-off container of an app's release (``pleaco run``, a scheduled run): made as a
    replica of that release is (the same RunSpec: image, environment, entrypoint, volumes,
    network, limits), but running the job's command, without a port, and named and
    labelled as a job, never as a replica."""

    job: str = ""  # the job's id

    @classmethod
    def of(cls, run: RunSpec, job: str, command: tuple[str, ...]) -> JobSpec:
        """The job ``job`` running ``command`` in a container made as ``run`` is."""
        given = {f.name: getattr(run, f.name) for f in fields(RunSpec)}
        # No port, and not the app's health command: a job is not a replica that serves.
        return cls(**{**given, "port": None, "publish": False, "command": command, "healthcheck": None}, job=job)

    @property
    def name(self) -> str:
        return f"pleaco-job-{self.app}-{self.job}-{self.node[:12]}"

    def labels(self) -> dict[str, str]:
        return {LABEL_ROLE: ROLE_JOB, LABEL_NODE: self.node, LABEL_JOB: self.job, LABEL_JOB_APP: self.app}


@dataclass(frozen=True)
class ExitInfo:
    """Why a container stopped, as the engine recorded it."""

    exit_code: int | None
    oom_killed: bool  # the kernel killed it for going over its memory limit
    error: str = ""  # the engine's own error starting it, if any


@dataclass(frozen=True)
class InfraSpec:
    """An infrastructure container of one node (the proxy): host network, bind mounts."""

    role: str
    node: str
    name: str
    image: str
    command: tuple[str, ...] = ()
    binds: tuple[tuple[str, str, str], ...] = ()  # (host path, container path, "ro" | "rw")
    env: tuple[tuple[str, str], ...] = ()
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InfraInfo:
    id: str
    name: str
    image: str
    state: str
    started_at: str
    labels: dict[str, str]
    # Bind mounts as (host path, container path): which data dir the container serves.
    mounts: tuple[tuple[str, str], ...] = ()

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def node(self) -> str:
        return self.labels.get(LABEL_NODE, "")


def _wrap(exc: Exception) -> Exception:
    if isinstance(exc, docker.errors.NotFound | docker.errors.ImageNotFound):
        return NotFound(_explain(exc))
    if isinstance(exc, docker.errors.APIError):
        if exc.status_code == 409:
            return Conflict(_explain(exc))
        return EngineCallFailed(f"docker engine: {_explain(exc)}")
    if isinstance(exc, requests.RequestException | docker.errors.DockerException | OSError):
        return EngineUnavailable(f"docker engine unreachable: {exc}")
    return exc


def _explain(exc: Exception) -> str:
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc)


class DockerRuntime:
    def __init__(self, base_url: str = "unix:///var/run/docker.sock", timeout: float = 30.0) -> None:
        self.base_url = base_url
        self._api = docker.APIClient(base_url=base_url, version=API_VERSION, timeout=int(timeout))

    def close(self) -> None:
        self._api.close()

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # mapped to this module's three errors
            raise _wrap(exc) from exc

    # -- the engine ----------------------------------------------------------------------

    def ping(self) -> None:
        self._call(self._api.ping)

    def version(self) -> str:
        return str(self._call(self._api.version).get("Version", "unknown"))

    # -- images --------------------------------------------------------------------------

    def image_exists(self, ref: str) -> bool:
        try:
            self._call(self._api.inspect_image, ref)
        except NotFound:
            return False
        return True

    def pull_image(self, ref: str) -> None:
        """``docker pull`` of a reference naming its registry, with the agent's Docker client
        credentials; raises RuntimeError when the engine reports an error."""
        repository, tag = docker.utils.parse_repository_tag(ref)
        for msg in self._call(self._api.pull, repository, tag=tag, stream=True, decode=True):
            if isinstance(msg, dict) and msg.get("error"):
                raise RuntimeError(f"docker pull {ref}: {str(msg['error']).strip()}")

    # -- containers ----------------------------------------------------------------------

    def list_managed(self, node_id: str, app: str | None = None) -> list[ContainerInfo]:
        """Every container (any state) labelled as pleaco's and as this node's."""
        labels = [f"{LABEL_NODE}={node_id}", LABEL_APP, LABEL_RELEASE, LABEL_REPLICA]
        if app is not None:
            labels.append(f"{LABEL_APP}={app}")
        rows = self._call(self._api.containers, all=True, filters={"label": labels})
        out = []
        for row in rows:
            info = _parse_row(row)
            if info is not None and info.node == node_id:
                out.append(info)
        return out

    def run(self, spec: RunSpec) -> str:
        """Create and start a replica's container; returns its id.

        Raises Conflict when a container of that name exists, NotFound when the image is
        missing. Docker's restart policy stays "no": pleaco decides about restarts.
        """
        cid = self._create(spec)
        self._call(self._api.start, cid)
        return cid

    def _create(self, spec: RunSpec) -> str:
        """Create (not start) the container ``spec`` describes, named and labelled by it:
        one recipe for replicas and jobs (JobSpec), so a job runs as a replica does."""
        ports = [spec.port] if spec.port else None
        for volume, _ in spec.volumes:
            self.ensure_volume(spec.app, volume, spec.node)
        volume_binds = [f"{volume_name(spec.app, v, spec.node)}:{path}:rw" for v, path in spec.volumes]
        host_config = self._api.create_host_config(
            port_bindings={spec.port: (spec.publish_host, None)} if spec.port and spec.publish else None,
            network_mode=spec.network or None,
            restart_policy={"Name": "no"},
            log_config={"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
            # tini as PID 1: forwards SIGTERM to the app (so stops are quick) and reaps zombies.
            init=True,
            mem_limit=spec.memory,
            # Equal to the memory limit: no swap on top of it (Docker's default allows as
            # much swap again), so a replica over its limit is OOM-killed, not slowed down.
            memswap_limit=spec.memory,
            nano_cpus=spec.nano_cpus,
            pids_limit=spec.pids,
            binds=[f"{src}:{dst}:{mode}" for src, dst, mode in spec.binds] + volume_binds or None,
            dns=list(spec.dns) or None,
            dns_search=list(spec.dns_search) or None,
        )
        created = self._call(
            self._api.create_container,
            spec.image,
            name=spec.name,
            labels=spec.labels(),
            environment=spec.env or None,
            command=None if spec.command is None else list(spec.command),
            entrypoint=None if spec.entrypoint is None else list(spec.entrypoint),
            healthcheck=spec.healthcheck,
            ports=ports,
            host_config=host_config,
            networking_config=self._api.create_networking_config(
                {spec.network: self._api.create_endpoint_config()}) if spec.network else None,
            detach=True,
        )
        return str(created["Id"])

    # -- named volumes (pleaco.stacks.volumes) -------------------------------------------

    def ensure_volume(self, app: str, volume: str, node_id: str) -> str:
        """Make the app's volume on this engine, labelled, unless it exists; its name."""
        name = volume_name(app, volume, node_id)
        try:
            self._call(self._api.inspect_volume, name)
        except NotFound:
            self._call(self._api.create_volume, name,
                       labels={LABEL_APP: app, LABEL_VOLUME: volume, LABEL_NODE: node_id})
        return name

    def volume_exists(self, app: str, volume: str, node_id: str) -> bool:
        try:
            self._call(self._api.inspect_volume, volume_name(app, volume, node_id))
        except NotFound:
            return False
        return True

    def remove_volume(self, app: str, volume: str, node_id: str) -> None:
        """Remove the app's volume (gone already: done); Conflict while a container uses it."""
        with contextlib.suppress(NotFound):
            self._call(self._api.remove_volume, volume_name(app, volume, node_id))

    def create_volume_helper(self, image: str, app: str, volume: str, node_id: str,
                             command: tuple[str, ...] = ()) -> str:
        """Create (not start) a short-lived container with the volume at /v, to copy its
        content out or in (``get_archive``, ``put_archive``); labelled by its role, never with
        the four app labels, so the app loop never takes it for a replica. Its id;
        ``remove_volume_helper`` ends it."""
        host_config = self._api.create_host_config(binds=[f"{volume_name(app, volume, node_id)}:/v:rw"],
                                                   network_mode="none")
        created = self._call(self._api.create_container, image, command=list(command) or None,
                             labels={LABEL_ROLE: ROLE_VOLUME_HELPER, LABEL_NODE: node_id, LABEL_VOLUME: volume,
                                     LABEL_JOB_APP: app},
                             host_config=host_config, detach=True)
        return str(created["Id"])

    def run_volume_helper(self, container_id: str) -> int:
        """Start the helper and wait for its command to end; its exit code."""
        self._call(self._api.start, container_id)
        return int(self._call(self._api.wait, container_id, timeout=None).get("StatusCode", -1))

    def get_archive(self, container_id: str, path: str) -> Iterator[bytes]:
        """A tar stream of ``path`` in the container (``path/.``: entries relative to it)."""
        stream, _ = self._call(self._api.get_archive, container_id, path)
        return iter(stream)

    def put_archive(self, container_id: str, path: str, data: Any) -> None:
        """Extract a tar (bytes, or an iterator of chunks, streamed) into ``path``."""
        if not self._call(self._api.put_archive, container_id, path, data):
            raise EngineCallFailed(f"docker engine refused the archive for {path}")

    def list_volume_helpers(self, node_id: str) -> list[str]:
        """The ids of this node's helpers (any state): those an earlier life of the agent left."""
        rows = self._call(self._api.containers, all=True,
                          filters={"label": [f"{LABEL_ROLE}={ROLE_VOLUME_HELPER}", f"{LABEL_NODE}={node_id}"]})
        return [str(r["Id"]) for r in rows if (r.get("Labels") or {}).get(LABEL_NODE) == node_id]

    def remove_volume_helper(self, container_id: str) -> None:
        with contextlib.suppress(NotFound):
            self._call(self._api.remove_container, container_id, force=True)

    # -- networks --------------------------------------------------------------------------

    def find_network(self, name: str) -> NetworkInfo | None:
        """The network of that exact name (Docker's lookup also matches id prefixes)."""
        try:
            raw = self._call(self._api.inspect_network, name)
        except NotFound:
            return None
        info = _parse_network(raw)
        return info if info.name == name else None

    def network_subnets(self) -> list[tuple[str, str]]:
        """Every network's (name, subnet) on this engine, one pair per IPAM subnet."""
        return [(str(raw.get("Name", "")), str(cfg["Subnet"])) for raw in self._call(self._api.networks)
                for cfg in ((raw.get("IPAM") or {}).get("Config") or []) if cfg.get("Subnet")]

    def create_network(self, spec: NetworkSpec) -> str:
        """Create a bridge network with its own Linux bridge; returns its id. Conflict when
        one of that name exists; EngineCallFailed when the engine refuses (its subnet
        overlaps another network's)."""
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=spec.subnet,
                                                                           gateway=spec.gateway)])
        created = self._call(self._api.create_network, spec.name, driver="bridge", ipam=ipam,
                             check_duplicate=True, labels=spec.labels or None,
                             options={"com.docker.network.bridge.name": spec.bridge})
        return str(created["Id"])

    def connect_network(self, network: str, container_id: str, node_id: str) -> None:
        """Connect one of ``node_id``'s replicas to a network as well (PermissionError for
        another's); no-op when it is on it already."""
        info = self._inspect_owned(container_id, node_id)
        if network in ((info.get("NetworkSettings") or {}).get("Networks") or {}):
            return
        self._call(self._api.connect_container_to_network, container_id, network)

    def remove_network(self, name: str) -> None:
        """Remove a network (no-op when it is gone); Conflict or EngineCallFailed while
        containers are attached to it."""
        try:
            self._call(self._api.remove_network, name)
        except NotFound:
            return

    def start(self, container_id: str) -> None:
        self._call(self._api.start, container_id)

    def exit_info(self, container_id: str) -> ExitInfo:
        """Why the container stopped (``docker ps`` rows do not say it was OOM-killed)."""
        state = self._call(self._api.inspect_container, container_id).get("State") or {}
        code = state.get("ExitCode")
        return ExitInfo(exit_code=int(code) if code is not None else None,
                        oom_killed=bool(state.get("OOMKilled")), error=str(state.get("Error") or ""))

    def _inspect_owned(self, container_id: str, node_id: str) -> dict[str, Any]:
        """Inspect a container, refusing one that is not this node's pleaco container."""
        info: dict[str, Any] = self._call(self._api.inspect_container, container_id)
        labels = (info.get("Config") or {}).get("Labels") or {}
        if any(name not in labels for name in MANAGED_LABELS) or labels[LABEL_NODE] != node_id:
            raise PermissionError(f"container {container_id[:12]} is not managed by node {node_id}")
        return info

    def stop(self, container_id: str, node_id: str, stop_timeout: int = 10) -> None:
        """Stop (not remove) one of this node's containers."""
        self._inspect_owned(container_id, node_id)
        self._call(self._api.stop, container_id, timeout=stop_timeout)

    def remove(self, container_id: str, node_id: str, stop_timeout: int = 10) -> None:
        """Stop and remove a container, after checking it is this node's pleaco container."""
        info = self._inspect_owned(container_id, node_id)
        try:
            if info.get("State", {}).get("Running"):
                self._call(self._api.stop, container_id, timeout=stop_timeout)
            self._call(self._api.remove_container, container_id, force=True)
        except NotFound:
            pass  # already gone: the goal is reached

    def save_image(self, ref: str) -> Iterator[bytes]:
        """The image as a ``docker save`` tar stream, in chunks."""
        stream = self._call(self._api.get_image, ref, chunk_size=1 << 20)
        return stream  # type: ignore[no-any-return]

    def load_image(self, chunks: Iterator[bytes]) -> None:
        """``docker load`` from a tar stream; raises RuntimeError when the engine refuses it."""
        for line in self._call(self._api.load_image, chunks):
            if isinstance(line, dict) and line.get("error"):
                raise RuntimeError(f"docker load: {line['error']}")

    def logs(self, container_id: str, tail: int | str = "all", follow: bool = False) -> Iterator[bytes]:
        """The container's output; with ``follow`` an endless stream (close() it to stop)."""
        stream = self._call(
            self._api.logs, container_id, stream=True, follow=follow, tail=tail, timestamps=False
        )
        return stream  # type: ignore[no-any-return]


    # -- infrastructure containers (the proxy) ---------------------------------------------
    # They carry ``pleaco.role`` and ``pleaco.node`` but not the four app labels, so
    # list_managed and _inspect_owned (the app reconciler's only doors) never see them.

    def find_infra(self, node_id: str, role: str) -> InfraInfo | None:
        """This node's container of that role, in any state (the newest if several)."""
        rows = self._call(
            self._api.containers, all=True, filters={"label": [f"{LABEL_ROLE}={role}", f"{LABEL_NODE}={node_id}"]}
        )
        rows = [r for r in rows if (r.get("Labels") or {}).get(LABEL_NODE) == node_id]
        if not rows:
            return None
        row = max(rows, key=lambda r: int(r.get("Created", 0)))
        info = self._call(self._api.inspect_container, row["Id"])
        state = info.get("State") or {}
        return InfraInfo(
            id=str(info["Id"]),
            name=str(info.get("Name", "")).lstrip("/"),
            image=str((info.get("Config") or {}).get("Image", "")),
            state=str(state.get("Status", "unknown")),
            started_at=str(state.get("StartedAt", "")),
            labels=dict((info.get("Config") or {}).get("Labels") or {}),
            mounts=tuple((str(m.get("Source", "")), str(m.get("Destination", "")))
                         for m in info.get("Mounts") or []),
        )

    def list_infra(self, role: str) -> list[InfraInfo]:
        """Every node's containers of that role on this engine, in any state (one list
        call, no inspect: ``started_at`` is empty). Several agents may share an engine, so
        callers decide by the labels and mounts which of them are theirs to touch."""
        rows = self._call(self._api.containers, all=True, filters={"label": [f"{LABEL_ROLE}={role}", LABEL_NODE]})
        return [
            InfraInfo(
                id=str(row["Id"]),
                name=str((row.get("Names") or ["/"])[0]).lstrip("/"),
                image=str(row.get("Image", "")),
                state=str(row.get("State", "unknown")),
                started_at="",
                labels=dict(row.get("Labels") or {}),
                mounts=tuple((str(m.get("Source", "")), str(m.get("Destination", "")))
                             for m in row.get("Mounts") or []),
            )
            for row in rows
            if (row.get("Labels") or {}).get(LABEL_ROLE) == role
        ]

    def run_infra(self, spec: InfraSpec) -> str:
        """Create and start an infrastructure container (host network); returns its id."""
        host_config = self._api.create_host_config(
            network_mode="host",
            binds=[f"{src}:{dst}:{mode}" for src, dst, mode in spec.binds],
            # The agent restarts it too, but the engine's policy keeps traffic flowing
            # while the agent itself is down or restarting.
            restart_policy={"Name": "unless-stopped"},
            log_config={"Type": "json-file", "Config": {"max-size": "10m", "max-file": "3"}},
        )
        created = self._call(
            self._api.create_container,
            spec.image,
            name=spec.name,
            command=list(spec.command) or None,
            labels={LABEL_ROLE: spec.role, LABEL_NODE: spec.node, **spec.labels},
            environment=dict(spec.env) or None,
            host_config=host_config,
            detach=True,
        )
        cid = str(created["Id"])
        self._call(self._api.start, cid)
        return cid

    def remove_infra(self, container_id: str, node_id: str, role: str) -> None:
        """Remove one of this node's infrastructure containers (checked by its labels)."""
        info = self._call(self._api.inspect_container, container_id)
        labels = (info.get("Config") or {}).get("Labels") or {}
        if labels.get(LABEL_ROLE) != role or labels.get(LABEL_NODE) != node_id:
            raise PermissionError(f"container {container_id[:12]} is not node {node_id}'s {role}")
        try:
            self._call(self._api.remove_container, container_id, force=True)
        except NotFound:
            return  # already gone: the goal is reached

    # -- one-off jobs (``pleaco run``) ----------------------------------------------------
    # Labelled ROLE_JOB, never with the four app labels: list_managed never sees them.

    def run_job(self, spec: JobSpec) -> str:
        """Create and start a job's container (no ports, no restarts); returns its id."""
        cid = self._create(spec)
        try:
            self._call(self._api.start, cid)
        except EngineError:
            # Not left behind: a job that did not start is nobody's to remove later.
            self._call(self._api.remove_container, cid, force=True)
            raise
        return cid

    def wait_job(self, container_id: str) -> int:
        """Block until the job's container exits; its exit code."""
        result = self._call(self._api.wait, container_id, timeout=None)
        return int(result.get("StatusCode", -1))

    def list_jobs(self, node_id: str) -> list[str]:
        """The ids of this node's job containers, in any state."""
        rows = self._call(self._api.containers, all=True,
                          filters={"label": [f"{LABEL_ROLE}={ROLE_JOB}", f"{LABEL_NODE}={node_id}"]})
        return [str(r["Id"]) for r in rows if (r.get("Labels") or {}).get(LABEL_NODE) == node_id]

    def remove_job(self, container_id: str, node_id: str) -> None:
        """Remove (killing it if it runs) one of this node's job containers."""
        try:
            info = self._call(self._api.inspect_container, container_id)
        except NotFound:
            return
        labels = (info.get("Config") or {}).get("Labels") or {}
        if labels.get(LABEL_ROLE) != ROLE_JOB or labels.get(LABEL_NODE) != node_id:
            raise PermissionError(f"container {container_id[:12]} is not a job of node {node_id}")
        with contextlib.suppress(NotFound):  # already gone: the goal is reached
            self._call(self._api.remove_container, container_id, force=True)

    # -- exec into a replica (``pleaco apps exec``) ---------------------------------------

    def exec_start(self, container_id: str, node_id: str, command: tuple[str, ...], tty: bool) -> ExecSession:
        """Start ``command`` in one of ``node_id``'s running replicas (PermissionError for
        another's), with its standard input open and, with ``tty``, a terminal."""
        self._inspect_owned(container_id, node_id)
        created = self._call(self._api.exec_create, container_id, list(command), stdin=True, tty=tty,
                             stdout=True, stderr=True)
        exec_id = str(created["Id"])
        raw = self._call(self._api.exec_start, exec_id, tty=tty, socket=True)
        return ExecSession(self, exec_id, raw, tty)

    def _exec_resize(self, exec_id: str, rows: int, cols: int) -> None:
        self._call(self._api.exec_resize, exec_id, height=rows, width=cols)

    def _exec_inspect(self, exec_id: str) -> dict[str, Any]:
        return self._call(self._api.exec_inspect, exec_id)  # type: ignore[no-any-return]

    def _exec_exit_code(self, exec_id: str) -> int | None:
        info = self._exec_inspect(exec_id)
        code = info.get("ExitCode")
        return None if code is None or info.get("Running") else int(code)


class ExecSession:
    """A command running in a container through the engine's exec API: its standard input,
    its output (stdout and stderr merged, as a terminal shows them), its window size and, at
    the end, its exit code. Blocking calls; ``read`` and ``write`` may run in two threads."""

    def __init__(self, runtime: DockerRuntime, exec_id: str, raw: Any, tty: bool) -> None:
        self._runtime = runtime
        self.exec_id = exec_id
        self.tty = tty
        self._raw = raw  # the engine's hijacked connection (a socket.SocketIO over the socket)
        self._sock: socket.socket = raw._sock
        # The client's timeout is for API calls; a session may sit idle as long as its user does.
        self._sock.settimeout(None)
        self._running = False

    def _read_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                return b""
            buf += chunk
        return buf

    def read(self) -> bytes:
        """The next output; b"" once the command's output ended."""
        try:
            if self.tty:
                return self._sock.recv(1 << 15)
            # Without a terminal the engine frames each chunk: stream (1 byte), 3 zero bytes,
            # the length (4 bytes, big-endian).
            while True:
                header = self._read_exact(8)
                if not header:
                    return b""
                size = struct.unpack(">BxxxL", header)[1]
                if size:
                    return self._read_exact(size)
        except OSError:
            return b""  # closed under us (close()): the end

    def write(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise EngineUnavailable(f"exec {self.exec_id[:12]}: its input is closed: {exc}") from exc

    def close_input(self) -> None:
        """End of the command's standard input (it reads EOF); its output keeps coming."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def resize(self, rows: int, cols: int) -> bool:
        """Set the terminal's size; False when the engine would not (the command ended).
        The engine applies a size only once the command runs: just after the start it
        says "stopped", or takes the size and starts the command at 24x80. So the first
        resize waits (up to RESIZE_WAIT) for the engine to report it running, as ``docker
        exec`` retries its own."""
        if not self.tty:
            return False
        deadline = time.monotonic() + RESIZE_WAIT
        while not self._running:
            self._running = bool(self._runtime._exec_inspect(self.exec_id).get("Running"))
            if self._running or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        try:
            self._runtime._exec_resize(self.exec_id, rows, cols)
        except EngineCallFailed:
            return False
        return True

    def exit_code(self) -> int | None:
        """The command's exit code; None while it runs."""
        return self._runtime._exec_exit_code(self.exec_id)

    def close(self) -> None:
        """Hang up: the engine closes the command's input (and, with a terminal, its
        terminal, which ends a shell). A command that ignores both runs on; the engine's exec
        API has no kill."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._raw.close()
        with contextlib.suppress(OSError):
            self._sock.close()


def _parse_network(raw: dict[str, Any]) -> NetworkInfo:
    return NetworkInfo(
        id=str(raw.get("Id", "")),
        name=str(raw.get("Name", "")),
        driver=str(raw.get("Driver", "")),
        subnets=tuple(str(c["Subnet"]) for c in ((raw.get("IPAM") or {}).get("Config") or []) if c.get("Subnet")),
        bridge=str((raw.get("Options") or {}).get("com.docker.network.bridge.name", "")),
        labels=dict(raw.get("Labels") or {}),
        containers=tuple((raw.get("Containers") or {}).keys()),
    )


def _parse_row(row: dict[str, Any]) -> ContainerInfo | None:
    labels = row.get("Labels") or {}
    try:
        release = int(labels[LABEL_RELEASE])
        replica = int(labels[LABEL_REPLICA])
        app, node = labels[LABEL_APP], labels[LABEL_NODE]
    except (KeyError, ValueError):
        return None  # not a container pleaco made; never touch it
    status = row.get("Status") or ""
    m = _EXIT_CODE.search(status)
    host_port, host_ip = None, ""
    for p in row.get("Ports") or []:
        if p.get("PublicPort"):
            host_port, host_ip = int(p["PublicPort"]), str(p.get("IP") or "")
            break
    names = row.get("Names") or ["/"]
    addresses = tuple((str(name), str(n["IPAddress"]))
                      for name, n in ((row.get("NetworkSettings") or {}).get("Networks") or {}).items()
                      if n.get("IPAddress"))
    addressed = addresses[0] if addresses else None
    return ContainerInfo(
        id=row["Id"],
        name=names[0].lstrip("/"),
        app=app,
        node=node,
        release=release,
        replica=replica,
        state=row.get("State", "unknown"),
        exit_code=int(m.group(1)) if m else None,
        image=row.get("Image", ""),
        host_port=host_port,
        created=int(row.get("Created", 0)),
        ip=addressed[1] if addressed else "",
        host_ip=host_ip,
        network=addressed[0] if addressed else "",
        addresses=addresses,
        health=_health_of(status),
    )


def _health_of(status: str) -> str:
    """The healthcheck verdict in a listing's status: "Up 3 seconds (health: starting)",
    "Up 2 minutes (healthy)", "Up 1 minute (unhealthy)"."""
    if status.endswith("(healthy)"):
        return "healthy"
    if status.endswith("(unhealthy)"):
        return "unhealthy"
    if status.endswith("(health: starting)"):
        return "starting"
    return ""
