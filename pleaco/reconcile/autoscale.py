"""The autoscaler, a loop: every node samples, the app's owner decides and writes.

Every ``[autoscale] interval`` (1 s), and ``report_settle`` (0.2 s) after a load report
brings news (the agent wires ``LoadView.on_news`` to ``wake``: a load step is in the panic
window as soon as a report shows it, not up to a tick later), each node takes one sample of
every autoscaled app's metric, the cluster-wide figure of pleaco.cluster.load (concurrency,
requests/s or CPU cores, summed over the nodes' latest load reports), and keeps the window
in memory: the policy's stable window, or its idle window when longer. Every node does, not only the
owner, so a node that becomes an app's owner already holds the history and decides at
once, with no gap while a new window fills.

Only the app's owner (rendezvous over the live nodes, pleaco.placement.Owners, as for
rollouts) decides, with pleaco.scale.decide, and it writes only when something changes:
the desired count (the ``scale/NAME`` record ``apps scale`` writes) together with the
decision record ``scale/NAME/decision`` in one transaction, when the count changes or the
panic state does. Every write is a durable replicated record, so a tick that changes
nothing writes nothing. The decision record holds the state the next decision continues
from (panic, the scale-down window): the owner keeps it in memory between its writes, and
a node that becomes owner reads it from the record as ``previous``, so an owner's death
loses neither a panic under way nor the scale-down limit (the record's last surge time
is the last write's, so a successor whose load has calmed may end a panic up to a stable
window earlier than the old owner would have). It also keeps the last
``HISTORY`` decisions with their reasons, for ``apps show``.

No double decision: a node decides only while it is the owner, and a write carries the
count it was based on; ``AppStore.record_decision`` writes nothing when the count is no
longer that (``apps scale`` by hand, or another node that believed itself owner while the
live nodes changed), and the next tick decides again from the new count. Two nodes that
both believe they own an app for a moment read the same figures and the same count, so
they decide the same; the count check keeps either from acting on a count the other
already changed.

Times in samples and decision records are wall-clock seconds: the state moves between
nodes, and the windows are seconds to minutes, far above the clock skew of NTP-synced nodes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pleaco import logs
from pleaco.apps import AppStore
from pleaco.cluster.load import AppLoad
from pleaco.metrics import Counter, Gauge, Registry
from pleaco.placement import Owners
from pleaco.reconcile.config import AutoscaleConfig
from pleaco.reconcile.loop import Loop
from pleaco.scale import AutoscalePolicy, Decision, Sample, decide
from pleaco.store import PACKET_RECORD_BYTES
from pleaco.store.record import gossip_size

log = logs.get("pleaco.reconcile.autoscale")

# Decisions kept in the decision record, newest last (fewer when long reasons would not
# fit one gossip packet: the record travels in the packets, like the count).
HISTORY = 5
# A reason longer than this is cut (decide's are under 150 characters; the bound keeps the
# record's size independent of them).
REASON_CHARS = 160
# Characters of a node id kept per history entry (as `apps show` prints node ids); the
# record's top level names the last deciding node in full.
NODE_CHARS = 12


def metric_value(load: AppLoad, metric: str) -> float:
    """The cluster-wide figure a policy's metric scales on."""
    return {"concurrency": load.concurrency, "rps": load.rps, "cpu": load.cpu}[metric]


