"""Cluster upgrades: a plan in the store, and a loop on every node that takes its turn.

``POST /v1/upgrade`` (pleaco/api/upgrade.py) verifies a release bundle, keeps it on the
node that received it (the plan's *origin*) and writes one ``upgrade`` record, the plan:
its id, the target version, the bundle's SHA-256 and size, the origin, the node order and
when it was made. There is one plan record (key ``plan``); a new plan replaces the last one
once that one is over.

The order is the live nodes sorted by node id with the origin moved last: every node reads
the same order from the record, and the origin, which keeps the bundle every other node
fetches and whose API the client that asked follows the rollout through, stays up on the
old version the longest.

Every node runs ``UpgradeRollout``, a loop that

- publishes this node's upgrade state (phase, plan id, reason) beside its version in its
  ``node`` record, whenever it changes, so the other nodes learn it through gossip;
- judges the plan from the node records (``progress``): a node is *done* when it runs the
  target version and is not in a trial of it for this plan (a node that already ran the
  target counts as done), *failed* when it reports ``rolled_back`` or ``failed`` for this
  plan, *skipped* when it left the cluster (revoked, or not heard from for
  ``absent_after`` seconds: longer than any restart and health deadline, so an upgrading
  node's restart never counts as leaving);
- on its turn (every node before it done or skipped, none failed) fetches the bundle from
  the origin (or any member that has it) over the cluster's authenticated streams, checks
  its SHA-256 and size against the plan, verifies it, and hands it to the one-node upgrade
  (pleaco.host.trial: install in a slot, flip, restart into it, confirm or roll back).

A failed node stops the rollout: no later node takes a turn, and the plan shows which node
failed and why. Each step reads everything afresh, so a restarted agent resumes its part:
what it did is in its node record and its local upgrade state.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from pleaco import __version__, logs
from pleaco.errors import Conflict, InvalidInput
from pleaco.host.config import UpgradeSettings
from pleaco.reconcile.loop import Loop
from pleaco.store import Store

log = logs.get("pleaco.reconcile.upgrade")

PLAN_KEY = "plan"
# The one-node upgrade's phases (pleaco.host.trial's upgrade.json).
IN_PROGRESS = frozenset({"installing", "trial"})
FAILED = frozenset({"rolled_back", "failed"})
PHASES = IN_PROGRESS | FAILED | {"confirmed"}
# Bounds that keep the plan and node records small: a version as releases name them, a
# reason that says what failed, and far more nodes than a pleaco cluster has (a plan of
# MAX_PLAN_NODES ids is ~35 KiB, within MAX_RECORD_BYTES).
MAX_VERSION = 64
MAX_REASON = 500
MAX_PLAN_NODES = 1000


class PlanRunning(Conflict, code="upgrade_running"):
    """A plan is still rolling out: one at a time."""


def _text(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


@dataclass(frozen=True)
class Plan:
    id: str
    version: str
    sha256: str
    size: int
    origin: str
    order: tuple[str, ...]
    created_ms: int

    def to_value(self) -> dict[str, Any]:
        value = asdict(self)
        value["order"] = list(self.order)
        return value

    @classmethod
    def from_value(cls, value: dict[str, Any] | None) -> Plan | None:
        """The plan of a record, or None when there is none or it is malformed (a record
        is signed by an admitted node, so malformed means a bug: not acted on)."""
        if not value:
            return None
        try:
            order = tuple(value["order"])
            plan = cls(str(value["id"]), str(value["version"]), str(value["sha256"]), int(value["size"]),
                       str(value["origin"]), order, int(value["created_ms"]))
        except (KeyError, TypeError, ValueError):
            return None
        if not all(isinstance(n, str) for n in order) or plan.origin not in order:
            return None
        return plan


def plan_order(nodes: Sequence[str], origin: str) -> tuple[str, ...]:
    """Sorted by node id, the origin last (see the module doc)."""
    return (*sorted(set(nodes) - {origin}), origin)


def new_plan(version: str, sha256: str, size: int, origin: str, nodes: Sequence[str], now: float) -> Plan:
    if not version or len(version) > MAX_VERSION:
        raise InvalidInput(f"bundle version {version[:80]!r}: expected 1 to {MAX_VERSION} characters")
    order = plan_order(nodes, origin)
    if len(order) > MAX_PLAN_NODES:
        raise InvalidInput(f"a plan holds at most {MAX_PLAN_NODES} nodes, the cluster has {len(order)}")
    plan_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now)) + "-" + secrets.token_hex(3)
    return Plan(plan_id, version, sha256, size, origin, order, int(now * 1000))


@dataclass(frozen=True)
class NodeUpgrade:
    """A node's upgrade state as its node record carries it (``upgrade`` beside ``version``)."""

    plan: str = ""
    phase: str = ""
    version: str = ""  # the version it is upgrading (or upgraded, or failed) to
    reason: str = ""

    def to_value(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_value(cls, value: Any) -> NodeUpgrade:
        if not isinstance(value, dict):
            return cls()
        return cls(_text(value.get("plan"), 64), _text(value.get("phase"), 32),
                   _text(value.get("version"), MAX_VERSION), _text(value.get("reason"), MAX_REASON))


@dataclass(frozen=True)
class NodeInfo:
    """What the rollout knows of one node: its record and its membership."""

    id: str
    name: str = ""
    version: str = ""
    upgrade: NodeUpgrade = NodeUpgrade()
    state: str = "unknown"  # membership: alive, suspect, dead, left, revoked, unknown
    last_seen: float = 0.0  # wall seconds


@dataclass(frozen=True)
class NodeProgress:
    id: str
    name: str
    state: str  # done, upgrading, failed, skipped, waiting (its turn not come), next (its turn)
    version: str
    phase: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class Progress:
    status: str  # running, done, failed
    nodes: tuple[NodeProgress, ...]
    turn: str = ""  # the node whose turn it is (running only)
    failed_node: str = ""
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "turn": self.turn, "failed_node": self.failed_node, "reason": self.reason,
                "nodes": [n.to_json() for n in self.nodes]}


