"""Real systemd: the agent as systemd/pleaco.service in a Debian node whose PID 1 is systemd.

The node is a container of pleaco/systemd-node:bookworm (scripts/systemd-image.sh) run
with the flags of /work/shared/HOSTS.md (never --privileged). The checkout, its venv and
the venv's base Python are mounted at the same paths. The agent under test drives the
host's engine, without a proxy and without apps, so it makes nothing there: the node's
docker.service is a forwarder from /run/docker.sock to the host's socket (mounted at
/run/host-docker.sock), so that starting and stopping "Docker" is systemd's business as
on a real node. The unit is the repository's, hardening included; a drop-in points
ExecStart at the mounted venv and shortens the watchdog.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from agentproc import REPO, docker_client, remove_node_containers, wait_for

from pleaco.api.client import Client

pytestmark = pytest.mark.docker

IMAGE = "pleaco/systemd-node:bookworm"
# The test's watchdog: short, so a hung agent is restarted within seconds; the agent
# pings every 2.5 s, far more often than a loaded 2-core host stalls its event loop.
WATCHDOG_SEC = 5
VENV = Path(sys.prefix)
BASE_PYTHON = Path(sys.base_prefix)
API_PORT = 7400  # in the node's own network namespace: no clash with other tests


# The node's docker.service: tests/integration/engineproxy.py forwarding /run/docker.sock
# to the host's engine, READY once it listens (Type=notify, as dockerd). With FAIL_FIRST
# set, its first start fails, as a Docker that failed at boot.
FAKE_DOCKERD = f"""
import os, sys, threading
from pathlib import Path
sys.path.insert(0, {str(REPO / "tests" / "integration")!r})
from engineproxy import SocketProxy
from pleaco.host.systemd import Notifier
if os.environ.get("FAIL_FIRST") and not os.path.exists("/run/fake-dockerd-failed"):
    Path("/run/fake-dockerd-failed").touch()
    sys.exit("failing on purpose, the first time")
