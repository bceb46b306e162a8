"""The ``route`` records: each node's replicas of each app, for every node to see.

``route/APP/NODE`` holds NODE's instances of APP: state, health, where other nodes dial it
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

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, raw: dict[str, Any], node: str) -> InstanceStatus:
        return cls(int(raw["replica"]), str(raw["container"]), int(raw["release"]), str(raw["state"]),
                   bool(raw["healthy"]), raw.get("host_port"), int(raw.get("restarts", 0)),
                   raw.get("last_exit_code"), float(raw.get("backoff_s", 0.0)), str(raw.get("error", "")), node,
                   str(raw.get("address", "")), bool(raw.get("serving", False)))


class RouteTable:
    def __init__(self, store: Store, node_id: str) -> None:
        self.store = store
        self.node_id = node_id
        self._published: dict[str, list[dict[str, Any]]] = {}

    def publish(self, current: dict[str, list[InstanceStatus]], host: str) -> int:
        """Write this node's instances of each app (``current``: app -> instances) where they
        changed since the last write; an app missing from ``current`` has its record
        deleted. Only changes are written: a steady app costs nothing. Returns the writes."""
        values = {app: [{**i.to_json(), "backoff_s": 0.0} for i in insts]  # without the countdown,
                  for app, insts in current.items() if insts}           # which changes every pass
        writes: list[tuple[str, str, dict[str, Any] | None]] = []
        for app in set(self._published) | set(values):
            instances = values.get(app)
            if self._published.get(app) == instances:
                continue
            key = f"{app}/{self.node_id}"
            if instances is None:
                self._published.pop(app, None)
                if self.store.value("route", key) is None:
                    continue
                writes.append(("route", key, None))
            else:
                writes.append(("route", key, {"app": app, "node": self.node_id, "host": host,
                                              "instances": instances}))
                self._published[app] = instances
        if writes:
            self.store.put_many(writes)
        return len(writes)

    def instances(self, app: str, live: Collection[str], include_own: bool = False) -> list[InstanceStatus]:
        """The app's replicas on the live nodes as their ``route`` records say (this node's
        own only with ``include_own``: the node's own view is fresher than its record)."""
        out = []
        for rec in self.store.records("route", prefix=f"{app}/"):
            value = rec.value or {}
            node = value.get("node")
            if value.get("app") != app or node not in live or (node == self.node_id and not include_own):
                continue
            for raw in value.get("instances") or []:
                try:
                    out.append(InstanceStatus.from_json(raw, str(node)))
                except (KeyError, TypeError, ValueError):
                    continue
        return out
