"""Leaderless placement: rendezvous (highest-random-weight) hashing.

Every node computes, from the same replicated state, which node owns each replica, and runs
only its own. Rendezvous hashing moves only the replicas of a node that joins or leaves.
Weights let a bigger node take proportionally more replicas (Schindelhauer & Schomaker's
weighted HRW: score = -weight / ln(h), h uniform in (0, 1)).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence


def _score(app: str, replica: int, node_id: str, weight: float) -> float:
    digest = hashlib.blake2b(f"{app}/{replica}/{node_id}".encode(), digest_size=8).digest()
    h = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # uniform in (0, 1)
    return -weight / math.log(h)


def owner(app: str, replica: int, nodes: Sequence[str], weights: Mapping[str, float] | None = None) -> str:
    """The node that runs replica ``replica`` of ``app``."""
    if not nodes:
        raise ValueError("no live nodes to place on")
    weights = weights or {}
    return max(nodes, key=lambda n: (_score(app, replica, n, weights.get(n, 1.0)), n))


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
    return [i for i in range(replicas) if owner(app, i, nodes, weights) == me]
