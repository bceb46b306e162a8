"""Self-upgrade of one real agent run from a release slot, with a real app replica.

The agent runs ROOT/current/bin/pleaco from a v0.2.0 slot (a real venv installed from a
real signed bundle, once for the session and linked into each test's root). ``pleaco
release apply`` (the node-local trigger) asks it to upgrade:

- to a v0.3.0 whose agent exits at start: the guard rolls back by itself, the 0.2.0 agent
  is started again, the state says why, and the app's container is untouched; then to the
  good v0.3.0: the same process comes back on the 0.3.0 slot, the trial is confirmed, and
  the app's container is the same one, never restarted;
- to a v0.3.0 never healthy: rolled back at the deadline by the guard, or, when the guard
  died, by the new agent itself;
- a node killed mid-install stays on its slot and upgrades on the next attempt.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agentproc import docker_client, free_port, remove_node_containers, wait_for, wait_listening
from conftest import HELLO
from slotagents import ReleaseKit, Releases

from pleaco.api.client import Client
from pleaco.host.slots import Slots
from pleaco.host.trial import STATE_FILE, agent_pid

pytestmark = pytest.mark.docker

# The health deadline of the never-healthy release's trials (the tests wait it out): an agent
# restarts and answers within a few seconds, so the test sees the new one before it passes.
DEADLINE = 10
# Seconds without an agent on the data dir before the guard rolls back ([upgrade]
# agent_gone_grace, default 10): the exit-at-start release is waited out, and a good
# release's agent takes the data dir within a few seconds of the old one's exit.
GONE_GRACE = 5


@pytest.fixture(scope="module")
def releases(release_kit: ReleaseKit) -> Releases:
    """Signed bundles of this tree: 0.2.0, 0.3.0, and two broken 0.3.0s (slotagents.BROKEN)."""
    bundles = release_kit.bundles(["0.2.0", "0.3.0", "0.3.0-exits", "0.3.0-unhealthy"])
    return Releases(release_kit, {"0.2.0": bundles["0.2.0"], "0.3.0": bundles["0.3.0"],
                                  "exits": bundles["0.3.0-exits"], "unhealthy": bundles["0.3.0-unhealthy"]})


@dataclass
class SlotAgent:
    """A real agent started from ROOT/current, as systemd's ExecStart would."""

    root: Path
    data_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""

    @property
    def client(self) -> Client:
        return Client(f"http://127.0.0.1:{self.port}", (self.data_dir / "admin.token").read_text().strip(), timeout=30)

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / "agent.log"

    def start(self) -> None:
        cmd = [str(self.root / "current" / "bin" / "pleaco"), "agent", "--data-dir", str(self.data_dir),
               "--api-listen", f"127.0.0.1:{self.port}", "--name", "up", "--proxy-image=",
               "--gossip-listen", f"127.0.0.1:{free_port()}", "--discovery", "seeds"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        wait_listening(self.proc, "127.0.0.1", self.port, 30, "the 0.2.0 agent")
        self.node_id = self.client.status()["node_id"]

    def pid(self) -> int | None:
        """The pid holding the data dir (the same process after an exec; another after a respawn)."""
        return agent_pid(self.data_dir)

    def recorded_pid(self) -> int | None:
        """The pid agent.lock names (the last agent that held it, even when it is gone)."""
        try:
            return int((self.data_dir / "agent.lock").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def version(self) -> str:
        return next(n["version"] for n in self.client.nodes() if n["id"] == self.node_id)

    def state(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.data_dir / STATE_FILE).read_text()))
        except (OSError, ValueError):
            return {}

    def apply(self, bundle: Path) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.root / "current" / "bin" / "pleaco"), "release", "apply", "--bundle", str(bundle),
               "--data-dir", str(self.data_dir)]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=300)

    def log_tail(self) -> str:
        parts = []
        for path in (self.log_path, self.data_dir / "upgrade-guard.log", self.data_dir / "agent-respawn.log"):
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n" + "\n".join(path.read_text().splitlines()[-40:]))
        return "\n".join(parts)

    def cleanup(self) -> None:
        """Stop every process this test's upgrade made: the agent (whichever pid holds the
        data dir now), a guard, the first process; then the app's containers."""
        pids = {self.pid(), self.recorded_pid(), self.state().get("guard_pid"), self.proc.pid if self.proc else None}
        for pid in pids:
            if pid and _is_ours(pid, self.data_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.node_id:
            remove_node_containers(self.node_id)


def _is_ours(pid: int, data_dir: Path) -> bool:
    try:
        return str(data_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture
def slot_agent(request: pytest.FixtureRequest, tmp_path: Path, releases: Releases) -> Iterator[SlotAgent]:
    """The agent on a 0.2.0 slot; ``[upgrade] health_deadline`` is the param (default 60)."""
    deadline = getattr(request, "param", 60)
    # The 0.2.0 slot is the session's shared one, linked (installed once: the upgrades under
    # test install into this root for real).
    root = releases.root_at(tmp_path / "opt", "0.2.0")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the slot's code, never this tree's
    env.update({"PLEACO_UPGRADE_TRUSTED_KEYS": releases.public_key, "PLEACO_UPGRADE_ROOT": str(root),
                "PLEACO_UPGRADE_HEALTH_DEADLINE": str(deadline), "PLEACO_UPGRADE_AGENT_GONE_GRACE": str(GONE_GRACE),
                "PLEACO_LOG_LEVEL": "debug",
                # The network off, as in agentproc: the host's engine is shared with other tests.
                "PLEACO_NETWORK_ENABLED": "false"})
    agent = SlotAgent(root, tmp_path / "node", env)
    try:
        agent.start()
        yield agent
    except BaseException:
        print(agent.log_tail())
        raise
    finally:
        agent.cleanup()


def _replica(agent: SlotAgent) -> tuple[str, str]:
    """The app's one running container: (id, when it started)."""
    agent.client.deploy("web", {"image": HELLO, "replicas": 1, "port": 8080, "health": "/healthz"})
    wait_for(lambda: agent.client.app("web")["healthy"] == 1, 60, "a healthy replica")
    return _started(agent)


def _started(agent: SlotAgent) -> tuple[str, str]:
    rows = docker_client().containers.list(filters={"label": [f"pleaco.node={agent.node_id}", "pleaco.app=web"]})
    assert len(rows) == 1, [c.name for c in rows]
    return rows[0].id, rows[0].attrs["State"]["StartedAt"]


def _rolled_back(agent: SlotAgent, before: tuple[str, str], first_pid: int | None, reason: str) -> None:
    wait_for(lambda: agent.state().get("phase") == "rolled_back", 180, "the rollback")
    assert reason in agent.state()["reason"]
    wait_for(lambda: agent.pid() not in (None, first_pid) and agent.version() == "0.2.0", 60,
             "the 0.2.0 agent back and answering")
    assert Slots(agent.root).current() == "0.2.0"
    assert b"/releases/0.2.0/bin/python" in Path(f"/proc/{agent.pid()}/cmdline").read_bytes()
    # The app was never touched.
    assert _started(agent) == before
    wait_for(lambda: agent.client.app("web")["healthy"] == 1, 30, "the replica adopted by the old agent")
    assert agent.state()["phase"] == "rolled_back"  # the old agent leaves the record as it is


# One scenario for what two would each set up the same way (an agent on its slot, a replica,
# a 0.3.0 install): a release whose agent exits at start rolls back by itself, then the
# fixed 0.3.0 comes back on the new slot (the same process) and adopts the replica.
def test_a_release_whose_agent_exits_rolls_back_and_the_fixed_one_comes_back_on_the_new_slot(
        slot_agent: SlotAgent, releases: Releases) -> None:
    agent = slot_agent
    assert agent.version() == "0.2.0"
    before = _replica(agent)
    first_pid = agent.pid()

    # Refused bundles change nothing: not newer, then cut short.
    refused = agent.apply(releases.bundles["0.2.0"])
    assert refused.returncode == 1 and "0.2.0 is not newer than the running 0.2.0" in refused.stderr
    cut = agent.data_dir.parent / "cut.tar"
    cut.write_bytes(releases.bundles["0.3.0"].read_bytes()[:1_000_000])
    refused = agent.apply(cut)
    assert refused.returncode == 1 and "truncated" in refused.stderr, refused.stderr
    assert agent.state() == {} and agent.pid() == first_pid and Slots(agent.root).versions() == ["0.2.0"]

    done = agent.apply(releases.bundles["exits"])
    assert done.returncode == 0, done.stderr + agent.log_tail()
    assert agent.state()["agent_gone_grace"] == GONE_GRACE  # what the guard waits, from the config
    # The broken 0.3.0 exits at start; the guard (from the 0.2.0 slot) notices the data dir
    # unheld, switches back and starts the 0.2.0 agent again.
    _rolled_back(agent, before, first_pid, "0.3.0 agent exited before it was healthy")

    # The fixed 0.3.0 (another bundle of the same version) replaces the broken slot and goes through.
    pid = agent.pid()
    done = agent.apply(releases.bundles["0.3.0"])
    assert done.returncode == 0, done.stderr + agent.log_tail()
    assert "switched to 0.3.0" in done.stdout

    wait_for(lambda: agent.state().get("phase") == "confirmed", 120, "the trial confirmed")
    state = agent.state()
    assert (state["from_version"], state["to_version"]) == ("0.2.0", "0.3.0")
    assert state["containers"] == [before[0]]
    wait_for(lambda: agent.version() == "0.3.0", 30, "the node record on 0.3.0")
    # The same process (exec), now the 0.3.0 slot's interpreter.
    assert agent.pid() == pid
    assert b"/releases/0.3.0/bin/python" in Path(f"/proc/{pid}/cmdline").read_bytes()
    slots = Slots(agent.root)
    assert (slots.current(), slots.previous()) == ("0.3.0", "0.2.0")
    # Adopted unchanged: the same container, never restarted.
    assert _started(agent) == before
    assert agent.client.app("web")["healthy"] == 1


# One scenario for two that each install the same never-healthy 0.3.0: at the deadline
# its guard rolls it back; applied again (the slot is reused), with its guard killed, the
# new agent rolls itself back at the deadline. A short deadline: the test waits it out.
@pytest.mark.parametrize("slot_agent", [DEADLINE], indirect=True)
def test_a_release_never_healthy_rolls_back_at_the_deadline_by_its_guard_or_else_by_itself(
        slot_agent: SlotAgent, releases: Releases) -> None:
    agent = slot_agent
    never = f"0.3.0 not healthy within {DEADLINE} s: broken on purpose: never healthy"
    before = _replica(agent)
    first_pid = agent.pid()
    done = agent.apply(releases.bundles["unhealthy"])
    assert done.returncode == 0, done.stderr + agent.log_tail()
    # The 0.3.0 agent runs (and answers) but never confirms: at the deadline the guard stops
    # it, switches back and starts the 0.2.0 agent again.
    wait_for(lambda: agent.version() == "0.3.0", 60, "the 0.3.0 agent answering")
    _rolled_back(agent, before, first_pid, never)

    pid = agent.pid()
    done = agent.apply(releases.bundles["unhealthy"])
    assert done.returncode == 0, done.stderr + agent.log_tail()
    wait_for(lambda: agent.version() == "0.3.0", 60, "the 0.3.0 agent answering")
    state = agent.state()
    assert state["phase"] == "trial", state  # the second trial, not the first's record
    os.kill(state["guard_pid"], signal.SIGKILL)  # the guard dies: the new agent must decide by itself

    # Never healthy: at the deadline the 0.3.0 agent rolls itself back, by exec into the
    # 0.2.0 slot (the same process again).
    wait_for(lambda: agent.state().get("phase") == "rolled_back", 120, "the rollback")
    assert never in agent.state()["reason"]
    wait_for(lambda: agent.version() == "0.2.0", 60, "the 0.2.0 agent back")
    assert agent.pid() == pid and b"/releases/0.2.0/bin/python" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert Slots(agent.root).current() == "0.2.0"
    assert _started(agent) == before


def _kill_processes_under(path: Path) -> None:
    """SIGKILL every process whose command line names ``path`` (what a killed agent's
    install left running: the pip installing into its venv)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            with contextlib.suppress(OSError):
                if str(path).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)


def test_a_node_killed_while_installing_stays_on_its_slot_and_upgrades_later(
        slot_agent: SlotAgent, releases: Releases) -> None:
    agent = slot_agent
    before = _replica(agent)
    cmd = [str(agent.root / "current" / "bin" / "pleaco"), "release", "apply", "--bundle",
           str(releases.bundles["0.3.0"]), "--data-dir", str(agent.data_dir)]
    apply = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=agent.env)
    try:
        wait_for(lambda: agent.state().get("phase") == "installing", 60, "the install to begin")
        pid = agent.pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the node dies mid-install
        wait_for(lambda: agent.pid() is None, 20, "the agent gone")
        _kill_processes_under(agent.root / "releases" / "0.3.0")
    finally:
        apply.kill()
        apply.wait()
    assert agent.proc is not None
    agent.proc.wait(10)

    agent.start()  # from ROOT/current, as systemd would: still 0.2.0
    assert agent.version() == "0.2.0"
    state = agent.state()
    assert state["phase"] == "failed" and "interrupted while installing 0.3.0; still on 0.2.0" in state["reason"]
    slots = Slots(agent.root)
    assert slots.current() == "0.2.0" and not slots.complete("0.3.0")
    assert _started(agent) == before

    # The half-made 0.3.0 slot is replaced by the next attempt, which goes through.
    done = agent.apply(releases.bundles["0.3.0"])
    assert done.returncode == 0, done.stderr + agent.log_tail()
    wait_for(lambda: agent.state().get("phase") == "confirmed", 120, "the trial confirmed")
    assert slots.current() == "0.3.0" and slots.complete("0.3.0")
    assert _started(agent) == before
