"""What ``apps show`` says about an app: this node's view and the other nodes' route records.

Apart from the app loop: the status is a read of ``NodeView`` and ``RouteTable``, computed
when asked (the API) and when the app loop writes this node's route records.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pleaco.apps import AppSpec, format_memory
from pleaco.reconcile.routes import InstanceStatus, RouteTable
from pleaco.reconcile.view import NodeView


@dataclass(frozen=True)
class AppStatus:
    """An app as this node sees it: the spec, the desired count and its own replicas."""

    spec: AppSpec
    replicas: int
    running: int
    healthy: int
    state: str  # running | starting | degraded | stopped | image_missing | crashloop | engine_unreachable
    #             | unschedulable (constraints no live node meets)
    #             | volume_unavailable (the node that holds its volumes is down, or not chosen yet)
    message: str
    instances: list[InstanceStatus]
    # Set when this release is a rollback: {"from": revision, "to": revision, "reason": why}.
    rollback: dict[str, Any] | None = None
    # The autoscale policy (AutoscalePolicy.to_value()), None when the count is set by hand.
    autoscale: dict[str, Any] | None = None
    # What the autoscaler did, from its decision record (None when the app is not
    # autoscaled): {"panic": bool, "decided_by": node, "decisions": [{at_ms, node, from,
    # to, panic, reason}, ...] oldest first}. The API adds the live figures to it.
    autoscaler: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "image": self.spec.image,
            "revision": self.spec.revision,
            "port": self.spec.port,
            "env": self.spec.env,
            "health": self.spec.health,
            "health_cmd": self.spec.health_cmd.to_value() if self.spec.health_cmd else None,
            "host": self.spec.host,
            "https": self.spec.https or "on",
            "memory": self.spec.memory,
            "cpus": self.spec.cpus,
            "pids": self.spec.pids,
            "max_conns": self.spec.max_conns,
            "constraints": list(self.spec.constraints),
            "volumes": [m.to_value() for m in self.spec.volumes],
            "command": None if self.spec.command is None else list(self.spec.command),
            "entrypoint": None if self.spec.entrypoint is None else list(self.spec.entrypoint),
            "stack": self.spec.stack,
            "secrets": sorted(self.spec.secrets),
            "rollback": self.rollback,
            "autoscale": self.autoscale,
            "autoscaler": self.autoscaler,
            "replicas": self.replicas,
            "running": self.running,
            "healthy": self.healthy,
            "state": self.state,
            "message": self.message,
            "instances": [i.to_json() for i in self.instances],
        }


def local_instances(view: NodeView, spec: AppSpec) -> list[InstanceStatus]:
    """This node's replicas of an app, as the app loop last observed them."""
    now = time.monotonic()
    instances = []
    for c in sorted(view.containers_of(spec.name), key=lambda c: (c.replica, c.release)):
        st = view.replicas.get((c.app, c.replica))
        instances.append(
            InstanceStatus(
                replica=c.replica,
                container=c.id[:12],
                release=c.release,
                state=c.state,
                healthy=view.healthy(c, spec),
                host_port=c.host_port,
                restarts=st.restarts if st else 0,
                last_exit_code=st.last_exit_code if st else None,
                backoff_s=round(max(0.0, st.backoff.next_attempt - now), 1) if st and not c.running else 0.0,
                error=st.last_error if st else "",
                node=view.node_id,
                address=view.address(c, spec),
                serving=view.serving(c, spec),
                draining=view.drain.draining(c.id),
            )
        )
    return instances


def app_status(view: NodeView, routes: RouteTable, live: Collection[str], spec: AppSpec,
               replicas: int) -> AppStatus:
    """Summarise an app: this node's replicas as last observed, and the other live nodes'
    replicas as their ``route`` records last said."""
    instances = local_instances(view, spec) + routes.instances(spec.name, live)
    instances.sort(key=lambda i: (i.replica, i.release, i.node))
    wanted = [i for i in instances if i.release == spec.revision and i.replica < replicas]
    # Distinct replicas: while a replica moves between nodes both copies may be seen.
    running = len({i.replica for i in wanted if i.state == "running"})
    healthy = len({i.replica for i in wanted if i.healthy})
    crashing = [i for i in wanted if i.state != "running" and i.restarts + (i.last_exit_code is not None) > 0]
    if not view.observed.engine_ok:
        state, message = "engine_unreachable", view.observed.engine_error
    elif view.image_missing(spec.image) and healthy < replicas:
        state = "image_missing"
        message = f"image {spec.image!r} is not present on this node; the app starts once it is"
    elif view.cluster_network and not view.network and replicas > 0 and healthy < replicas:
        state = "degraded" if healthy else "starting"
        message = f"replicas wait for this node's network: {view.network_error or 'not made yet'}"
    elif replicas == 0:
        state, message = "stopped", "scaled to 0"
    elif (why := view.volume_waits.get(spec.name)) and healthy < replicas:
        state, message = "volume_unavailable", why
    elif (why := view.unschedulable.get(spec.name)) and healthy < replicas:
        # Constraints no node meets: say so, rather than wait for replicas that never come.
        state = "unschedulable"
        message = f"{why}: none of its {replicas} replicas can run (label a node: pleaco nodes label NODE KEY=VALUE)"
    elif crashing and healthy < replicas:
        worst = max(crashing, key=lambda i: i.restarts)
        state = "crashloop"
        message = (
            f"replica {worst.replica} {worst.error or 'crashed'}; "
            f"restarted {worst.restarts} times, next try in {worst.backoff_s}s"
        )
    elif healthy >= replicas:
        state, message = "running", ""
    elif refused := [(idx, st) for idx in range(replicas)
                     if (st := view.replicas.get((spec.name, idx))) is not None
                     and st.start_error.startswith(f"release {spec.revision}: ")]:
        idx, st = refused[0]
        state = "degraded" if healthy else "starting"
        message = (f"replica {idx} cannot start: {st.start_error.partition(': ')[2]}; "
                   f"next try in {round(max(0.0, st.backoff.next_attempt - time.monotonic()), 1)}s")
    elif (unplaced := view.unplaced.get(spec.name, 0)) and spec.memory:
        state = "degraded" if healthy else "starting"
        message = (f"{unplaced} of {replicas} replicas fit on no node: each needs {format_memory(spec.memory)} "
                   "of memory and the nodes' is taken")
    elif healthy > 0:
        state, message = "degraded", f"{healthy} of {replicas} replicas healthy"
    else:
        state, message = "starting", f"0 of {replicas} replicas healthy"
    rollback = None
    release = view.apps.release(spec.name, spec.revision)
    if release and "rollback_of" in release:
        rollback = {"from": release.get("rolled_back_from"), "to": release["rollback_of"],
                    "reason": release.get("reason", "by hand")}
        if state == "running":
            message = f"rolled back from revision {rollback['from']}: {rollback['reason']}"
    policy = view.apps.autoscale(spec.name)
    autoscaler = None
    if policy is not None:
        record = view.apps.decision(spec.name) or {}
        last = record.get("state")
        if not isinstance(last, dict):
            last = {}
        autoscaler = {"panic": bool(last.get("panic")), "decided_by": record.get("node"),
                      "decisions": list(record.get("history") or [])}
    return AppStatus(spec, replicas, running, healthy, state, message, instances, rollback,
                     policy.to_value() if policy is not None else None, autoscaler)