def node_state(plan: Plan, node: NodeInfo, now: float, absent_after: float) -> tuple[str, str]:
    """(state, reason) of one node for ``plan`` (the turn aside: ``waiting``)."""
    up = node.upgrade
    mine = up.plan == plan.id
    if node.state == "revoked":
        return "skipped", "removed from the cluster"
    if mine and up.phase in FAILED:
        return "failed", up.reason or up.phase
    if mine and up.phase in IN_PROGRESS:
        return "upgrading", ""
    if node.version == plan.version:
        return "done", ""
    if node.state not in ("alive", "suspect") and now - node.last_seen > absent_after:
        return "skipped", f"not heard from for {now - node.last_seen:.0f}s"
    return "waiting", ""


def progress(plan: Plan, nodes: dict[str, NodeInfo], now: float, absent_after: float) -> Progress:
    """Where the rollout of ``plan`` is, from what every node says (see the module doc)."""
    out: list[NodeProgress] = []
    turn = failed_node = reason = ""
    blocked = False  # a node before this one is not done or skipped
    for node_id in plan.order:
        node = nodes.get(node_id) or NodeInfo(node_id)
        state, why = node_state(plan, node, now, absent_after)
        if state == "failed" and not failed_node:
            failed_node, reason = node_id, why
        if state in ("waiting", "upgrading") and not blocked:
            turn = node_id
            if state == "waiting":
                state = "next"
        if state not in ("done", "skipped"):
            blocked = True
        out.append(NodeProgress(node_id, node.name, state, node.version, node.upgrade.phase, why))
    if failed_node:
        return Progress("failed", tuple(out), failed_node=failed_node, reason=reason)
    if not turn:
        return Progress("done", tuple(out))
    return Progress("running", tuple(out), turn=turn)


# -- the store's view ------------------------------------------------------------------

def read_plan(store: Store) -> Plan | None:
    return Plan.from_value(store.value("upgrade", PLAN_KEY))


