"""One node's upgrade: verify, install into a slot, switch, restart, and a trial that rolls
back by itself unless the new version proves healthy.

The state is ``DATA_DIR/upgrade.json`` (``TrialState``; written atomically and fsynced,
read-modify-written under ``DATA_DIR/upgrade.lock``), through these phases:

    installing -> trial -> confirmed
         |          '----> rolled_back   (the guard, or the new agent, with the reason)
         '-> failed                      (refused install, or interrupted before the switch)

``LocalUpgrade`` (made by the agent, one per agent) does all of it:

- ``begin(bundle)`` runs in the OLD agent (blocking: call it in a worker thread). It
  verifies the bundle (nothing changes on a refusal), installs it into its slot, records the
  trial (the app containers running here, whether the node had peers, the agent's argv),
  starts the GUARD, flips ``current`` and restarts the agent into the new slot: under
  systemd by restarting pleaco.service, otherwise by the agent stopping cleanly and
  exec'ing the new slot's Python with the same arguments.
- The GUARD (``pleaco release guard``, hidden; ``run_guard``) is a detached process of the
  OLD slot, so it works when the new version cannot run at all. It exits once the trial is
  decided; at the deadline, or when no agent has held the data dir lock for
  ``[upgrade] agent_gone_grace``, it records ``rolled_back`` with the reason, stops the new agent,
  flips ``current`` back and starts the old one.
- ``recover()`` runs in EVERY agent at start, before anything else: an interrupted upgrade
  is resolved (``installing``: the switch never happened, so ``failed``; a ``trial`` of
  another version than the one running: ``failed``, ``current`` put back to it; a
  ``rolled_back`` whose guard died before it switched back: finished here).
- ``confirm()`` runs in the NEW agent: once its API answers, it has rejoined its cluster (if
  it had peers) and every recorded app container is still running with the same id, the
  phase becomes ``confirmed`` (and old slots are pruned). When the guard is dead it decides
  itself: a trial found past its deadline gets one more ``health_deadline`` from this start,
  and when that passes too it rolls back itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pleaco import __version__, hostport, logs
from pleaco.errors import Conflict, PleacoError
from pleaco.host.bundle import Manifest, verify_bundle
from pleaco.host.config import UpgradeSettings
from pleaco.host.datadir import LOCK_FILE
from pleaco.host.slots import Slots
from pleaco.identity import write_secret_file  # durable and atomic, 0600
from pleaco.runtime.engine import Engine

log = logs.get("pleaco.host.trial")

STATE_FILE = "upgrade.json"
STATE_LOCK = "upgrade.lock"
REQUEST_FILE = "upgrade.request"
REPLY_FILE = "upgrade.reply"
GUARD_LOG = "upgrade-guard.log"
RESPAWN_LOG = "agent-respawn.log"
OPEN_PHASES = ("installing", "trial")
# The unit systemd/pleaco.service installs; a restart of it starts ROOT/current/bin/pleaco.
UNIT = "pleaco.service"
# Seconds between the guard's and the confirmation's looks: a second of a deadline.
POLL = 0.5
# Seconds the guard gives a stopping agent (SIGTERM) before SIGKILL: the agent's own stop
# (loops, cluster leave, API, store) takes a few seconds; its containers keep running.
STOP_TIMEOUT = 30.0
# Seconds begin() waits for the guard to report in before it gives up (nothing switched).
GUARD_START_TIMEOUT = 30.0


class UpgradeError(PleacoError, RuntimeError, code="upgrade_failed"):
    """The upgrade could not be carried out on this node (install, snapshot, guard)."""


class UpgradeInProgress(Conflict, code="upgrade_in_progress"):
    """An upgrade of this node is already under way."""


class NoRollbackSlot(Conflict, code="no_rollback_slot"):
    """The running version has no slot: a failed upgrade would have nothing to go back to."""


@dataclass(frozen=True)
class TrialState:
    phase: str  # installing | trial | confirmed | rolled_back | failed
    from_version: str
    to_version: str
    reason: str = ""
    started: float = 0.0  # epoch seconds, when begin() accepted the bundle
    deadline: float = 0.0  # epoch seconds: the new version must be confirmed by then
    health_deadline: float = 0.0  # the seconds it was given ([upgrade] health_deadline), for the reason
    # [upgrade] agent_gone_grace, for the guard (its default for a trial recorded without it)
    agent_gone_grace: float = UpgradeSettings.agent_gone_grace
    containers: tuple[str, ...] = ()  # ids of the app containers running here before the restart
    peers: bool = False  # the node had other live cluster members before the restart
    argv: tuple[str, ...] = ()  # the agent's arguments (after the program name), to start it again
    root: str = ""  # the slots' root
    systemd: bool = False  # the agent ran under systemd: restarts go through the unit
    guard_pid: int = 0  # the guard's pid, written by the guard itself once it runs
    last_error: str = ""  # the new agent's latest health problem (for the rollback's reason)
    updated: float = 0.0

    @property
    def open(self) -> bool:
        return self.phase in OPEN_PHASES

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrialState:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in names}
        for key in ("containers", "argv"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)


# -- the state file -------------------------------------------------------------------

def read_state(data_dir: Path) -> TrialState | None:
    try:
        raw = json.loads((data_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UpgradeError(f"{data_dir / STATE_FILE} is unreadable: {exc}") from None
    return TrialState.from_dict(raw)


def write_state(data_dir: Path, state: TrialState) -> None:
    state = dataclasses.replace(state, updated=time.time())
    write_secret_file(data_dir / STATE_FILE, json.dumps(state.to_dict(), indent=1).encode() + b"\n")


@contextlib.contextmanager
def _state_lock(data_dir: Path) -> Iterator[None]:
    fd = os.open(data_dir / STATE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def transition(data_dir: Path, from_phases: Sequence[str], **changes: Any) -> TrialState | None:
    """Under the state lock: when the recorded phase is one of ``from_phases``, apply
    ``changes`` and answer the new state; otherwise change nothing and answer None. The
    guard and the agents decide through this, so one decision wins."""
    with _state_lock(data_dir):
        state = read_state(data_dir)
        if state is None or state.phase not in from_phases:
            return None
        new = dataclasses.replace(state, **changes)
        write_state(data_dir, new)
        return new


# -- processes ------------------------------------------------------------------------

def agent_pid(data_dir: Path) -> int | None:
    """The pid holding the data dir lock (the running agent), or None when none does.

    Read from /proc/locks, never by trying the lock: a probe that took it, even for an
    instant, could make a starting agent refuse the data dir."""
    try:
        st = os.stat(data_dir / LOCK_FILE)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    file_id = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        # "6: FLOCK  ADVISORY  WRITE 1234 fe:00:2146772 0 EOF"; a blocked waiter's line has
        # "->" after the number and holds nothing.
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == file_id:
            return int(fields[4])
    return None


def _alive(pid: int, marker: bytes) -> bool:
    """``pid`` runs and its command line holds ``marker`` (a zombie's is empty)."""
    if pid <= 0:
        return False
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def guard_alive(state: TrialState) -> bool:
    return _alive(state.guard_pid, b"guard")


def local_url(api_listen: str) -> str:
    """The URL this host reaches an API listening on ``api_listen`` at (a wildcard address
    is reached on loopback)."""
    host, port = hostport.split(api_listen)
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def under_systemd() -> bool:
    return "INVOCATION_ID" in os.environ  # set by systemd for every unit's processes


def _restart_unit() -> None:
    # Imported here: only under systemd, and pystemd needs the system bus.
    from pystemd.systemd1 import Unit

    unit = Unit(UNIT.encode(), _autoload=True)
    # A release whose agent crashed at every start has made systemd restart it until the
    # unit hit its start limit and failed; within StartLimitIntervalSec a restart job on
    # it would be refused.
    unit.Unit.ResetFailed()
    unit.Unit.Restart(b"replace")


def agent_command(slots: Slots, version: str, argv: Sequence[str]) -> list[str]:
    """The command line of an agent from ``version``'s slot. ``-I``: the slot's code only,
    never a PYTHONPATH or a working directory's ``pleaco``."""
    return [str(slots.python(version)), "-I", "-m", "pleaco", *argv]


def _without_pythonpath() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


# -- the agent's side -------------------------------------------------------------------

Restart = Callable[[list[str]], None]


class LocalUpgrade:
    """This node's upgrades, seen from an agent (see the module's doc)."""

    def __init__(self, data_dir: Path, settings: UpgradeSettings, *, node_id: str, engine: Engine,
                 live_nodes: Callable[[], list[str]], restart: Restart, argv: Sequence[str],
                 api_url: str = "", version: str = __version__) -> None:
        self.data_dir = data_dir
        self.settings = settings
        self.slots = Slots(settings.root)
        self.node_id = node_id
        self.engine = engine
        self.live_nodes = live_nodes
        self.restart = restart
        self.argv = tuple(argv)
        self.api_url = api_url
        self.version = version
        self._open: TrialState | None = None  # the trial recover() left for confirm()

    def state(self) -> TrialState | None:
        return read_state(self.data_dir)

    # -- in the old agent -------------------------------------------------------------

    def begin(self, bundle: Path) -> Manifest:
        """Verify, install, switch to and restart into the bundle's version (blocking).

        Answers the manifest once the restart is asked for; raises BundleError,
        UpgradeInProgress or NoRollbackSlot (nothing changed), or UpgradeError (recorded as
        ``failed``; still on the running version)."""
        current = self.state()
        if current is not None and current.open:
            raise UpgradeInProgress(f"an upgrade to {current.to_version} is {current.phase} on this node")
        manifest = verify_bundle(bundle, self.settings.trusted_keys, self.version)
        to = manifest.version
        if not self.slots.complete(self.version):
            raise NoRollbackSlot(f"the running version {self.version} has no slot under {self.slots.releases}: "
                               "nothing to roll back to (install it from its bundle first)")
        with _state_lock(self.data_dir):
            current = read_state(self.data_dir)
            if current is not None and current.open:
                raise UpgradeInProgress(f"an upgrade to {current.to_version} is {current.phase} on this node")
            write_state(self.data_dir, TrialState(
                phase="installing", from_version=self.version, to_version=to, started=time.time(),
                argv=self.argv, root=str(self.slots.root), systemd=under_systemd()))
        log.info("upgrade.installing", version=to, running=self.version)
        try:
            self.slots.install(bundle, manifest)
            containers = tuple(sorted(c.id for c in self.engine.list_managed(self.node_id) if c.running))
            peers = any(n != self.node_id for n in self.live_nodes())
        except Exception as exc:
            self._fail(f"install of {to} failed: {exc}")
            raise UpgradeError(f"install of {to} failed: {exc}") from exc
        transition(self.data_dir, ("installing",), phase="trial", containers=containers, peers=peers,
                   health_deadline=self.settings.health_deadline, agent_gone_grace=self.settings.agent_gone_grace,
                   deadline=time.time() + self.settings.health_deadline + GUARD_START_TIMEOUT)
        try:
            self._start_guard()
        except Exception as exc:
            self._fail(f"the upgrade guard did not start: {exc}")
            raise UpgradeError(f"the upgrade guard did not start: {exc}") from exc
        # The deadline counts from the switch.
        transition(self.data_dir, ("trial",), deadline=time.time() + self.settings.health_deadline)
        try:
            self.slots.flip(to)
        except Exception as exc:
            self._fail(f"switching to {to} failed: {exc}")
            raise UpgradeError(f"switching to {to} failed: {exc}") from exc
        log.info("upgrade.switched", version=to, previous=self.version, containers=len(containers), peers=peers)
        self._restart_into(to)
        return manifest

    def _fail(self, reason: str) -> None:
        transition(self.data_dir, OPEN_PHASES, phase="failed", reason=reason)
        log.error("upgrade.failed", reason=reason)

    def _start_guard(self) -> None:
        """Start the guard from THIS (the old) slot, outliving this agent, and wait until it
        has reported its pid in the state."""
        cmd = [sys.executable, "-I", "-m", "pleaco", "release", "guard", "--data-dir", str(self.data_dir)]
        if under_systemd():
            # Outside pleaco.service's cgroup, so restarting the service does not kill it.
            subprocess.run(["systemd-run", "--quiet", "--collect", "--unit",
                            f"pleaco-upgrade-guard-{int(time.time())}", *cmd], check=True, capture_output=True)
        else:
            # Through a shell that exits at once: the guard is no child of this agent (which
            # is about to exec another program and would never reap it).
            log_path = self.data_dir / GUARD_LOG
            script = f"{shlex.join(cmd)} >>{shlex.quote(str(log_path))} 2>&1 </dev/null &"
            subprocess.run(["/bin/sh", "-c", script], check=True, start_new_session=True, env=_without_pythonpath())
        deadline = time.monotonic() + GUARD_START_TIMEOUT
        while time.monotonic() < deadline:
            state = self.state()
            if state is not None and state.guard_pid and guard_alive(state):
                return
            time.sleep(0.05)
        raise UpgradeError(f"no guard reported within {GUARD_START_TIMEOUT:.0f} s "
                           f"(its log: {self.data_dir / GUARD_LOG})")

    def _restart_into(self, version: str) -> None:
        if under_systemd():
            _restart_unit()  # systemd stops this agent (SIGTERM) and starts ROOT/current
        else:
            self.restart(agent_command(self.slots, version, self.argv))

    # -- in every agent at start --------------------------------------------------------

    def recover(self) -> None:
        """Resolve an upgrade this node was in the middle of (see the module's doc). An
        unreadable state file is logged, not fatal: the agent must start to be fixed."""
        self._open = None
        try:
            self._recover()
        except Exception:
            log.error("upgrade.recover_failed", exc_info=True)

    def _recover(self) -> None:
        state = self.state()
        if state is None:
            return
        if state.phase == "installing":
            # The switch happens only after ``trial`` is recorded: this is still the old slot.
            self._fail(f"interrupted while installing {state.to_version}; still on {self.version}")
        elif state.phase == "trial" and self.version == state.to_version:
            self._open = state
        elif state.phase == "trial":
            # The switch did not happen, or was undone: this version runs, so it is current.
            self._fail(f"the agent started on {self.version} before {state.to_version} was confirmed")
            self._flip_to_running()
        elif state.phase == "rolled_back" and self.version == state.to_version and not guard_alive(state):
            # The guard decided, then died before switching back: finish its rollback.
            log.warning("upgrade.finishing_rollback", version=state.from_version, reason=state.reason)
            self.slots.flip(state.from_version)
            self._restart_into(state.from_version)

    def _flip_to_running(self) -> None:
        if self.slots.current() not in (None, self.version) and self.slots.complete(self.version):
            self.slots.flip(self.version)

    # -- in the new agent ------------------------------------------------------------------

    async def confirm(self) -> None:
        """Confirm the open trial of this version once healthy; roll back when the deadline
        passes without a guard to do it. Returns once the trial is decided."""
        state = self._open
        if state is None:
            return
        deadline = state.deadline
        if not guard_alive(state) and time.time() > deadline:
            deadline = time.time() + self.settings.health_deadline  # a killed node's second chance
        log.info("upgrade.confirming", version=self.version, deadline=round(deadline - time.time(), 1))
        last = ""
        while True:
            now_state = self.state()
            if now_state is None or now_state.phase != "trial":
                return  # decided elsewhere (the guard): it stops this agent
            problem = await self.health(state)
            if problem is None:
                done = transition(self.data_dir, ("trial",), phase="confirmed", last_error="",
                                  reason=f"healthy {time.time() - state.started:.1f} s after the upgrade began")
                if done is not None:
                    log.info("upgrade.confirmed", version=self.version, previous=state.from_version)
                    await asyncio.to_thread(self.slots.prune)
                return
            if problem != last:
                last = problem
                log.info("upgrade.not_healthy_yet", version=self.version, problem=problem)
                if transition(self.data_dir, ("trial",), last_error=problem) is None:
                    return
            if time.time() > deadline and not guard_alive(state):
                reason = f"{self.version} not healthy within {self.settings.health_deadline:.0f} s: {problem}"
                if transition(self.data_dir, ("trial",), phase="rolled_back", reason=reason) is not None:
                    log.error("upgrade.rolling_back", version=state.from_version, reason=reason)
                    await asyncio.to_thread(self.slots.flip, state.from_version)
                    self._restart_into(state.from_version)
                return
            await asyncio.sleep(POLL)

    async def health(self, state: TrialState) -> str | None:
        """None when this agent is healthy for ``state``'s trial, else what is not."""
        try:
            await asyncio.to_thread(self._api_answers)
        except Exception as exc:
            return f"API at {self.api_url} does not answer: {exc}"
        if state.peers and not any(n != self.node_id for n in self.live_nodes()):
            return "not rejoined its cluster yet"
        try:
            listed = await asyncio.to_thread(self.engine.list_managed, self.node_id)
        except Exception as exc:
            return f"cannot list app containers: {exc}"
        running = {c.id for c in listed if c.running}
        missing = [cid[:12] for cid in state.containers if cid not in running]
        if missing:
            return f"app containers {', '.join(missing)} no longer running with the same id"
        return None

    def _api_answers(self) -> None:
        with urllib.request.urlopen(f"{self.api_url}/healthz", timeout=2) as resp:
            resp.read()

    # -- the node-local trigger (``pleaco release apply``) --------------------------------

    async def apply_request(self) -> None:
        """On SIGUSR1: begin the upgrade ``upgrade.request`` names; ``upgrade.reply`` says
        how it went (the version switched to, or the error)."""
        bundle = self.take_request()
        if bundle is not None:
            # The reply is written in the worker thread: the agent stops (and cancels this
            # task) as soon as begin() asks for the restart, and waits for its threads.
            await asyncio.to_thread(self._apply, bundle)

    def _apply(self, bundle: Path) -> None:
        try:
            manifest = self.begin(bundle)
        except PleacoError as exc:
            self.reply({"bundle": str(bundle), "error": str(exc), "code": exc.code})
            log.error("upgrade.refused", bundle=str(bundle), error=str(exc))
        except Exception as exc:
            self.reply({"bundle": str(bundle), "error": f"{type(exc).__name__}: {exc}", "code": "internal"})
            log.error("upgrade.refused", exc_info=True, bundle=str(bundle))
        else:
            self.reply({"bundle": str(bundle), "version": manifest.version})

    def take_request(self) -> Path | None:
        """The bundle path an operator on this node asked for (``upgrade.request``), once."""
        path = self.data_dir / REQUEST_FILE
        try:
            raw = json.loads(path.read_text())
            path.unlink()
        except (OSError, ValueError):
            return None
        bundle = raw.get("bundle") if isinstance(raw, dict) else None
        return Path(bundle) if isinstance(bundle, str) else None

    def reply(self, outcome: dict[str, Any]) -> None:
        write_secret_file(self.data_dir / REPLY_FILE, json.dumps(outcome).encode() + b"\n")


# -- the guard ------------------------------------------------------------------------------

def run_guard(data_dir: Path) -> int:
    """Watch the open trial until it is decided; roll back when the new agent is not
    healthy by the deadline or is gone. Answers the exit status."""
    state = transition(data_dir, ("trial",), guard_pid=os.getpid())
    if state is None:
        log.info("guard.nothing_to_guard")
        return 0
    log.info("guard.watching", version=state.to_version, previous=state.from_version,
             deadline=round(state.deadline - time.time(), 1))
    gone_since: float | None = None
    while True:
        state = read_state(data_dir)
        if state is None or state.phase != "trial":
            log.info("guard.done", phase=state.phase if state else "none")
            return 0
        now = time.time()
        held = agent_pid(data_dir) is not None
        gone_since = None if held else (gone_since or now)
        detail = state.last_error or "it never reported its health"
        if now > state.deadline:
            reason = f"{state.to_version} not healthy within {_trial_seconds(state)} s: {detail}"
        elif gone_since is not None and now - gone_since > state.agent_gone_grace:
            reason = f"{state.to_version} agent exited before it was healthy ({detail})"
        else:
            time.sleep(POLL)
            continue
        return roll_back(data_dir, reason)


def _trial_seconds(state: TrialState) -> str:
    return f"{state.health_deadline:.0f}" if state.health_deadline else "the deadline's"


def roll_back(data_dir: Path, reason: str) -> int:
    """The guard's rollback: decide (the record first, so a late confirmation loses), stop
    the new agent, switch back, start the old one."""
    state = transition(data_dir, ("trial",), phase="rolled_back", reason=reason)
    if state is None:
        return 0
    log.error("guard.rolling_back", version=state.from_version, reason=reason)
    slots = Slots(Path(state.root))
    if not state.systemd:
        _stop_agent(data_dir)
    slots.flip(state.from_version)
    if state.systemd:
        _restart_unit()
    else:
        with open(data_dir / RESPAWN_LOG, "ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} rolled back: {reason}\n".encode())
            out.flush()
            subprocess.Popen(agent_command(slots, state.from_version, state.argv), stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=_without_pythonpath())
    log.info("guard.rolled_back", version=state.from_version)
    return 0


def _stop_agent(data_dir: Path) -> None:
    pid = agent_pid(data_dir)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if agent_pid(data_dir) != pid:
            return
        time.sleep(0.1)
    log.warning("guard.killing_agent", pid=pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while agent_pid(data_dir) == pid:
        time.sleep(0.1)
