"""Self-upgrade under real systemd: the repository's pleaco.service, unchanged ExecStart
(/opt/pleaco/current/bin/pleaco agent), in a Debian node whose PID 1 is systemd (the node
of test_systemd.py). The agent upgrades from a 0.2.0 slot to 0.3.0 by restarting its unit,
with the guard in a transient unit; a 0.3.0 whose agent exits at every start (systemd
restarting it on failure) is rolled back by that guard, and the app's container is the
same throughout.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from agentproc import REPO, docker_client, remove_node_containers, wait_for
from slotagents import ReleaseKit, Releases
from test_systemd import API_PORT, DOCKER_UNIT, FAKE_DOCKERD, VENV, Node
from test_systemd import node as node  # the node container: its fixture

from pleaco.api.client import Client

pytestmark = pytest.mark.docker

HELLO = "pleaco/hello:latest"


@pytest.fixture(scope="module")
def releases(release_kit: ReleaseKit) -> Releases:
    bundles = release_kit.bundles(["0.2.0", "0.3.0", "0.3.0-exits"])
    return Releases(release_kit, {"0.2.0": bundles["0.2.0"], "0.3.0": bundles["0.3.0"],
                                  "exits": bundles["0.3.0-exits"]})


def put_file(n: Node, path: str, data: bytes) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(Path(path).name)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    assert n.c.put_archive(str(Path(path).parent), buf.getvalue())


def dropin(public_key: str) -> str:
    return "\n".join([
        "[Service]",
        "Environment=PLEACO_PROXY_IMAGE=",
        "Environment=PLEACO_DISCOVERY=none",
        # The network off, as in test_systemd: the host's engine is shared with other tests.
        "Environment=PLEACO_NETWORK_ENABLED=false",
        f"Environment=PLEACO_API_LISTEN=0.0.0.0:{API_PORT}",
        f"Environment=PLEACO_UPGRADE_TRUSTED_KEYS={public_key}",
        "Environment=PLEACO_UPGRADE_HEALTH_DEADLINE=60",
        # The exit-at-start release is waited out for this long (default 10 s).
        "Environment=PLEACO_UPGRADE_AGENT_GONE_GRACE=5",
        "RestartSec=1",
        "",
    ])


INSTALL_FIRST_SLOT = """
import sys
from pathlib import Path
from pleaco.host.bundle import verify_bundle
from pleaco.host.slots import Slots
bundle = Path("/root/pleaco-0.2.0.bundle")
slots = Slots(Path("/opt/pleaco"))
slots.install(bundle, verify_bundle(bundle, [sys.argv[1]], "0.1.0"))
slots.flip("0.2.0")
"""


class Upgradable:
    def __init__(self, n: Node) -> None:
        self.n = n
        self.node_id = ""

    @property
    def client(self) -> Client:
        token = self.n.run("cat", "/var/lib/pleaco/admin.token").strip()
        return Client(f"http://{self.n.ip}:{API_PORT}", token, timeout=10)

    def version(self) -> str:
        return next(x["version"] for x in self.client.nodes() if x["id"] == self.node_id)

    def state(self) -> dict[str, Any]:
        out = self.n.run("cat", "/var/lib/pleaco/upgrade.json", check=False)
        try:
            return dict(json.loads(out))
        except ValueError:
            return {}

    def main_cmdline(self) -> str:
        pid = self.n.show("MainPID")["MainPID"]
        return self.n.run("cat", f"/proc/{pid}/cmdline", check=False).replace("\0", " ")

    def apply(self, bundle: str) -> str:
        return self.n.run("/opt/pleaco/current/bin/pleaco", "release", "apply", "--bundle", bundle,
                          "--data-dir", "/var/lib/pleaco")


def _container(node_id: str) -> tuple[str, str]:
    rows = docker_client().containers.list(filters={"label": [f"pleaco.node={node_id}", "pleaco.app=web"]})
    assert len(rows) == 1, [c.name for c in rows]  # running ones only
    return rows[0].id, rows[0].attrs["State"]["StartedAt"]


def test_upgrade_and_rollback_through_systemd(node: Node, releases: Releases) -> None:
    n = node
    for path in releases.bundles.values():
        put_file(n, f"/root/{path.name}", path.read_bytes())
    code, out = n.c.exec_run([f"{VENV}/bin/python", "-c", INSTALL_FIRST_SLOT, releases.public_key],
                             environment={"PYTHONPATH": str(REPO)})
    assert code == 0, out.decode(errors="replace")
    n.put("/usr/local/lib/fake-dockerd.py", FAKE_DOCKERD)
    n.put("/etc/systemd/system/docker.service", DOCKER_UNIT)
    n.put("/etc/systemd/system/pleaco.service", (REPO / "systemd" / "pleaco.service").read_text())
    n.put("/etc/systemd/system/pleaco.service.d/test.conf", dropin(releases.public_key))
    n.run("systemctl", "daemon-reload")
    n.run("systemctl", "start", "pleaco")  # Type=notify: returns once READY
    up = Upgradable(n)
    up.node_id = wait_for(lambda: up.client.status()["node_id"], 30, "the API")
    try:
        assert up.version() == "0.2.0" and "/opt/pleaco/current/bin/pleaco" in up.main_cmdline()
        # A replica without a port: the agent in the node runs it on the host's engine.
        up.client.deploy("web", {"image": HELLO, "replicas": 1})
        wait_for(lambda: _container(up.node_id), 60, "a running replica")
        before = _container(up.node_id)

        # A 0.3.0 whose agent exits at every start: systemd restarts it on failure until the
        # guard (a transient unit, outside pleaco.service) switches back and restarts the unit.
        assert "switched to 0.3.0" in up.apply("/root/pleaco-0.3.0-exits.bundle")
        wait_for(lambda: up.state().get("phase") == "rolled_back", 180, "the rollback")
        assert "0.3.0 agent exited before it was healthy" in up.state()["reason"]
        wait_for(lambda: up.version() == "0.2.0", 60, "the 0.2.0 agent answering again")
        assert n.run("readlink", "/opt/pleaco/current").strip() == "releases/0.2.0"
        assert "/opt/pleaco/releases/0.2.0/bin/python /opt/pleaco/current/bin/pleaco agent" in up.main_cmdline()
        assert _container(up.node_id) == before

        # The good 0.3.0 (another bundle of the same version: its slot is rebuilt) goes through.
        assert "switched to 0.3.0" in up.apply("/root/pleaco-0.3.0.bundle")
        wait_for(lambda: up.state().get("phase") == "confirmed", 180, "the trial confirmed")
        wait_for(lambda: up.version() == "0.3.0", 60, "the node record on 0.3.0")
        assert n.run("readlink", "/opt/pleaco/current").strip() == "releases/0.3.0"
        assert n.show("ActiveState")["ActiveState"] == "active"
        assert "/opt/pleaco/releases/0.3.0/bin/python /opt/pleaco/current/bin/pleaco agent" in up.main_cmdline()
        assert _container(up.node_id) == before
    finally:
        if up.node_id:
            remove_node_containers(up.node_id)
