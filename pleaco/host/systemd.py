"""The agent's side of systemd: readiness, status, the watchdog, and Docker's unit.

- **Notify** (``sd_notify(3)``'s protocol, no library): a datagram of ``KEY=value`` lines
  to the socket in ``$NOTIFY_SOCKET`` (a path, or an abstract address written ``@name``).
  Without it (a terminal, a test) every call is a no-op. ``READY=1`` once the API answers
  and the loops run (``Type=notify``: ``systemctl start`` returns then), ``STOPPING=1`` on
  stop, and a ``STATUS=`` line (``3 apps, 5 replicas, cluster of 2``) refreshed every
  ``STATUS_REFRESH`` seconds, shown by ``systemctl status``.
- **Watchdog**: with ``WatchdogSec=`` set, systemd passes ``$WATCHDOG_USEC`` and expects
  ``WATCHDOG=1`` at least that often. ``Supervision`` pings at half of it from a task on
  the agent's event loop, so a blocked event loop stops the pings by itself, and it
  withholds them while a reconcile loop is stuck (a step running longer than
  ``loop_stuck_after``): systemd then kills and restarts the agent, and the app containers
  run on meanwhile (they are Docker's).
- **Docker's unit**: when the engine does not answer at start and the agent runs as a
  systemd service, it asks systemd (over D-Bus, pystemd) to start ``docker.service``.

pystemd is imported inside the one function that uses it, so this module imports on
machines without systemd or libsystemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pleaco import logs

log = logs.get("pleaco.host.systemd")

# Seconds between STATUS refreshes: `systemctl status` is read by a person, a few seconds
# stale is current enough, and each refresh is one datagram.
STATUS_REFRESH = 5.0
DOCKER_UNIT = "docker.service"
# The engine addresses docker.service serves: starting it cannot help an agent pointed
# at another engine (a test's, a remote one).
DOCKER_UNIT_URLS = frozenset({"unix:///var/run/docker.sock", "unix:///run/docker.sock"})


class NotifyAddressError(ValueError):
    """$NOTIFY_SOCKET names an address this module cannot send to."""


def notify_address(value: str) -> str | None:
    """The AF_UNIX address in a ``$NOTIFY_SOCKET`` value: a path, or ``@name`` for an
    abstract socket (returned with its leading NUL); None when unset or empty."""
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    # systemd 254+ may also pass vsock:CID:PORT (a VM's manager); the agent runs on the host.
    raise NotifyAddressError(f"NOTIFY_SOCKET={value!r}: expected an absolute path or an @abstract name")


def notify_message(fields: Mapping[str, str | int]) -> bytes:
    """``KEY=value`` lines, in order. A value is one line (systemd reads a line per field),
    so a newline in it (a STATUS built from data) becomes a space."""
    lines = []
    for key, value in fields.items():
        if not key or not key.replace("_", "").isalnum() or not key.isupper():
            raise ValueError(f"notify field {key!r}: expected an upper-case name")
        text = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{key}={text}")
    return ("\n".join(lines) + "\n").encode()


def status_line(apps: int, replicas: int, nodes: int) -> str:
    """The STATUS shown by ``systemctl status pleaco``."""
    return f"{apps} apps, {replicas} replicas, cluster of {nodes}"


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3)
    advises), or None when no watchdog is asked of this process: unset, malformed, or
    meant for another pid (``$WATCHDOG_PID`` is set for the service's main process only,
    and a child that inherited it must not ping for its parent)."""
    raw = env.get("WATCHDOG_USEC", "")
    if not raw.isdigit() or int(raw) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    return int(raw) / 1e6 / 2


def under_systemd_service(env: Mapping[str, str]) -> bool:
    """Whether this process is a systemd service's (systemd sets INVOCATION_ID for it)."""
    return bool(env.get("INVOCATION_ID"))


