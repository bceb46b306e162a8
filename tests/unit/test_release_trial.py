"""The trial after a switch: its state transitions, an upgrade interrupted at each phase,
the new agent's confirmation or its own rollback, and the guard's rollback. Slots are
made by hand (their python a script that records how it was started); the health check
talks to a real HTTP server; containers come from a fake engine."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import http.server
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pleaco.host import trial
from pleaco.host.config import UpgradeSettings
from pleaco.host.datadir import DataDirLock
from pleaco.host.slots import COMPLETE, Slots
from pleaco.host.trial import LocalUpgrade, TrialState, read_state, write_state
from pleaco.runtime import ContainerInfo

POLL = 0.05  # seconds between looks while a condition settles

ME = "node-a"


def container(cid: str, state: str = "running") -> ContainerInfo:
    return ContainerInfo(id=cid, name=f"pleaco-web-1-0-{ME}", app="web", node=ME, release=1, replica=0,
                         state=state, exit_code=None, image="img", host_port=None, created=0)


class FakeEngine:
    def __init__(self, *ids: str) -> None:
        self.containers = [container(i) for i in ids]

    def list_managed(self, node_id: str, app: str | None = None) -> list[ContainerInfo]:
        assert node_id == ME
        return list(self.containers)


def fake_slot(slots: Slots, version: str) -> None:
    """A complete slot whose bin/python records its arguments in ROOT/started-VERSION."""
    bindir = slots.path(version) / "bin"
    bindir.mkdir(parents=True)
    python = bindir / "python"
    # Written aside and renamed: a test polling for the file must never read it half written.
    target = f"{slots.root}/started-{version}"
    python.write_text(f'#!/bin/sh\necho "$@" > {target}.part && mv {target}.part {target}\n')
    python.chmod(0o755)
    (slots.path(version) / COMPLETE).write_text(version)


@pytest.fixture
def api() -> Iterator[str]:
    """A real HTTP server answering /healthz, as the new agent's API would."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Node:
    def __init__(self, tmp: Path) -> None:
        self.data_dir = tmp / "data"
        self.data_dir.mkdir()
        self.root = tmp / "opt"
        self.slots = Slots(self.root)
        for v in ("0.1.0", "0.2.0", "0.3.0"):
            fake_slot(self.slots, v)
        self.restarts: list[list[str]] = []

    def upgrade(self, version: str, engine: FakeEngine | None = None, api_url: str = "http://127.0.0.1:9",
                live: list[str] | None = None, deadline: float = 60.0) -> LocalUpgrade:
        return LocalUpgrade(self.data_dir, UpgradeSettings(root=self.root, health_deadline=deadline), node_id=ME,
                            engine=engine or FakeEngine(), live_nodes=lambda: list(live or [ME]),
                            restart=self.restarts.append, argv=["agent", "--data-dir", str(self.data_dir)],
                            api_url=api_url, version=version)

    def record(self, phase: str, **kw: Any) -> TrialState:
        state = TrialState(phase=phase, from_version="0.2.0", to_version="0.3.0", started=time.time(),
                           deadline=time.time() + 60, root=str(self.root), argv=("agent", "--x"), **kw)
        write_state(self.data_dir, state)
        return state

    @property
    def state(self) -> TrialState:
        st = read_state(self.data_dir)
        assert st is not None
        return st


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path)


