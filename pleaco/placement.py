"""Leaderless placement: rendezvous (highest-random-weight) hashing.

Every node computes, from the same replicated state, which node owns each replica, and runs
only its own. Rendezvous hashing moves only the replicas of a node that joins or leaves.
Weights let a bigger node take proportionally more replicas (Schindelhauer & Schomaker's
weighted HRW: score = -weight / ln(h), h uniform in (0, 1)).

Memory: a replica with a memory limit reserves that much of its node's memory (the total
the node advertises, from /proc/meminfo), and a node is given no more replicas than its
memory holds (``plan``). Apps are placed in name order, each against what the apps before
it left, so every node, with the same records, reaches the same plan. Kept simple: the
limits are counted against the node's whole memory (no reserve for the host, as Docker's
own limits are not), replicas without a limit are not counted, and a replica that fits on
no live node is left unplaced (None) rather than overcommitting one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pleaco.constraints import Constraint, eligible


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
    placed = _assign(app, replicas, nodes, weights, None)
    return [n for n in placed if n is not None]


def _assign(app: str, replicas: int, nodes: Sequence[str], weights: Mapping[str, float] | None,
            room: Mapping[str, int] | None) -> list[str | None]:
    """``assign``, where a node takes at most ``room[node]`` of the replicas (None: no
    limit) and a replica with no room anywhere is None. A node short of room gives its
    share to the next-ranked nodes that have some."""
    if not nodes:
        raise ValueError("no live nodes to place on")
    weights = weights or {}
    ordered = sorted(set(nodes))
    total = sum(weights.get(n, 1.0) for n in ordered)
    # Each node's fair share, rounded down; the replicas left over go, one each, to the
    # first nodes that want one more, so shares differ by at most one (equal weights).
    floor = {n: math.floor(replicas * weights.get(n, 1.0) / total) for n in ordered}
    load = dict.fromkeys(ordered, 0)
    out: list[str | None] = []
    for i in range(replicas):
        ranked = sorted(ordered, key=lambda n: (_score(app, i, n, weights.get(n, 1.0)), n), reverse=True)
        if room is not None:
            ranked = [n for n in ranked if load[n] < room.get(n, replicas)]
            if not ranked:
                out.append(None)
                continue
        chosen = next((n for n in ranked if load[n] < floor[n]), None)
        if chosen is None:
            chosen = next((n for n in ranked if load[n] == floor[n]), ranked[0])
        load[chosen] += 1
        out.append(chosen)
    return out


@dataclass(frozen=True)
class Demand:
    """What one app asks of the cluster: replicas, and the memory each reserves (None:
    not counted)."""

    app: str
    replicas: int
    memory: int | None = None
    # Only nodes whose labels meet all of these take its replicas (pleaco.constraints).
    constraints: tuple[Constraint, ...] = ()
    # Only these nodes take its replicas (None: any): the node that holds the app's volumes
    # (pleaco.stacks.volumes), or none at all while that node is down or not chosen yet.
    only: frozenset[str] | None = None


def plan(demands: Sequence[Demand], nodes: Sequence[str], weights: Mapping[str, float] | None = None,
         memory: Mapping[str, int] | None = None,
         labels: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, list[str | None]]:
    """The node of every replica of every app (None: fits on no node), given each node's
    memory (bytes; a node missing from ``memory`` is not limited) and labels (for the
    apps' constraints: the candidates are filtered first, then ranked as ever, so the
    replicas of an app without constraints go where they always did). Without memory
    limits or constraints it is ``assign`` for each app."""
    free = {n: memory[n] for n in nodes if memory is not None and n in memory}
    out: dict[str, list[str | None]] = {}
    for d in sorted(demands, key=lambda d: d.app):
        candidates = eligible(d.constraints, nodes, labels or {})
        if d.only is not None:
            candidates = [n for n in candidates if n in d.only]
        if not candidates:
            out[d.app] = [None] * d.replicas if nodes else []
            continue
        if not d.memory or not free:
            out[d.app] = list(assign(d.app, d.replicas, candidates, weights))
            continue
        each = d.memory
        room = {n: max(0, free[n]) // each for n in free}
        placed = _assign(d.app, d.replicas, candidates, weights, room)
        for n in placed:
            if n is not None and n in free:
                free[n] -= each
        out[d.app] = placed
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
