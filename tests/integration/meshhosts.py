"""The kernel mesh driven in engine hosts (tests/integration/nethosts.py), as the network
loop drives it: each call a fresh ``KernelMesh`` in the host's network namespace (like an
agent after a restart), from a hand-made peer list. Shared by tests/integration/test_mesh.py
and benchmarks/network.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.integration.nethosts import EngineHost

MESH = """
import ipaddress, json, sys
from pathlib import Path
from pleaco.net.config import NetworkSettings
from pleaco.net.mesh import KernelMesh
from pleaco.net.peer import Peer
a = json.loads(sys.argv[1])
mesh = KernelMesh(NetworkSettings(**a["settings"]), Path(a["data"]))
peer = lambda d: Peer(d["node_id"], d["host"], ipaddress.IPv4Network(d["subnet"]), d["wg_key"], d["wg_port"])
if a["op"] == "apply":
    mesh.apply(peer(a["me"]), [peer(p) for p in a["peers"]])
else:
    mesh.close()
"""


def run_mesh(host: EngineHost, data: Path, op: str, me: dict[str, Any], peers: list[dict[str, Any]],
             settings: dict[str, Any]) -> None:
    """``KernelMesh(settings, data).apply(me, peers)`` (op "apply") or ``.close()`` in
    ``host``'s namespace; peers as dicts of Peer's fields, the subnet as text."""
    args = {"op": op, "data": str(data), "me": me, "peers": peers, "settings": settings}
    res = host.sh(sys.executable, "-c", MESH, json.dumps(args), check=False)
    if res.returncode != 0:
        raise RuntimeError(f"mesh {op} in {host.ns} failed: {res.stderr.strip()[-2000:]}")
