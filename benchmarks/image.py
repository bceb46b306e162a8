"""The golden image: boot to joined-and-healthy per node, the image's size, and how fast
the mesh's routes follow a join and a death.

Three nodes of ``pleaco/node`` (``make image``), containers with systemd as PID 1 and a
Docker Engine each (tests/integration/imagenodes.py, the system test's nodes), configured
as cloud-init would (mDNS, ``bootstrap = "auto"``):

- **boot to joined and healthy**, per node: from ``docker start`` until the node's own API
  lists three alive members and its engine answers (status ``engine.reachable``). The
  baseline, in the same run: the bare base image (``pleaco/image-base``: Debian, systemd,
  Docker Engine, no pleaco) from ``docker start`` until systemd reports the system
  running and its engine answers: what booting costs without pleaco.
- **image size**: ``pleaco/node`` against its base; the qcow2 (goal < 1 GiB) cannot be
  built on these machines (no KVM, no internet for Debian's cloud image): stated, not measured.
- **route convergence** (issue 14): nodes 1 and 2 up; node 3 started: from the moment node
  1 sees it alive until nodes 1 and 2 each hold a mesh route (``proto 210``) to its
  subnet; node 3 killed (``docker kill``): from the kill until both have removed it
  (failure detection, then the next network pass).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from typing import Any

import docker

from benchmarks.common import BenchError, Row, log
from pleaco.net.config import NetworkSettings
from tests.integration.imagenodes import IMAGE, RUN_ARGS, Node, image_nodes, image_present

BASE = "pleaco/image-base:bookworm"
SECRET = "benchmark-bootstrap-secret"
POLL = 0.1
DEADLINE = 180.0
ROUTE_PROTO = NetworkSettings().route_protocol


def _config(index: int, ip: str) -> str:
    return f'name = "node{index + 1}"\ndiscovery = "mdns"\nbootstrap = "auto"\nbootstrap_secret = "{SECRET}"\n'


def _until(cond: Any, what: str, deadline: float = DEADLINE) -> float:
    """Poll ``cond`` until true; the monotonic time it first was."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if cond():
            return time.monotonic()
        time.sleep(POLL)
    raise BenchError(f"image: {what} did not happen within {deadline:.0f} s")


def _joined_and_healthy(node: Node, count: int) -> bool:
    try:
        client = node.client()
        alive = [n for n in client.nodes() if n["state"] == "alive"]
        return len(alive) == count and bool(client.status()["engine"]["reachable"])
    except Exception:
        return False


def _mesh_routes(node: Node) -> int:
    rc, out = node.sh(f"ip -4 route show proto {ROUTE_PROTO}")
    return len(out.strip().splitlines()) if rc == 0 else -1


def _base_boot() -> float:
    """The bare base image: docker start to systemd running and its engine answering."""
    client = docker.from_env()
    volume = client.volumes.create("pl-bench-base-docker")
    container = client.containers.create(BASE, detach=True, name="pl-bench-base",
                                         volumes={volume.name: {"bind": "/var/lib/docker", "mode": "rw"},
                                                  "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}},
                                         **RUN_ARGS)
    try:
        t0 = time.monotonic()
        container.start()

        def up() -> bool:
            done = subprocess.run(["docker", "exec", container.id, "sh", "-c",
                                   "systemctl is-system-running; docker info -f '{{.ServerVersion}}'"],
                                  capture_output=True, text=True)
            lines = done.stdout.split()
            return len(lines) == 2 and lines[0] in ("running", "degraded")

        return _until(up, "the base image's boot") - t0
    finally:
        container.remove(force=True, v=True)
        volume.remove(force=True)
        client.close()


def run(opts: argparse.Namespace) -> list[Row]:
    if not image_present():
        raise BenchError(f"image: no {IMAGE}: run `make image` first")
    client = docker.from_env()
    size = client.images.get(IMAGE).attrs["Size"] / 1e6
    base_size = client.images.get(BASE).attrs["Size"] / 1e6
    client.close()
    boots: list[float] = []
    base_boots: list[float] = []
    joins: list[float] = []
    deaths: list[float] = []
    for r in range(opts.rounds):
        log(f"image: round {r + 1}: the base image's boot")
        base_boots.append(_base_boot())
        log(f"image: round {r + 1}: three nodes")
        with image_nodes(3, "bi", 81, _config, start=0) as (nodes, _gateway):
            started = {}
            for node in nodes[:2]:
                started[node.name] = time.monotonic()
                node.container.start()
            for node in nodes[:2]:
                boots.append(_until(lambda n=node: _joined_and_healthy(n, 2), f"{node.name} joined") -
                             started[node.name])
            _until(lambda: all(_mesh_routes(n) == 1 for n in nodes[:2]), "routes between nodes 1 and 2")
            third = nodes[2]
            t0 = time.monotonic()
            third.container.start()
            boots.append(_until(lambda n=third: _joined_and_healthy(n, 3), f"{third.name} joined") - t0)
            seen = _until(lambda: _joined_and_healthy(nodes[0], 3), "node 3 alive in node 1's view")
            joins.append(_until(lambda: all(_mesh_routes(n) == 2 for n in nodes[:2]), "routes to node 3") - seen)
            killed = time.monotonic()
            third.container.kill()
            deaths.append(_until(lambda: all(_mesh_routes(n) == 1 for n in nodes[:2]), "routes to node 3 gone")
                          - killed)
    boot, base = statistics.median(boots), statistics.median(base_boots)
    details = {"boots_s": [round(b, 2) for b in boots], "base_boots_s": [round(b, 2) for b in base_boots],
               "route_join_s": [round(j, 2) for j in joins], "route_death_s": [round(d, 2) for d in deaths]}
    return [
        Row("image boot to joined and healthy, per node", "s", boot, base, "base image booted", "", None, details),
        Row("image size (docker source)", "MB", size, base_size, "its Debian base", "qcow2 < 1 GiB: not measured",
            None, {}),
        Row("mesh routes after a join", "s", statistics.median(joins), None, "", "", None, {}),
        Row("mesh routes after a death (kill)", "s", statistics.median(deaths), None, "", "", None, {}),
    ]
