"""Automatic rollback, decided once for the whole cluster by the app's owner.

A release whose replicas are not all healthy, anywhere in the cluster, within
``rollout.deadline`` seconds of its creation is rolled back to the release before it
(``AppStore.rollback``: a new revision with the old spec and the reason). Only the app's
owner (rendezvous over the live nodes, pleaco.placement.Owners) judges it, from the
cluster-wide health: this node's own view and the other nodes' ``route`` records. The
deadline counts from the release record's creation time, so when the owner dies mid-rollout
the next owner continues the same countdown; the verdict (``healthy``, ``rolled_back``,
``failed``) is written into the release record, so no later owner judges it again.

A rollback is itself never rolled back automatically, so two bad releases in a row cannot
make pleaco flip between them; it stays, and ``apps show`` says what happened. While a new
release is failing, the old replicas keep serving (start-first: they are only drained once
their replacement is healthy), so a failed rollout costs no requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from pleaco import logs
from pleaco.apps import AppSpec, AppStore, NoEarlierRelease, NotFound, ValidationError
from pleaco.metrics import Counter, Registry
from pleaco.placement import Owners
from pleaco.reconcile.config import RolloutConfig
from pleaco.reconcile.loop import Loop
from pleaco.reconcile.routes import InstanceStatus, RouteTable
from pleaco.reconcile.status import local_instances
from pleaco.reconcile.view import NodeView

log = logs.get("pleaco.reconcile.rollout")

# A release older than this many deadlines without a verdict predates verdicts (an agent
# upgraded from before them) or was never judged: it is left alone rather than rolled
# back long after the fact.
STALE_AFTER_DEADLINES = 3


class RolloutGuard(Loop):
    name = "rollouts"
    interval = 1.0  # the deadline is tens of seconds; a second is precise enough

    def __init__(self, cfg: RolloutConfig, view: NodeView, routes: RouteTable, owners: Owners,
                 registry: Registry, live_nodes: Callable[[], Collection[str]],
                 on_rollback: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self.cfg = cfg
        self.view = view
        self.apps: AppStore = view.apps
        self.routes = routes
        self.owners = owners
        self.live_nodes = live_nodes
        self.on_rollback = on_rollback
        self.settled: set[tuple[str, int]] = set()  # judged (here or by an earlier owner)
        self.m_rollbacks = registry.register(
            Counter("pleaco_rollbacks_total", "Automatic rollbacks of releases that failed health.", ("app",))
        )

    async def step(self) -> str | None:
        self.check(time.time())
        return None

    def instances(self, spec: AppSpec) -> list[InstanceStatus]:
        """Every replica of the app in the cluster: this node's view, the others' records."""
        return local_instances(self.view, spec) + self.routes.instances(spec.name, set(self.live_nodes()))

    def healthy(self, spec: AppSpec) -> bool | None:
        """True when every wanted replica runs the current release healthily somewhere;
        None when the app wants no replica (nothing to judge)."""
        wanted = self.apps.replicas(spec.name)
        if wanted == 0:
            return None
        ok = {i.replica for i in self.instances(spec) if i.release == spec.revision and i.healthy}
        return all(r in ok for r in range(wanted))

    def check(self, now: float) -> None:
        """Judge the current release of every app this node owns (``now``: wall seconds)."""
        if not self.view.observed.engine_ok:
            return  # this node cannot see its own replicas: no verdict
        specs = self.apps.wanted_specs()  # an app that wants no replica has nothing to judge
        self.settled &= {(s.name, s.revision) for s in specs}
        for spec in specs:
            key = (spec.name, spec.revision)
            if key in self.settled or not self.owners.owns(spec.name):
                continue
            release = self.apps.release(spec.name, spec.revision)
            if release is None or release.get("verdict"):
                self.settled.add(key)
                continue
            age = now - int(release.get("created_ms", 0)) / 1000
            healthy = self.healthy(spec)
            if healthy:
                self.settled.add(key)
                self.apps.record_verdict(spec.name, spec.revision, "healthy")
                if spec.revision > 1:
                    log.info("rollout.healthy", app=spec.name, revision=spec.revision, seconds=round(age, 1))
            elif age > self.cfg.deadline * STALE_AFTER_DEADLINES:
                self.settled.add(key)
            elif healthy is not None and age >= self.cfg.deadline:
                self.settled.add(key)
                self._roll_back(spec, release, age)

    def _roll_back(self, spec: AppSpec, release: dict[str, object], waited: float) -> None:
        if not self.cfg.auto_rollback or "rollback_of" in release or spec.revision == 1:
            log.warning("rollout.failed", app=spec.name, revision=spec.revision, seconds=round(waited, 1),
                        rolled_back=False)
            self.apps.record_verdict(spec.name, spec.revision, "failed",
                                     f"not healthy within {self.cfg.deadline:g}s; not rolled back")
            return
        problems = sorted({i.error for i in self.instances(spec) if i.release == spec.revision and i.error})
        reason = (f"revision {spec.revision} was not healthy within {self.cfg.deadline:g}s"
                  + (f" ({'; '.join(problems)})" if problems else ""))
        try:
            new = self.apps.rollback(spec.name, reason=reason)
        except (NoEarlierRelease, NotFound, ValidationError) as exc:
            log.warning("rollout.failed", app=spec.name, revision=spec.revision, rolled_back=False, error=str(exc))
            return
        self.apps.record_verdict(spec.name, spec.revision, "rolled_back", reason)
        self.m_rollbacks.inc(app=spec.name)
        log.warning("rollout.rolled_back", app=spec.name, failed_revision=spec.revision,
                    revision=new.revision, image=new.image, reason=reason)
        self.on_rollback()
