"""One agent per address on a host: the addresses each running agent listens on, host-wide.

Agents that share a host and its engine (the tests and benchmarks run several; an operator
may run a second by mistake) must not share an API, gossip or proxy address, nor the
proxy's admin address. Most clashes would surface as a bind error, but not all: Caddy binds
with SO_REUSEPORT, so two proxies hold one port (and one admin address) without an error
and split the traffic between two configurations. So each agent, before it binds anything,
records what it will listen on in ``DIRECTORY/PID.json`` and refuses to start when a live
agent in the same network namespace already holds an overlapping address, naming that
agent (pid, data dir).

Entries of dead processes are ignored and removed (an agent killed with -9 leaves its file;
a reused pid is told apart by the process's start time). Agents in other network namespaces
never clash: each namespace has its own ports. Claims are made under an flock on the
directory's lock file, so two agents starting at once cannot both win.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from pleaco import logs
from pleaco.errors import Conflict
from pleaco.hostport import HostPortError, split

log = logs.get("pleaco.host.addresses")

# Host-wide and cleared at boot (a tmpfs), like the pids the entries name. Overridable
# (env PLEACO_AGENTS_DIR) for a host without a writable /run.
DIRECTORY = Path(os.environ.get("PLEACO_AGENTS_DIR", "/run/pleaco/agents"))
LOCK_FILE = ".lock"


class AddressInUse(Conflict, RuntimeError, code="address_in_use"):
    """Another agent on this host holds one of this agent's addresses."""


@dataclass(frozen=True)
class Listener:
    """One address an agent listens on: ``role`` says what for (``api``, ``gossip``, ...)."""

    role: str
    address: str  # HOST:PORT

    def overlaps(self, other: Listener) -> bool:
        """Whether both cannot be bound at once (or would be, silently, with SO_REUSEPORT)."""
        try:
            host, port = split(self.address)
            other_host, other_port = split(other.address)
        except HostPortError:
            return False
        if port != other_port:
            return False
        return _wildcard(host) or _wildcard(other_host) or _canonical(host) == _canonical(other_host)


def _wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::", "*")


def _canonical(host: str) -> str:
    if host == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


@dataclass(frozen=True)
class AgentEntry:
    """What the registry holds of one running agent."""

    pid: int
    started: str  # the process's start time in clock ticks since boot: tells a reused pid apart
    netns: str
    data_dir: str
    listeners: tuple[Listener, ...]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> AgentEntry:
        raw = json.loads(text)
        return cls(pid=int(raw["pid"]), started=str(raw["started"]), netns=str(raw["netns"]),
                   data_dir=str(raw["data_dir"]),
                   listeners=tuple(Listener(str(x["role"]), str(x["address"])) for x in raw["listeners"]))

    def alive(self) -> bool:
        return _start_time(self.pid) == self.started


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return stat.rsplit(")", 1)[1].split()[19]


def _netns() -> str:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return "unknown"


class AddressRegistry:
    def __init__(self, directory: Path = DIRECTORY) -> None:
        self.directory = directory
        self._path: Path | None = None

    def claim(self, listeners: list[Listener], data_dir: Path) -> None:
        """Record this agent's listeners, or raise AddressInUse naming the agent that holds one."""
        pid = os.getpid()
        me = AgentEntry(pid, _start_time(pid) or "", _netns(), str(data_dir), tuple(listeners))
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        with self._locked():
            for other in self._entries():
                if other.pid == pid or other.netns != me.netns:
                    continue
                for mine in listeners:
                    for theirs in other.listeners:
                        if mine.overlaps(theirs):
                            raise AddressInUse(
                                f"{mine.role} address {mine.address} is in use by another agent on this host "
                                f"(pid {other.pid}, data dir {other.data_dir}, its {theirs.role} on "
                                f"{theirs.address}); stop it first, or give this agent its own address")
            path = self.directory / f"{pid}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(me.to_json())
            os.replace(tmp, path)
            self._path = path

    def release(self) -> None:
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
            self._path = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _entries(self) -> Iterator[AgentEntry]:
        """Live agents' entries; dead ones' files are removed on the way."""
        for path in self.directory.glob("*.json"):
            try:
                entry = AgentEntry.from_json(path.read_text())
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("agents.entry_unreadable", path=str(path))
                continue
            if entry.alive():
                yield entry
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