def policy_tag(policy: AutoscalePolicy) -> str:
    """A short fingerprint of a policy: a decision made under another policy is not the
    ``previous`` of one under this (decide's contract: None after a policy change)."""
    text = json.dumps(policy.to_value(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def decision_record(app: str, decision: Decision, based_on: int, policy: AutoscalePolicy, node: str,
                    now: float, earlier: dict[str, Any] | None) -> dict[str, Any]:
    """The value of ``scale/APP/decision``: the state for the next decision, the deciding
    node, and the last decisions (``earlier``'s history plus this one), cut to fit a packet."""
    entry = {"at_ms": int(now * 1000), "node": node[:NODE_CHARS], "from": based_on, "to": decision.desired,
             "panic": decision.panic, "reason": decision.reason[:REASON_CHARS]}
    history = list(earlier.get("history", [])) if earlier else []
    history = [*history, entry][-HISTORY:]
    state = decision.to_value()
    del state["reason"]  # the history has it
    record = {"node": node, "policy": policy_tag(policy), "state": state, "history": history}
    while len(history) > 1 and gossip_size("scale", app + "/decision", record) > PACKET_RECORD_BYTES:
        del history[0]
    return record


def previous_of(record: dict[str, Any] | None, policy: AutoscalePolicy) -> Decision | None:
    """The stored decision to continue from; None when there is none, it was made under
    another policy, or it is malformed (a record from an incompatible version)."""
    if record is None or record.get("policy") != policy_tag(policy):
        return None
    try:
        history = record.get("history") or [{}]
        return Decision.from_state(str(history[-1].get("reason", "")), record["state"])
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


@dataclass(frozen=True)
class Figures:
    """What the autoscaler sees of one app now, for ``apps show``."""

    metric: str
    value: float | None  # the latest sample; None: no node reports the app's load
    stable: float | None  # the averages over the policy's windows
    panic: float | None
    samples: int
    owner: str | None  # the node that decides for the app

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)

        return {"metric": self.metric, "value": r(self.value), "stable_average": r(self.stable),
                "panic_average": r(self.panic), "samples": self.samples, "owner": self.owner}


@dataclass
class _Mine:
    """The owner's own last decision, kept between writes (which happen only on change)."""

    tag: str
    decision: Decision
    at: float


class Autoscaler(Loop):
    name = "autoscale"

    def __init__(self, cfg: AutoscaleConfig, apps: AppStore, loads: Callable[[], dict[str, AppLoad]], owners: Owners,
                 registry: Registry, clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.cfg = cfg
        self.interval = cfg.interval
        self.settle = cfg.report_settle  # woken by load reports (wake(); see AutoscaleConfig)
        self.apps = apps
        self.loads = loads  # every app's cluster-wide load (LoadView.all), read once a tick
        self.owners = owners
        self.clock = clock
        self.windows: dict[str, deque[Sample]] = {}
        self._mine: dict[str, _Mine] = {}
        self.m_decisions = registry.register(Counter(
            "pleaco_autoscale_decisions_total", "Autoscaler decisions written by this node, by app and direction "
            "(up, down, or hold: the panic state changed, the count did not).", ("app", "direction")))
        registry.register(Gauge(
            "pleaco_autoscale_desired_replicas", "The desired replica count of each autoscaled app.", ("app",),
            collect=lambda: {(app,): float(self.apps.replicas(app)) for app in self.apps.autoscaled()}))
        registry.register(Gauge(
            "pleaco_autoscale_metric", "The cluster-wide figure each autoscaled app scales on, as last sampled "
            "here (in-flight requests, requests/s or CPU cores).", ("app", "metric"),
            collect=lambda: {(app, p.metric): w[-1].value for app, p in self.apps.autoscaled().items()
                             if (w := self.windows.get(app))}))

    async def step(self) -> str | None:
        self.tick()
        return None

    def tick(self) -> None:
        now = self.clock()
        policies = self.apps.autoscaled()
        loads = self.loads() if policies else {}
        for gone in set(self.windows) - set(policies):
            del self.windows[gone]
        for gone in set(self._mine) - set(policies):
            del self._mine[gone]
        for app, policy in sorted(policies.items()):
            self.sample(app, policy, loads.get(app), now)
            if self.owners.owns(app):
                self.decide(app, policy, now)
            else:
                self._mine.pop(app, None)  # the next time it is ours, the record says where we are

    def sample(self, app: str, policy: AutoscalePolicy, load: AppLoad | None, now: float) -> None:
        """Add the app's figure now to its window (none when no live node reports the app)."""
        window = self.windows.setdefault(app, deque(maxlen=self.cfg.max_samples))
        if load is not None:
            window.append(Sample(now, metric_value(load, policy.metric)))
        # Keep what the longest window needs, and one sample before it: the idle rule asks
        # for a sample at or before the idle window's start.
        keep = max(policy.stable_window, policy.scale_to_zero_after or 0.0)
        while len(window) > 1 and window[1].at <= now - keep:
            window.popleft()

    def figures(self, app: str) -> Figures | None:
        """The autoscaler's view of an app now; None when it is not autoscaled."""
        policy = self.apps.autoscale(app)
        if policy is None:
            return None
        window = list(self.windows.get(app, ()))
        now = self.clock()

        def average(seconds: float) -> float | None:
            values = [s.value for s in window if now - seconds < s.at <= now]
            return sum(values) / len(values) if values else None

        return Figures(policy.metric, window[-1].value if window else None, average(policy.stable_window),
                       average(policy.panic_window), len(window), self.owners.owner(app))

    def _previous(self, app: str, tag: str, policy: AutoscalePolicy, stored: dict[str, Any] | None) -> Decision | None:
        """This node's own last decision while it has owned the app since; else the record's."""
        mine = self._mine.get(app)
        if mine is None or mine.tag != tag or self._written_elsewhere_since(stored, mine.at):
            return previous_of(stored, policy)
        return mine.decision

    def _written_elsewhere_since(self, stored: dict[str, Any] | None, since: float) -> bool:
        """Whether another node wrote the record after ``since`` (it believed itself owner
        while the live nodes changed): its decision, not this node's older one, is the
        state to continue from."""
        if stored is None or stored.get("node") == self.owners.me:
            return False
        history = stored.get("history") or [{}]
        return bool(int(history[-1].get("at_ms", 0)) >= since * 1000)

    def decide(self, app: str, policy: AutoscalePolicy, now: float) -> None:
        current = self.apps.replicas(app)
        stored = self.apps.decision(app)
        tag = policy_tag(policy)
        previous = self._previous(app, tag, policy, stored)
        decision = decide(policy, current, list(self.windows.get(app, ())), now, previous)
        self._mine[app] = _Mine(tag, decision, now)
        stored_panic = bool(stored and isinstance(stored.get("state"), dict) and stored["state"].get("panic"))
        if decision.desired == current and decision.panic == stored_panic:
            return  # nothing changed: no write
        record = decision_record(app, decision, current, policy, self.owners.me, now, stored)
        if not self.apps.record_decision(app, policy, current, decision.desired, record):
            log.info("autoscale.skipped", app=app, based_on=current, now=self.apps.replicas(app),
                     reason="the count or the policy changed since they were read")
            self._mine.pop(app, None)
            return
        direction = ("up" if decision.desired > current else "down" if decision.desired < current else "hold")
        self.m_decisions.inc(app=app, direction=direction)
        log.info("autoscale.decided", app=app, **{"from": current}, to=decision.desired, panic=decision.panic,
                 metric=policy.metric, reason=decision.reason)