def node_infos(store: Store, members: Sequence[dict[str, Any]], now: float | None = None) -> dict[str, NodeInfo]:
    """Every node's record joined with its membership (``Cluster.members()``): a member
    whose record has not arrived yet is known by its membership alone."""
    now = time.time() if now is None else now
    seen = {m["id"]: m for m in members}
    records = {rec.key: rec for rec in store.records("node") if "/" not in rec.key}
    out = {}
    for node_id in seen.keys() | records.keys():
        rec, m = records.get(node_id), seen.get(node_id, {})
        value = (rec.value if rec else None) or {}
        heard = m.get("last_seen", rec.ts.wall_ms / 1000 if rec else now)
        out[node_id] = NodeInfo(node_id, str(value.get("name") or m.get("name", "")), _text(value.get("version"), 64),
                                NodeUpgrade.from_value(value.get("upgrade")), str(m.get("state", "unknown")),
                                float(heard))
    return out


def check_no_running_plan(store: Store, members: Sequence[dict[str, Any]], absent_after: float) -> None:
    plan = read_plan(store)
    if plan is None:
        return
    state = progress(plan, node_infos(store, members), time.time(), absent_after)
    if state.status == "running":
        raise PlanRunning(f"upgrade {plan.id} to {plan.version} is still rolling out (node {state.turn[:12]}'s turn);"
                          " one upgrade at a time: see `pleaco upgrade status`")


def restarting(store: Store, node_id: str, away_for: float, hold: float, now: float) -> bool:
    """Whether ``node_id`` is restarting into a new release, so placement keeps its
    replicas while it is away (``away_for`` seconds, less than ``hold``) or back and
    settling (confirmed or rolled back less than ``hold`` seconds ago): its record says so."""
    rec = store.peek("node", node_id)
    if rec is None or rec.value is None or away_for >= hold:
        return False
    up = NodeUpgrade.from_value(rec.value.get("upgrade"))
    if not up.plan:
        return False
    if up.phase in IN_PROGRESS:
        return True
    # Back after the restart (confirmed, or started again on the old release): it settles.
    return up.phase in ("confirmed", "rolled_back") and now - rec.ts.wall_ms / 1000 < hold


# -- this node's side ------------------------------------------------------------------

@dataclass(frozen=True)
class LocalState:
    """This node's own upgrade, as the one-node half records it (pleaco.host.trial)."""

    phase: str
    to_version: str
    reason: str = ""


class LocalUpgrades(Protocol):
    """The one-node upgrade, as the rollout uses it (the agent adapts pleaco.host)."""

    def verify(self, path: Path) -> str:
        """Verify the bundle at ``path`` against the trusted keys and the running
        version; its version, or InvalidInput naming what is wrong."""
        ...

    def state(self) -> LocalState | None:
        """This node's last one-node upgrade, if any."""
        ...

    def begin(self, path: Path) -> None:
        """Install the verified bundle, flip to it and restart into it (may not return)."""
        ...


class Bundles(Protocol):
    """Where bundles are kept on this node and how a missing one is fetched."""

    def path(self, sha256: str) -> Path: ...

    async def fetch(self, sha256: str, size: int, origin: str) -> Path:
        """The bundle, here or fetched from ``origin`` (or another member that has it);
        checked against ``size`` and ``sha256`` (InvalidInput when it does not match)."""
        ...