SocketProxy(Path("/run/docker.sock"), "/run/host-docker.sock").start()
Notifier().send(READY=1)
threading.Event().wait()
"""
DOCKER_UNIT = f"""[Unit]
Description=Docker Engine (the host's, forwarded)
[Service]
Type=notify
Environment=PYTHONPATH={REPO}
ExecStart={VENV}/bin/python /usr/local/lib/fake-dockerd.py
"""


def dropin() -> str:
    return "\n".join([
        "[Service]",
        "ExecStart=",
        f"ExecStart={VENV}/bin/pleaco agent",
        f"Environment=PYTHONPATH={REPO}",  # this checkout, not the venv's editable install's
        # The unit's PrivateTmp hides the node's /tmp, where a CI clone (and its venv) may be.
        "BindReadOnlyPaths=" + " ".join(sorted({str(REPO), str(VENV), str(BASE_PYTHON)})),
        "Environment=PLEACO_PROXY_IMAGE=",  # no proxy: it would publish ports on the host's engine
        "Environment=PLEACO_DISCOVERY=none",
        # The network off, as in agentproc: the host's engine is shared with other tests.
        "Environment=PLEACO_NETWORK_ENABLED=false",
        f"Environment=PLEACO_API_LISTEN=0.0.0.0:{API_PORT}",
        f"WatchdogSec={WATCHDOG_SEC}s",
        "RestartSec=1",
        # A stopped process ignores the watchdog's SIGABRT until systemd's SIGCONT; then
        # SIGKILL, if it still lingers, after this.
        "TimeoutAbortSec=5s",
        "",
    ])


class Node:
    """The node container, and commands run in it."""

    def __init__(self, container: Any) -> None:
        self.c = container

    def run(self, *cmd: str, check: bool = True) -> str:
        code, out = self.c.exec_run(list(cmd))
        text = out.decode(errors="replace")
        if check and code != 0:
            raise AssertionError(f"{' '.join(cmd)} exited with {code}: {text}")
        return text

    def put(self, path: str, text: str) -> None:
        data = text.encode()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(Path(path).name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        self.run("mkdir", "-p", str(Path(path).parent))
        assert self.c.put_archive(str(Path(path).parent), buf.getvalue())

    def show(self, *props: str) -> dict[str, str]:
        return self.show_unit("pleaco", *props)

    def show_unit(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props))
        shown = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
        assert set(props) <= set(shown), f"systemctl show {unit} answered {out!r}"
        return shown

    def journal(self) -> list[dict[str, Any]]:
        out = self.run("journalctl", "-o", "json", "-u", "pleaco", "--no-pager")
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    @property
    def ip(self) -> str:
        self.c.reload()
        return str(self.c.attrs["NetworkSettings"]["IPAddress"])


@pytest.fixture
def node() -> Iterator[Node]:
    if VENV == BASE_PYTHON:  # mounting the interpreter's own prefix (/usr) would hide the node's
        pytest.fail("run the tests with the project's venv (.venv/bin/python -m pytest)", pytrace=False)
    engine = docker_client()
    try:
        engine.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{IMAGE} is missing: run scripts/images.sh (scripts/systemd-image.sh builds it; "
                    "it needs debootstrap: make apt)", pytrace=False)
    mounts = {str(REPO): {"bind": str(REPO), "mode": "ro"},
              str(VENV): {"bind": str(VENV), "mode": "ro"},
              "/var/run/docker.sock": {"bind": "/run/host-docker.sock", "mode": "rw"},
              "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}}
    if not BASE_PYTHON.is_relative_to("/usr"):  # a Python of its own (pyenv): the venv's links lead there
        mounts[str(BASE_PYTHON)] = {"bind": str(BASE_PYTHON), "mode": "ro"}
    container = engine.containers.run(
        IMAGE, name=f"pleaco-test-systemd-{uuid.uuid4().hex[:8]}", detach=True,
        cap_add=["SYS_ADMIN", "NET_ADMIN"], security_opt=["seccomp=unconfined"],
        tmpfs={"/run": "", "/run/lock": ""}, volumes=mounts, cgroupns="host", stop_signal="SIGRTMIN+3",
    )
    n = Node(container)
    node_id = ""
    try:
        wait_for(lambda: n.run("systemctl", "is-system-running", check=False).strip() in ("running", "degraded"),
                 60, "the node's systemd to finish booting", interval=0.2)
        yield n
    finally:
        try:
            print("==== journal of pleaco in the node ====")
            print(n.run("journalctl", "-u", "pleaco", "--no-pager", "-n", "200", check=False))
            node_id = next((e["PLEACO_NODE"] for e in n.journal() if "PLEACO_NODE" in e), "")
        except Exception as exc:  # the container is removed all the same
            print(f"(no journal: {exc})")
        container.remove(force=True)
        if node_id:
            remove_node_containers(node_id)  # none expected: no apps, no proxy


def install_unit(n: Node) -> None:
    n.put("/usr/local/lib/fake-dockerd.py", FAKE_DOCKERD)
    n.put("/etc/systemd/system/docker.service", DOCKER_UNIT)
    n.put("/etc/systemd/system/pleaco.service", (REPO / "systemd" / "pleaco.service").read_text())
    n.put("/etc/systemd/system/pleaco.service.d/test.conf", dropin())
    n.run("systemctl", "daemon-reload")


def events(n: Node, name: str) -> list[dict[str, Any]]:
    return [e for e in n.journal() if e.get("PLEACO_EVENT") == name]


def test_the_unit_starts_the_agent_reports_status_restarts_it_on_a_hang_and_logs_to_the_journal(
        node: Node) -> None:
    install_unit(node)
    # Type=notify: `systemctl start` returns only after READY=1, which the agent sends
    # once its API answers: so the API answers now, without waiting.
    node.run("systemctl", "start", "pleaco")
    shown = node.show("ActiveState", "SubState", "MainPID", "NRestarts", "StatusText", "WatchdogUSec")
    assert shown["ActiveState"] == "active" and shown["SubState"] == "running", shown
    assert shown["WatchdogUSec"] in (f"{WATCHDOG_SEC}s", str(WATCHDOG_SEC * 1_000_000)), shown
    token = node.run("cat", "/var/lib/pleaco/admin.token").strip()
    client = Client(f"http://{node.ip}:{API_PORT}", token, timeout=10)
    status = client.status()
    node_id = status["node_id"]
    assert shown["StatusText"] == "0 apps, 0 replicas, cluster of 1", shown
    # The unit's sandbox is in force (ProtectSystem=strict), and the agent registered its
    # addresses where the unit lets it write (RuntimeDirectory=).
    probe = node.run("nsenter", "-t", shown["MainPID"], "-m", "touch", "/etc/pleaco-probe", check=False)
    assert "Read-only file system" in probe, probe
    node.run("test", "-f", f"/run/pleaco/agents/{shown['MainPID']}.json")

    # The journal: structured fields on every entry, the node's id among them.
    started = wait_for(lambda: events(node, "agent.started"), 10, "agent.started in the journal")
    entry = started[0]
    assert entry["PLEACO_NODE"] == node_id and entry["SYSLOG_IDENTIFIER"] == "pleaco"
    assert entry["PRIORITY"] == "6" and entry["PLEACO_LOGGER"] == "pleaco.agent"
    assert entry["MESSAGE"].startswith("event=agent.started ")
    assert events(node, "systemd.ready"), "the agent logged no systemd.ready"
    # After=/Wants=docker.service: Docker was up before the agent asked it anything.
    assert not events(node, "systemd.docker_started")

    # A hung agent (SIGSTOP: no pings) is killed by the watchdog and started again.
    first_pid = shown["MainPID"]
    node.run("kill", "-STOP", first_pid)

    def restarted() -> dict[str, str] | None:
        now = node.show("ActiveState", "MainPID", "NRestarts", "StatusText")
        moved = now["MainPID"] not in ("0", first_pid) and int(now["NRestarts"]) >= 1
        return now if moved and now["ActiveState"] == "active" else None

    after = wait_for(restarted, 60, "the watchdog to restart the stopped agent", interval=0.5)
    assert after["StatusText"] == "0 apps, 0 replicas, cluster of 1", after
    systemd_lines = node.run("journalctl", "-u", "pleaco", "--no-pager", "-o", "cat", "_PID=1")
    assert "Watchdog timeout" in systemd_lines, systemd_lines
    wait_for(lambda: client.status()["node_id"] == node_id, 20, "the restarted agent's API")  # same node
    assert len(events(node, "agent.started")) == 2

    # A clean stop: STOPPING=1, exit 0, not restarted (Restart=on-failure).
    node.run("systemctl", "stop", "pleaco")
    final = node.show("ActiveState", "Result", "NRestarts")
    assert final["ActiveState"] == "inactive" and final["Result"] == "success", final
    assert events(node, "agent.stopped")


def test_when_docker_is_down_at_start_the_agent_asks_systemd_to_start_it(node: Node) -> None:
    install_unit(node)
    # Docker failed at boot: pleaco's Wants= started it and it failed; pleaco starts anyway.
    node.put("/etc/systemd/system/docker.service.d/fail.conf", "[Service]\nEnvironment=FAIL_FIRST=1\n")
    node.run("systemctl", "daemon-reload")
    node.run("systemctl", "start", "pleaco")
    assert node.show("ActiveState")["ActiveState"] == "active"
    asked = wait_for(lambda: events(node, "systemd.docker_started"), 10, "systemd.docker_started")
    assert asked[0]["PLEACO_UNIT"] == "docker.service" and asked[0]["PLEACO_JOB"].startswith("/org/freedesktop/")
    wait_for(lambda: node.show_unit("docker", "ActiveState")["ActiveState"] == "active", 30,
             "docker.service to be active")  # the job the agent queued runs
    # The engine answers the agent now: its app loop says so.
    wait_for(lambda: events(node, "engine.reachable"), 30, "engine.reachable after docker.service started")


def test_a_loop_stuck_on_a_hung_engine_withholds_the_watchdog_and_systemd_restarts_the_agent(node: Node) -> None:
    install_unit(node)
    # A loop is stuck after 3 s in one step; an engine call waits up to 60 s.
    node.put("/etc/systemd/system/pleaco.service.d/stuck.conf",
             "[Service]\nEnvironment=PLEACO_LOOP_STUCK_AFTER=3\nEnvironment=PLEACO_DOCKER_TIMEOUT=60\n")
    node.run("systemctl", "daemon-reload")
    node.run("systemctl", "start", "pleaco")
    first_pid = node.show("MainPID")["MainPID"]
    wait_for(lambda: events(node, "engine.reachable"), 20, "the agent to reach the engine")
    # Docker hangs: its process stopped, connections are accepted by the kernel and never
    # answered, so the app loop's next engine call blocks. The agent itself runs on.
    docker_pid = node.show_unit("docker", "MainPID")["MainPID"]
    node.run("kill", "-STOP", docker_pid)
    try:
        withheld = wait_for(lambda: events(node, "systemd.watchdog_withheld"), 30, "systemd.watchdog_withheld")
        assert "apps" in withheld[0]["PLEACO_LOOP"].split(","), withheld
        assert withheld[0]["_PID"] == first_pid  # logged by the running agent: it was not hung itself
        wait_for(lambda: int(node.show("NRestarts")["NRestarts"]) >= 1, 30, "systemd to restart the agent")
        systemd_lines = node.run("journalctl", "-u", "pleaco", "--no-pager", "-o", "cat", "_PID=1")
        assert "Watchdog timeout" in systemd_lines, systemd_lines
    finally:
        node.run("kill", "-CONT", docker_pid)

    def running_again() -> bool:
        now = node.show("ActiveState", "MainPID")
        return now["ActiveState"] == "active" and now["MainPID"] not in ("0", first_pid)

    wait_for(running_again, 60, "the agent to run again once Docker answers")
