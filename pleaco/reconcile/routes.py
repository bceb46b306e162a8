"""The ``route`` records: each node's replicas of each app, for every node to see.

``route/APP/NODE/CONTAINER`` holds one of NODE's instances of APP: state, health, where others dial it
and whether it takes traffic. This module is their one writer (each node writes only its
own, from the app loop) and their one typed reader (the proxy's routing mesh, the rollout
guard's cluster-wide health, ``apps show``).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pleaco.store import Store


@dataclass(frozen=True)
class InstanceStatus:
    replica: int
    container: str
    release: int
    state: str
    healthy: bool
    host_port: int | None
    restarts: int
    last_exit_code: int | None
    backoff_s: float
    error: str
    node: str = ""  # the node that runs it
    # Where other nodes' proxies dial it (HOST:PORT), and whether it takes traffic now: what
    # the routing mesh reads from the ``route`` records.
    address: str = ""
    serving: bool = False
    # Out of service because its node is draining it (it served until then): it answers
    # until that node stops it (pleaco.reconcile.drain). What a proxy falls back on while a
    # rollout's records are on their way (pleaco.ingress.proxy._draining).
    draining: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, raw: dict[str, Any], node: str) -> InstanceStatus:
        return cls(int(raw["replica"]), str(raw["container"]), int(raw["release"]), str(raw["state"]),
                   bool(raw["healthy"]), raw.get("host_port"), int(raw.get("restarts", 0)),
                   raw.get("last_exit_code"), float(raw.get("backoff_s", 0.0)), str(raw.get("error", "")), node,
                   str(raw.get("address", "")), bool(raw.get("serving", False)),
                   bool(raw.get("draining", False)))


# A replica's last error as its record carries it at the most: the record then always
# fits in one gossip packet (pleaco.store.record), so a health change travels in the next
# packets. `apps show` on the node itself has the whole text.
ERROR_CHARS = 360


class RouteTable:
    def __init__(self, store: Store, node_id: str) -> None:
        self.store = store
        self.node_id = node_id
        # Our own records as last written (key -> value), so only changes are written. Read
        # back once at start: records of containers that went while the agent was down
        # (and records in the one-per-app format of earlier versions) are deleted.
        self._published: dict[str, dict[str, Any]] = {
            rec.key: rec.value for rec in store.records("route") if rec.value and rec.value.get("node") == node_id}

    def publish(self, current: dict[str, list[InstanceStatus]], host: str) -> int:
        """Write this node's instances (``current``: app -> instances) where they changed
        since the last write, one record per instance (``route/APP/NODE/CONTAINER``), so a
        health change is one small record whatever the replica count, and delete the
        records of instances that are gone. A steady app costs nothing. Returns the writes."""
        wanted: dict[str, dict[str, Any]] = {}
        for app, insts in current.items():
            for i in insts:
                # Without the back-off countdown, which changes every pass.
                wanted[f"{app}/{self.node_id}/{i.container}"] = {
                    **i.to_json(), "backoff_s": 0.0, "error": i.error[:ERROR_CHARS], "app": app,
                    "node": self.node_id, "host": host}
        writes: list[tuple[str, str, dict[str, Any] | None]] = [
            ("route", key, None) for key in self._published if key not in wanted]
        writes += [("route", key, value) for key, value in wanted.items() if self._published.get(key) != value]
        if writes:
            self.store.put_many(writes)
            self._published = wanted
        return len(writes)

    def instances(self, app: str, live: Collection[str], include_own: bool = False) -> list[InstanceStatus]:
        """The app's replicas on the live nodes as their ``route`` records say (this node's
        own only with ``include_own``: the node's own view is fresher than its records)."""
        out = []
        for rec in self.store.records("route", prefix=f"{app}/"):
            value = rec.value or {}
            node = value.get("node")
            if value.get("app") != app or node not in live or (node == self.node_id and not include_own):
                continue
            # One instance per record; a node of an earlier version writes them all in one.
            raws = value["instances"] if isinstance(value.get("instances"), list) else [value]
            for raw in raws:
                try:
                    out.append(InstanceStatus.from_json(raw, str(node)))
                except (KeyError, TypeError, ValueError):
                    continue
        return out
