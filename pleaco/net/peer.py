"""What the mesh knows of each node, and the seam between the network loop and the mesh.

The network loop (pleaco/reconcile/network.py) reads the store and the membership into one
``Peer`` per live node with a subnet; the mesh (host-gw routes or WireGuard) makes the
kernel match that list. The mesh never reads the store and the loop never touches the
kernel's routes: each side can be tested alone, the mesh in network namespaces with a
hand-made list, the loop with ``NoMesh``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Peer:
    """One node of the mesh as every other node sees it."""

    node_id: str
    # Its host address (the advertised address without the port): where routes point
    # (host-gw) and WireGuard sends (endpoint).
    host: str
    # Its container subnet (claimed through its ``subnet`` record).
    subnet: ipaddress.IPv4Network
    # Its WireGuard public key (base64, verified against the node's Ed25519 identity), ""
    # when it runs no WireGuard.
    wg_key: str = ""
    # Its WireGuard UDP port, 0 when it runs no WireGuard.
    wg_port: int = 0


class Mesh(Protocol):
    """Makes this host reach every peer's subnet, and nothing else."""

    def apply(self, me: Peer, peers: Sequence[Peer]) -> None:
        """Make routes (and tunnels) match ``peers`` exactly: add the missing, replace the
        changed, remove those of nodes no longer listed. Safe to call again at any time."""

    def close(self) -> None:
        """Remove everything the mesh made (agent stop): nothing is left behind."""


class NoMesh:
    """No routes between nodes (one node, or the network disabled)."""

    def apply(self, me: Peer, peers: Sequence[Peer]) -> None:
        return None

    def close(self) -> None:
        return None