@contextlib.contextmanager
def live_guard() -> Iterator[int]:
    """A process whose command line says it is a guard."""
    proc = subprocess.Popen(["/bin/sh", "-c", "sleep 60", "pleaco-release-guard"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


# -- the state ------------------------------------------------------------------------------

def test_state_round_trips_and_transitions_only_from_the_phases_named(node: Node) -> None:
    written = node.record("trial", containers=("c1", "c2"), peers=True)
    assert dataclasses.replace(node.state, updated=0) == dataclasses.replace(written, updated=0)
    assert trial.transition(node.data_dir, ("installing",), phase="failed") is None
    assert node.state.phase == "trial"
    done = trial.transition(node.data_dir, ("trial",), phase="confirmed", reason="ok")
    assert done is not None and node.state.phase == "confirmed" and node.state.containers == ("c1", "c2")
    assert (node.data_dir / trial.STATE_FILE).stat().st_mode & 0o777 == 0o600


def test_agent_pid_is_the_lock_holder(node: Node) -> None:
    assert trial.agent_pid(node.data_dir) is None
    lock = DataDirLock(node.data_dir)
    lock.acquire()
    try:
        assert trial.agent_pid(node.data_dir) == os.getpid()
        # Asking does not take the lock: the holder keeps it, another agent is still refused.
        fd = os.open(node.data_dir / "agent.lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    finally:
        lock.release()
    assert trial.agent_pid(node.data_dir) is None


def test_local_url_reaches_a_wildcard_address_on_loopback() -> None:
    assert trial.local_url("0.0.0.0:7400") == "http://127.0.0.1:7400"
    assert trial.local_url("[::]:7400") == "http://[::1]:7400"
    assert trial.local_url("10.0.0.5:7400") == "http://10.0.0.5:7400"


# -- interrupted upgrades, resolved at the next start -------------------------------------------

def test_interrupted_while_installing_is_failed_and_the_old_slot_stays(node: Node) -> None:
    node.slots.flip("0.2.0")
    node.record("installing")
    node.upgrade("0.2.0").recover()
    assert node.state.phase == "failed" and "interrupted while installing 0.3.0" in node.state.reason
    assert node.slots.current() == "0.2.0" and not node.restarts


def test_a_trial_found_by_the_old_version_fails_and_current_names_the_running_one(node: Node) -> None:
    node.slots.flip("0.2.0")
    node.slots.flip("0.3.0")  # switched, then the node restarted on the old version
    node.record("trial")
    node.upgrade("0.2.0").recover()
    assert node.state.phase == "failed" and "started on 0.2.0 before 0.3.0 was confirmed" in node.state.reason
    assert node.slots.current() == "0.2.0" and not node.restarts


def test_a_trial_found_by_the_new_version_is_left_for_its_confirmation(node: Node) -> None:
    node.slots.flip("0.3.0")
    node.record("trial")
    up = node.upgrade("0.3.0")
    up.recover()
    assert node.state.phase == "trial" and up._open is not None


def test_a_rollback_whose_guard_died_before_switching_back_is_finished(node: Node) -> None:
    node.slots.flip("0.2.0")
    node.slots.flip("0.3.0")
    node.record("rolled_back", reason="0.3.0 not healthy", guard_pid=999_999_999)
    node.upgrade("0.3.0").recover()
    assert node.slots.current() == "0.2.0"
    assert node.restarts == [[str(node.slots.python("0.2.0")), "-I", "-m", "pleaco", "agent", "--data-dir",
                              str(node.data_dir)]]


def test_a_rollback_in_the_hands_of_a_live_guard_is_left_to_it(node: Node) -> None:
    node.slots.flip("0.3.0")
    with live_guard() as pid:
        node.record("rolled_back", reason="0.3.0 not healthy", guard_pid=pid)
        node.upgrade("0.3.0").recover()
    assert node.slots.current() == "0.3.0" and not node.restarts


def test_a_damaged_state_file_does_not_stop_the_agent(node: Node) -> None:
    (node.data_dir / trial.STATE_FILE).write_text("{not json")
    node.upgrade("0.3.0").recover()  # logged, not raised


# -- the new agent's confirmation ------------------------------------------------------------------

def test_a_healthy_new_agent_confirms_and_prunes_old_slots(node: Node, api: str) -> None:
    node.slots.flip("0.2.0")
    node.slots.flip("0.3.0")
    node.record("trial", containers=("c1", "c2"), peers=True)
    up = node.upgrade("0.3.0", FakeEngine("c1", "c2", "c3"), api, live=[ME, "node-b"])
    up.recover()
    asyncio.run(asyncio.wait_for(up.confirm(), 30))
    assert node.state.phase == "confirmed" and "healthy" in node.state.reason
    assert node.slots.versions() == ["0.2.0", "0.3.0"]  # 0.1.0 pruned; the previous one kept
    assert not node.restarts


@pytest.mark.parametrize(("engine", "live", "api_ok", "problem"), [
    (FakeEngine("c1"), [ME, "b"], True, "app containers c2 no longer running with the same id"),
    (FakeEngine("c1", "c2"), [ME], True, "not rejoined its cluster yet"),
    (FakeEngine("c1", "c2"), [ME, "b"], False, "does not answer"),
], ids=["container-replaced", "cluster-not-rejoined", "api-down"])
def test_an_unhealthy_new_agent_without_a_guard_rolls_itself_back(
        node: Node, api: str, engine: FakeEngine, live: list[str], api_ok: bool, problem: str) -> None:
    node.slots.flip("0.2.0")
    node.slots.flip("0.3.0")
    node.record("trial", containers=("c1", "c2"), peers=True, guard_pid=999_999_999)
    trial.transition(node.data_dir, ("trial",), deadline=time.time() + 1)  # the switch's deadline
    up = node.upgrade("0.3.0", engine, api if api_ok else "http://127.0.0.1:9", live=live, deadline=1.0)
    up.recover()
    asyncio.run(asyncio.wait_for(up.confirm(), 30))
    state = node.state
    assert state.phase == "rolled_back" and problem in state.reason and "0.3.0 not healthy within 1 s" in state.reason
    assert node.slots.current() == "0.2.0"
    assert node.restarts and node.restarts[0][0] == str(node.slots.python("0.2.0"))


def test_the_new_agent_leaves_a_decision_to_a_live_guard(node: Node, api: str) -> None:
    node.slots.flip("0.3.0")
    with live_guard() as pid:
        node.record("trial", containers=("gone",), guard_pid=pid)
        up = node.upgrade("0.3.0", FakeEngine(), api, deadline=1.0)
        up.recover()

        async def confirm_then_guard_decides() -> None:
            task = asyncio.create_task(up.confirm())
            deadline = time.monotonic() + 10
            while "no longer running" not in (node.state.last_error or ""):  # confirm() has checked, and waits
                assert not task.done(), "confirm() ended before the guard decided"
                assert time.monotonic() < deadline, "confirm() never checked the containers"
                await asyncio.sleep(POLL)
            trial.transition(node.data_dir, ("trial",), phase="rolled_back", reason="by the guard")
            await asyncio.wait_for(task, 10)

        asyncio.run(confirm_then_guard_decides())
    assert node.state.reason == "by the guard" and node.slots.current() == "0.3.0" and not node.restarts
    assert "no longer running" in node.state.last_error  # what the guard's reason quotes


# -- the guard ------------------------------------------------------------------------------------

def _wait(cond: Any, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(POLL)


def test_the_guard_rolls_back_a_trial_past_its_deadline(node: Node) -> None:
    node.slots.flip("0.2.0")
    node.slots.flip("0.3.0")
    node.record("trial", last_error="app containers c2 no longer running with the same id", health_deadline=60)
    trial.transition(node.data_dir, ("trial",), deadline=time.time() - 1)
    assert trial.run_guard(node.data_dir) == 0
    state = node.state
    assert state.phase == "rolled_back" and state.guard_pid == os.getpid()
    assert "0.3.0 not healthy within 60 s: app containers c2 no longer running" in state.reason
    assert node.slots.current() == "0.2.0"
    _wait(lambda: (node.root / "started-0.2.0").exists(), "the old agent to be started")
    assert (node.root / "started-0.2.0").read_text().split() == ["-I", "-m", "pleaco", "agent", "--x"]
    assert "rolled back" in (node.data_dir / trial.RESPAWN_LOG).read_text()


def test_the_guard_rolls_back_when_the_agent_is_gone(node: Node) -> None:
    node.slots.flip("0.2.0")
    node.slots.flip("0.3.0")
    # The grace the trial recorded ([upgrade] agent_gone_grace), short: the default only slows the test.
    node.record("trial", agent_gone_grace=0.3)  # deadline a minute away, and no agent holds the data dir
    assert trial.run_guard(node.data_dir) == 0
    assert node.state.phase == "rolled_back" and "agent exited before it was healthy" in node.state.reason
    assert node.slots.current() == "0.2.0"


def test_the_guard_leaves_a_confirmed_trial_alone(node: Node) -> None:
    node.slots.flip("0.2.0")
    node.slots.flip("0.3.0")
    node.record("trial", agent_gone_grace=60.0)
    lock = DataDirLock(node.data_dir)
    lock.acquire()  # the new agent runs
    try:
        confirm = threading.Timer(0.5, lambda: trial.transition(node.data_dir, ("trial",), phase="confirmed"))
        confirm.start()
        assert trial.run_guard(node.data_dir) == 0
        confirm.join()
    finally:
        lock.release()
    assert node.state.phase == "confirmed" and node.slots.current() == "0.3.0"
    assert not (node.root / "started-0.2.0").exists()


def test_a_guard_started_without_a_trial_exits(node: Node) -> None:
    assert trial.run_guard(node.data_dir) == 0
    node.record("confirmed")
    assert trial.run_guard(node.data_dir) == 0 and node.state.guard_pid == 0


# -- begin(), up to what a unit test can run -----------------------------------------------------

def test_begin_refuses_without_a_slot_to_roll_back_to_and_changes_nothing(tmp_path: Path) -> None:
    from test_release_bundle import GOOD, write_bundle

    from pleaco.host.bundle import keygen, load_private_key

    private, public = keygen(tmp_path / "keys")
    path = write_bundle(tmp_path / "b.tar", load_private_key(private), GOOD)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    restarts: list[list[str]] = []
    up = LocalUpgrade(data_dir, UpgradeSettings(trusted_keys=[public.read_text()], root=tmp_path / "opt"),
                      node_id=ME, engine=FakeEngine(), live_nodes=lambda: [ME], restart=restarts.append,
                      argv=["agent"], version="0.2.0")
    with pytest.raises(trial.NoRollbackSlot, match=r"running version 0\.2\.0 has no slot"):
        up.begin(path)
    assert read_state(data_dir) is None and not restarts and not (tmp_path / "opt" / "releases").exists()


def test_begin_refuses_while_an_upgrade_is_open(node: Node) -> None:
    node.record("installing")
    with pytest.raises(trial.UpgradeInProgress, match=r"upgrade to 0\.3\.0 is installing"):
        node.upgrade("0.2.0").begin(node.root / "whatever.tar")
    assert node.state.phase == "installing"


def test_a_grace_for_a_gone_agent_that_is_not_positive_is_refused() -> None:
    assert "upgrade.agent_gone_grace: must be greater than 0" in UpgradeSettings(agent_gone_grace=0).validate()
    assert UpgradeSettings().agent_gone_grace == 10.0 and not UpgradeSettings().validate()
