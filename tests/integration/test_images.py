"""An image built (or loaded) on one node reaches another over the cluster's own channel:
two agents, each on its own Docker Engine (a second dockerd with its own data root)."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
from agentproc import AgentProcess, free_port, wait_for
from conftest import HELLO

Factory = Callable[..., AgentProcess]
BRIDGE = "pl-d2br"


@pytest.fixture
def second_engine() -> Iterator[str]:
    """A second Docker Engine on this host, with a data root, socket and bridge of its own.

    Its own bridge matters: a dockerd started with ``--bridge none`` deletes docker0, which
    would cut the main engine's containers off."""
    root = Path(tempfile.mkdtemp(prefix="pl-d2-", dir="/tmp"))
    sock = root / "docker.sock"
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True, capture_output=True)
    subprocess.run(["ip", "addr", "add", "10.77.70.1/24", "dev", BRIDGE], check=True, capture_output=True)
    subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True, capture_output=True)
    proc = subprocess.Popen(
        ["dockerd", "--data-root", str(root / "data"), "--exec-root", str(root / "exec"), "-H", f"unix://{sock}",
         "--pidfile", str(root / "docker.pid"), "--bridge", BRIDGE, "--iptables=false", "--ip-masq=false"],
        stdout=subprocess.DEVNULL, stderr=open(root / "dockerd.log", "wb"),  # noqa: SIM115
    )
    url = f"unix://{sock}"
    try:
        wait_for(lambda: docker.APIClient(base_url=url, version="1.41").ping(), 60, "the second engine")
        yield url
    finally:
        with contextlib.suppress(Exception):
            client = docker.APIClient(base_url=url, version="1.41", timeout=10)
            for c in client.containers(all=True):
                client.remove_container(c["Id"], force=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        subprocess.run(["umount", "-R", str(root / "data")], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def test_a_node_fetches_an_image_it_lacks_from_another_node(agent_factory: Factory, second_engine: str) -> None:
    engine2 = docker.APIClient(base_url=second_engine, version="1.41")
    with pytest.raises(docker.errors.ImageNotFound):
        engine2.inspect_image(HELLO)
    common = ["--proxy-image=", "--discovery", "seeds"]
    a = agent_factory("a", extra_args=[*common, "--gossip-listen", f"127.0.0.2:{free_port()}"])
    a.client.request("POST", "/v1/cluster/init")
    token = a.client.request("GET", "/v1/cluster/token")["token"]
    b = agent_factory("b", extra_args=[*common, "--gossip-listen", f"127.0.0.3:{free_port()}",
                                       "--join-token", token, "--docker-url", second_engine])
    wait_for(lambda: {n["state"] for n in a.client.nodes()} == {"alive"} and len(a.client.nodes()) == 2, 30,
             "two members")
    # Two replicas: one on each node; b's engine has never seen the image.
    a.client.deploy("hello", {"image": HELLO, "replicas": 2})
    wait_for(lambda: engine2.inspect_image(HELLO), 60, "the image on b's engine, fetched from a")
    # The engine has the image as soon as `docker load` ends; b logs it once it checked.
    wait_for(lambda: "event=image.fetched" in b.log_path.read_text(), 30, "b logging the image fetched from a")
    assert "event=image.sent" in a.log_path.read_text()

    def b_runs_its_replica() -> bool:
        mine = engine2.containers(filters={"label": [f"pleaco.node={b.node_id}", "pleaco.app=hello"]})
        return len(mine) == 1 and mine[0]["State"] == "running"

    wait_for(b_runs_its_replica, 60, "b's replica running on b's engine")
    wait_for(lambda: a.client.app("hello")["running"] == 2, 30, "both replicas seen from a")
    assert Path("/sys/class/net/docker0").exists(), "the main engine's bridge must survive"