class PlanMarks:
    """Which plan this node's own upgrade belongs to, and failures of its part before the
    one-node upgrade began (the bundle could not be verified here): DATA_DIR/upgrade-plan.json."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "upgrade-plan.json"

    def read(self) -> NodeUpgrade | None:
        try:
            return NodeUpgrade.from_value(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return None

    def write(self, mark: NodeUpgrade) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(mark.to_value()))
        os.replace(tmp, self.path)  # whole or not at all


def current_upgrade(marks: PlanMarks, local: LocalUpgrades | None) -> NodeUpgrade:
    """This node's upgrade state for its node record: the plan it was last part of, and
    the one-node upgrade's phase when it is that plan's (same target version)."""
    mark = marks.read()
    if mark is None or not mark.plan:
        return NodeUpgrade()
    if mark.phase in FAILED:
        return mark  # failed before the one-node upgrade began
    state = local.state() if local is not None else None
    if state is None or state.to_version != mark.version:
        return NodeUpgrade(mark.plan, "installing", mark.version)
    return NodeUpgrade(mark.plan, state.phase if state.phase in PHASES else "failed", mark.version,
                       state.reason[:MAX_REASON])


def node_record_value(current: dict[str, Any] | None, base: dict[str, Any], upgrade: NodeUpgrade) -> dict[str, Any]:
    """This node's ``node`` record: ``base`` (name, key, addresses, version) and its
    upgrade state, keeping what else the current record holds."""
    value = {**(current or {}), **base}
    if upgrade.plan:
        value["upgrade"] = upgrade.to_value()
    else:
        value.pop("upgrade", None)
    return value


class UpgradeRollout(Loop):
    name = "upgrades"
    interval = 1.0  # a turn starts within a second of the node before finishing

    def __init__(self, cfg: UpgradeSettings, store: Store, node_id: str, base_record: Callable[[], dict[str, Any]],
                 members: Callable[[], list[dict[str, Any]]], local: LocalUpgrades | None, bundles: Bundles,
                 marks: PlanMarks) -> None:
        super().__init__()
        self.cfg = cfg
        self.store = store
        self.me = node_id
        self.base_record = base_record
        self.members = members
        self.local = local
        self.bundles = bundles
        self.marks = marks
        self._announced = ""
        self._begun = ""  # the plan whose one-node upgrade this process began

    def holds(self, node_id: str, away_for: float) -> bool:
        """Cluster.hold: placement keeps the replicas of a node restarting into a release."""
        return restarting(self.store, node_id, away_for, self.cfg.restart_hold, time.time())

    def publish(self) -> None:
        """Write this node's record when its version or upgrade state changed."""
        current = self.store.value("node", self.me)
        value = node_record_value(current, self.base_record(), current_upgrade(self.marks, self.local))
        if value != current:
            self.store.put("node", self.me, value)

    async def step(self) -> str | None:
        self.publish()
        plan = read_plan(self.store)
        if plan is None or self.me not in plan.order:
            return None
        state = progress(plan, node_infos(self.store, self.members()), time.time(), self.cfg.absent_after)
        if self._announced != f"{plan.id}/{state.status}/{state.turn}":
            self._announced = f"{plan.id}/{state.status}/{state.turn}"
            log.info("upgrade.progress", plan=plan.id, version=plan.version, status=state.status,
                     turn=state.turn, failed_node=state.failed_node, reason=state.reason)
        if state.status != "running" or state.turn != self.me:
            return None
        mine = next(n for n in state.nodes if n.id == self.me)
        # "installing" for a version this process does not run, and not begun by this
        # process: the agent that began it died before it flipped (or before the one-node
        # upgrade recorded anything): begin again, the install is idempotent. Otherwise
        # "upgrading" is the one-node upgrade's (its guard confirms or rolls back).
        resume = (mine.state == "upgrading" and mine.phase == "installing" and __version__ != plan.version
                  and self._begun != plan.id)
        if mine.state != "next" and not resume:
            return None
        if self.local is None:
            self._fail(plan, "self-upgrade is not available on this node")
            return "failed"
        return await self.take_turn(plan)

    async def take_turn(self, plan: Plan) -> str:
        try:
            # A transport error raises: the runner retries with back-off.
            path = await self.bundles.fetch(plan.sha256, plan.size, plan.origin)
            version = await self.blocking(self.verify, path)
        except InvalidInput as exc:
            self._fail(plan, str(exc))
            return "failed"
        if version != plan.version:
            self._fail(plan, f"the bundle is version {version}, the plan says {plan.version}")
            return "failed"
        log.info("upgrade.turn", plan=plan.id, version=plan.version, running=__version__)
        self.marks.write(NodeUpgrade(plan.id, "installing", plan.version))
        self.publish()
        self._begun = plan.id
        try:
            # Returns once the restart into the new version is asked for (this agent then
            # stops). A failed install is recorded by the one-node upgrade itself.
            await self.blocking(self._begin, path)
        except InvalidInput as exc:
            self._fail(plan, str(exc))
            return "failed"
        return "started"

    def verify(self, path: Path) -> str:
        assert self.local is not None
        return self.local.verify(path)

    def _begin(self, path: Path) -> None:
        assert self.local is not None
        self.local.begin(path)

    def _fail(self, plan: Plan, reason: str) -> None:
        log.warning("upgrade.refused_here", plan=plan.id, version=plan.version, reason=reason)
        self.marks.write(NodeUpgrade(plan.id, "failed", plan.version, reason[:MAX_REASON]))
        self.publish()