class Notifier:
    """Sends notify messages to systemd; a no-op when ``$NOTIFY_SOCKET`` is unset."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        try:
            self.address = notify_address(env.get("NOTIFY_SOCKET", ""))
        except NotifyAddressError as exc:
            log.warning("systemd.notify_unsupported", error=str(exc))
            self.address = None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one message; False when there is no socket or it could not be sent
        (logged once: systemd's own timeouts report what the missing message causes)."""
        if self.address is None:
            return False
        msg = notify_message(fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(msg, self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("systemd.notify_failed", error=str(exc), fields=",".join(fields))
                self._failed = True
            return False
        self._failed = False
        return True


@dataclass(frozen=True)
class Tick:
    """What one pass of ``Supervision`` did, for its log and its tests."""

    pinged: bool
    withheld: tuple[str, ...]  # the stuck loops the watchdog ping was withheld for
    status: str


class Supervision:
    """READY, STATUS and the watchdog for the agent's life (see the module doc).

    ``status`` makes the STATUS text; ``stuck(now)`` names the stuck loops (the
    LoopRunner's, bound by the agent, which also holds the bound)."""

    def __init__(self, notifier: Notifier, status: Callable[[], str], stuck: Callable[[float], list[str]],
                 env: Mapping[str, str] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        env = os.environ if env is None else env
        self.notifier = notifier
        self.status = status
        self.stuck = stuck
        self.clock = clock
        self.ping_every = watchdog_interval(env, os.getpid()) if notifier.enabled else None
        self._withheld: tuple[str, ...] = ()
        self._last_status = ""
        self._task: asyncio.Task[None] | None = None

    def tick(self) -> Tick:
        """One pass: refresh STATUS if it changed, ping the watchdog unless a loop is stuck."""
        text = self._status_text()
        fields: dict[str, str | int] = {}
        if text != self._last_status:
            fields["STATUS"] = text
        stuck = tuple(self.stuck(self.clock())) if self.ping_every is not None else ()
        if stuck != self._withheld:
            if stuck:
                log.error("systemd.watchdog_withheld", loop=",".join(stuck))
            else:
                log.info("systemd.watchdog_resumed", loop=",".join(self._withheld))
            self._withheld = stuck
        pinged = self.ping_every is not None and not stuck
        if pinged:
            fields["WATCHDOG"] = 1
        if fields and self.notifier.send(**fields):
            self._last_status = text
        return Tick(pinged, stuck, text)

    def ready(self) -> None:
        """The API answers and the loops run: tell systemd, with the first STATUS."""
        text = self._status_text()
        if self.notifier.send(READY=1, STATUS=text):
            self._last_status = text
            log.info("systemd.ready", status=text, watchdog_s=self.ping_every or 0)

    def start(self) -> None:
        if self.notifier.enabled:
            self._task = asyncio.create_task(self._run(), name="systemd supervision")

    async def stop(self) -> None:
        """STOPPING=1 first (systemd then knows the exit is on purpose), then no more pings."""
        self.notifier.send(STOPPING=1, STATUS="stopping")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        every = min(STATUS_REFRESH, self.ping_every or STATUS_REFRESH)
        while True:
            try:
                self.tick()
            except Exception:  # a STATUS source failing must not stop the pings' task for good
                log.error("systemd.tick_failed", exc_info=True)
            await asyncio.sleep(every)

    def _status_text(self) -> str:
        try:
            return self.status()
        except Exception as exc:
            return f"status unavailable: {type(exc).__name__}"


def start_docker_unit() -> str:
    """Ask systemd to start docker.service (StartUnit, mode "replace"); returns the job's
    D-Bus path. Raises whatever pystemd raises (no bus, no such unit, access denied)."""
    from pystemd.systemd1 import Manager  # here: machines without libsystemd import this module

    with Manager() as manager:
        job = manager.Manager.StartUnit(DOCKER_UNIT.encode(), b"replace")
    return job.decode() if isinstance(job, bytes) else str(job)


def ensure_docker(ping: Callable[[], object], docker_url: str, env: Mapping[str, str] | None = None,
                  start_unit: Callable[[], str] = start_docker_unit) -> str:
    """At start: when the engine does not answer, the engine is docker.service's, and the
    agent is a systemd service, ask systemd to start docker.service. Returns what was done
    (``up``, ``not_systemd``, ``other_engine``, ``started``, ``start_failed``), logged.
    The loops report the engine until it answers; this only asks once."""
    env = os.environ if env is None else env
    try:
        ping()
        return "up"
    except Exception as exc:
        error = str(exc)
    if docker_url not in DOCKER_UNIT_URLS:
        log.warning("systemd.docker_down", docker=docker_url, error=error, action="none: not docker.service's engine")
        return "other_engine"
    if not under_systemd_service(env):
        log.warning("systemd.docker_down", docker=docker_url, error=error, action="none: not a systemd service")
        return "not_systemd"
    try:
        job = start_unit()
    except Exception as exc:  # pystemd's D-Bus errors have no common base outside pystemd
        log.error("systemd.docker_start_failed", unit=DOCKER_UNIT, error=f"{type(exc).__name__}: {exc}")
        return "start_failed"
    log.warning("systemd.docker_started", unit=DOCKER_UNIT, job=job, error=error)
    return "started"
