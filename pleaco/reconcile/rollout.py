"""Automatic rollback: a release whose replicas on this node are not all healthy within
``rollout.deadline`` seconds of this node first seeing it is rolled back to the release
before it (``AppStore.rollback``, a new revision with the old spec and the reason).

A rollback is itself never rolled back automatically, so two bad releases in a row cannot
make pleaco flip between them; it stays, and ``apps show`` says what happened. While a new
release is failing, the old replicas keep serving (start-first: they are only drained once
their replacement is healthy), so a failed rollout costs no requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from pleaco import logs
from pleaco.apps import AppSpec, AppStore, NoEarlierRelease, NotFound, ValidationError
from pleaco.config import Config
from pleaco.metrics import Counter, Registry
from pleaco.placement import owned_replicas
from pleaco.reconcile.apps import AppReconciler

log = logs.get("pleaco.reconcile.rollout")

CHECK_INTERVAL = 1.0  # seconds; the deadline is tens of seconds, this is precise enough


class RolloutGuard:
    def __init__(self, cfg: Config, apps: AppStore, reconciler: AppReconciler, registry: Registry) -> None:
        self.cfg = cfg
        self.apps = apps
        self.rec = reconciler
        self.first_seen: dict[tuple[str, int], float] = {}
        self.settled: set[tuple[str, int]] = set()  # healthy once, or given up on
        self.m_rollbacks = registry.register(
            Counter("pleaco_rollbacks_total", "Automatic rollbacks of releases that failed health.", ("app",))
        )

    async def run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self.check(time.monotonic())
            await asyncio.sleep(CHECK_INTERVAL)

    def _healthy_here(self, spec: AppSpec, nodes: list[str], weights: dict[str, float]) -> bool | None:
        """True when every replica this node owns runs the current release healthily; None
        when this node owns none (nothing to judge). ``nodes`` and ``weights``: the live
        nodes and their weights, asked once per check rather than once per app."""
        # The same placement the app reconciler computes, so both judge the same replicas.
        owned = owned_replicas(spec.name, self.apps.replicas(spec.name), nodes, self.rec.node_id, weights)
        if not owned:
            return None
        current = {c.replica: c for c in self.rec.observed.containers
                   if c.app == spec.name and c.release == spec.revision and c.running}
        for idx in owned:
            st = self.rec.replicas.get((spec.name, idx))
            c = current.get(idx)
            if c is None or st is None or st.container_id != c.id or not st.healthy:
                return False
        return True

    def check(self, now: float) -> None:
        if not self.rec.observed.engine_ok:
            return  # the engine is down: no verdict on the release
        specs = self.apps.specs()
        nodes, weights = list(self.rec.live_nodes()), self.rec.weights()
        live = {(s.name, s.revision) for s in specs}
        for key in list(self.first_seen):
            if key not in live:
                del self.first_seen[key]
        self.settled &= live
        for spec in specs:
            key = (spec.name, spec.revision)
            if key in self.settled:
                continue
            seen = self.first_seen.setdefault(key, now)
            healthy = self._healthy_here(spec, nodes, weights)
            if healthy:
                self.settled.add(key)
                if spec.revision > 1:
                    log.info("rollout.healthy", app=spec.name, revision=spec.revision,
                             seconds=round(now - seen, 1))
                continue
            if healthy is None or now - seen < self.cfg.rollout.deadline:
                continue
            self.settled.add(key)
            self._roll_back(spec, now - seen)

    def _roll_back(self, spec: AppSpec, waited: float) -> None:
        release = self.apps.release(spec.name, spec.revision) or {}
        if not self.cfg.rollout.auto_rollback or "rollback_of" in release or spec.revision == 1:
            log.warning("rollout.failed", app=spec.name, revision=spec.revision, seconds=round(waited, 1),
                        rolled_back=False)
            return
        problems = sorted({st.last_error for (app, _), st in self.rec.replicas.items()
                           if app == spec.name and st.last_error})
        reason = (f"revision {spec.revision} was not healthy within {self.cfg.rollout.deadline:g}s"
                  + (f" ({'; '.join(problems)})" if problems else ""))
        try:
            new = self.apps.rollback(spec.name, reason=reason)
        except (NoEarlierRelease, NotFound, ValidationError) as exc:
            log.warning("rollout.failed", app=spec.name, revision=spec.revision, rolled_back=False, error=str(exc))
            return
        self.m_rollbacks.inc(app=spec.name)
        log.warning("rollout.rolled_back", app=spec.name, failed_revision=spec.revision,
                    revision=new.revision, image=new.image, reason=reason)
        self.rec.wake()
