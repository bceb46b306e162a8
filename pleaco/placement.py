"""Leaderless placement: rendezvous (highest-random-weight) hashing.

Every node computes, from the same replicated state, which node owns each replica, and runs
only its own. Rendezvous hashing moves only the replicas of a node that joins or leaves.
Weights let a bigger node take proportionally more replicas (Schindelhauer & Schomaker's
weighted HRW: score = -weight / ln(h), h uniform in (0, 1)).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence


def _score(app: str, replica: int, node_id: str, weight: float) -> float:
    digest = hashlib.blake2b(f"{app}/{replica}/{node_id}".encode(), digest_size=8).digest()
    h = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # uniform in (0, 1)
    return -weight / math.log(h)


def owner(app: str, replica: int, nodes: Sequence[str], weights: Mapping[str, float] | None = None) -> str:
    """The node ranked first for one replica, ignoring load (plain rendezvous)."""
    if not nodes:
        raise ValueError("no live nodes to place on")
    weights = weights or {}
    return max(nodes, key=lambda n: (_score(app, replica, n, weights.get(n, 1.0)), n))


def assign(app: str, replicas: int, nodes: Sequence[str], weights: Mapping[str, float] | None = None) -> list[str]:
    """The node of every replica of ``app``: rendezvous hashing with bounded load.

    Plain rendezvous hashing is lumpy for the handful of replicas an app has (6 replicas
    on 4 nodes often leave a node empty). So each replica goes to its highest-ranked node
    that is still below its fair share, ceil(replicas * weight / total weight). The result
    depends only on the inputs, so every node computes the same assignment.
    """
    if not nodes:
        raise ValueError("no live nodes to place on")
    weights = weights or {}
    ordered = sorted(set(nodes))
    total = sum(weights.get(n, 1.0) for n in ordered)
    # Each node's fair share, rounded down; the replicas left over go, one each, to the
    # first nodes that want one more, so shares differ by at most one (equal weights).
    floor = {n: math.floor(replicas * weights.get(n, 1.0) / total) for n in ordered}
    load = dict.fromkeys(ordered, 0)
    out = []
    for i in range(replicas):
        ranked = sorted(ordered, key=lambda n: (_score(app, i, n, weights.get(n, 1.0)), n), reverse=True)
        chosen = next((n for n in ranked if load[n] < floor[n]), None)
        if chosen is None:
            chosen = next((n for n in ranked if load[n] == floor[n]), ranked[0])
        load[chosen] += 1
        out.append(chosen)
    return out


def owned_replicas(
    app: str,
    replicas: int,
    nodes: Sequence[str],
    me: str,
    weights: Mapping[str, float] | None = None,
) -> list[int]:
    """The replica indexes of ``app`` that node ``me`` runs."""
    if len(nodes) == 1 and nodes[0] == me:
        return list(range(replicas))
    return [i for i, n in enumerate(assign(app, replicas, nodes, weights)) if n == me]


def app_owner(app: str, nodes: Sequence[str]) -> str:
    """The node that decides once for the whole cluster what must be decided once per app
    (roll back, build, poll its repository): plain rendezvous over the live nodes, so when
    the owner dies the next-ranked node takes over, and only that app's decisions move."""
    if not nodes:
        raise ValueError("no live nodes to choose an owner from")
    return max(nodes, key=lambda n: (_score(f"owner:{app}", 0, n, 1.0), n))


class Owners:
    """This node's answer to "is it mine to decide?" for each app."""

    def __init__(self, me: str, live_nodes: Callable[[], Sequence[str]]) -> None:
        self.me = me
        self.live_nodes = live_nodes

    def owner(self, app: str) -> str | None:
        """The app's owner, None while this node does not know the live nodes yet."""
        nodes = list(self.live_nodes())
        return app_owner(app, nodes) if nodes else None

    def owns(self, app: str) -> bool:
        return self.owner(app) == self.me
