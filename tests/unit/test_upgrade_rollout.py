"""Cluster upgrades without a cluster: the plan's order and validation, whose turn it is
from the node records, the loop's turn with a fake one-node upgrade and fake bundles, and
POST/GET /v1/upgrade on an aiohttp test server with a fake verifier."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pleaco import __version__
from pleaco.api.server import ApiServer
from pleaco.api.upgrade import UpgradeRoutes
from pleaco.errors import InvalidInput
from pleaco.host.bundleship import BundleShelf
from pleaco.host.config import UpgradeSettings
from pleaco.identity import Identity
from pleaco.reconcile.upgrade import (
    MAX_PLAN_NODES,
    PLAN_KEY,
    LocalState,
    NodeInfo,
    NodeUpgrade,
    Plan,
    PlanMarks,
    PlanRunning,
    UpgradeRollout,
    check_no_running_plan,
    current_upgrade,
    new_plan,
    plan_order,
    progress,
    read_plan,
    restarting,
)
from pleaco.store import Store

A, B, C = "a" * 32, "b" * 32, "c" * 32
NOW = 1_000_000.0
ABSENT = 300.0


def plan(order: tuple[str, ...] = (A, B, C), version: str = "0.3.0") -> Plan:
    return Plan("p1", version, "f" * 64, 100, order[-1], order, 0)


def node(node_id: str, version: str = "0.2.0", phase: str = "", plan_id: str = "p1", state: str = "alive",
         last_seen: float = NOW, reason: str = "") -> NodeInfo:
    up = NodeUpgrade(plan_id, phase, "0.3.0", reason) if phase else NodeUpgrade()
    return NodeInfo(node_id, node_id[:1], version, up, state, last_seen)


def states(nodes: list[NodeInfo], p: Plan | None = None) -> tuple[str, str, list[str]]:
    got = progress(p or plan(), {n.id: n for n in nodes}, NOW, ABSENT)
    return got.status, got.turn, [n.state for n in got.nodes]


# -- the plan ------------------------------------------------------------------------------

def test_the_order_is_sorted_by_node_id_with_the_origin_last() -> None:
    assert plan_order([C, A, B, A], B) == (A, C, B)
    assert plan_order([A], A) == (A,)  # a single agent: a plan of one
    assert plan_order([C, B], A) == (B, C, A)  # the origin is in the plan even when not listed


def test_a_new_plan_validates_its_version_and_size() -> None:
    p = new_plan("0.3.0", "f" * 64, 10, B, [A, B, C], NOW)
    assert p.order == (A, C, B) and p.origin == B and p.created_ms == NOW * 1000
    assert Plan.from_value(p.to_value()) == p
    with pytest.raises(InvalidInput, match="bundle version"):
        new_plan("", "f" * 64, 10, B, [A], NOW)
    with pytest.raises(InvalidInput, match="bundle version"):
        new_plan("1" * 65, "f" * 64, 10, B, [A], NOW)
    many = [f"{i:032x}" for i in range(MAX_PLAN_NODES + 1)]
    with pytest.raises(InvalidInput, match="at most"):
        new_plan("0.3.0", "f" * 64, 10, many[0], many, NOW)


def test_a_malformed_plan_record_is_no_plan() -> None:
    good = plan().to_value()
    assert Plan.from_value(good) == plan()
    assert Plan.from_value(None) is None
    assert Plan.from_value({**good, "size": "x"}) is None
    assert Plan.from_value({k: v for k, v in good.items() if k != "order"}) is None
    assert Plan.from_value({**good, "origin": "z" * 32}) is None  # the origin must be in the order
    assert Plan.from_value({**good, "order": [A, 5, C]}) is None


# -- whose turn ----------------------------------------------------------------------------

def test_the_first_node_in_order_goes_first() -> None:
    assert states([node(A), node(B), node(C)]) == ("running", A, ["next", "waiting", "waiting"])


def test_a_node_in_trial_keeps_the_turn_until_it_confirms() -> None:
    nodes = [node(A, "0.3.0", "trial"), node(B), node(C)]
    assert states(nodes) == ("running", A, ["upgrading", "waiting", "waiting"])
    nodes[0] = node(A, "0.3.0", "confirmed")
    assert states(nodes) == ("running", B, ["done", "next", "waiting"])


def test_a_node_already_on_the_target_counts_as_done() -> None:
    assert states([node(A, "0.3.0"), node(B, "0.3.0", "confirmed", plan_id="older"), node(C)]) \
        == ("running", C, ["done", "done", "next"])
    assert states([node(A, "0.3.0"), node(B, "0.3.0"), node(C, "0.3.0", "confirmed")])[0] == "done"


def test_a_rolled_back_node_stops_the_rollout_with_its_reason() -> None:
    nodes = [node(A, "0.2.0", "rolled_back", reason="health: API did not answer"), node(B), node(C)]
    got = progress(plan(), {n.id: n for n in nodes}, NOW, ABSENT)
    assert (got.status, got.turn, got.failed_node, got.reason) == ("failed", "", A, "health: API did not answer")
    assert [n.state for n in got.nodes] == ["failed", "waiting", "waiting"]  # nobody's turn
    # A failure for another plan is history: it does not stop this one.
    assert states([node(A, phase="failed", plan_id="older"), node(B), node(C)])[:2] == ("running", A)


def test_nodes_that_left_are_skipped_and_a_restarting_one_is_waited_for() -> None:
    gone = node(A, state="dead", last_seen=NOW - ABSENT - 1)
    revoked = node(B, state="revoked")
    assert states([gone, revoked, node(C)]) == ("running", C, ["skipped", "skipped", "next"])
    # Down for less than absent_after (an agent restarting into the new release): its turn.
    restarting = node(A, "0.2.0", "installing", state="left", last_seen=NOW - 5)
    assert states([restarting, node(B), node(C)]) == ("running", A, ["upgrading", "waiting", "waiting"])
    assert states([node(A, state="dead", last_seen=NOW - 5), node(B), node(C)])[:2] == ("running", A)
    # A node nothing is known of (no record yet): waited for, then skipped when absent long.
    got = progress(plan(), {B: node(B), C: node(C)}, NOW, ABSENT)
    assert got.nodes[0].state == "skipped"


# -- the loop ------------------------------------------------------------------------------

@dataclass
class FakeLocal:
    """The one-node upgrade: records what it was asked, keeps a state like upgrade.json."""

    version: str = "0.3.0"
    refuse: str = ""
    current: LocalState | None = None
    begun: list[Path] = field(default_factory=list)

    def verify(self, path: Path) -> str:
        if self.refuse:
            raise InvalidInput(self.refuse)
        return self.version

    def state(self) -> LocalState | None:
        return self.current

    def begin(self, path: Path) -> None:
        self.begun.append(path)
        self.current = LocalState("installing", self.version)


@dataclass
class FakeBundles:
    dir: Path
    fetched: list[str] = field(default_factory=list)

    def path(self, sha256: str) -> Path:
        return self.dir / sha256

    async def fetch(self, sha256: str, size: int, origin: str) -> Path:
        self.fetched.append(origin)
        return self.path(sha256)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db", Identity.generate())
    yield s
    s.close()


def make_loop(store: Store, tmp_path: Path, local: FakeLocal | None, members: list[dict[str, Any]]) -> UpgradeRollout:
    me = store.identity.node_id
    base = {"name": "me", "public_key": store.identity.public_key.hex(), "version": __version__}
    return UpgradeRollout(UpgradeSettings(), store, me, lambda: dict(base), lambda: members, local,
                          FakeBundles(tmp_path), PlanMarks(tmp_path))


def put_plan(store: Store, order: tuple[str, ...], version: str = "0.3.0") -> Plan:
    p = Plan("p1", version, "f" * 64, 100, order[-1], order, 0)
    store.put("upgrade", PLAN_KEY, p.to_value())
    return p


def my_upgrade(store: Store) -> NodeUpgrade:
    return NodeUpgrade.from_value((store.value("node", store.identity.node_id) or {}).get("upgrade"))


def test_on_its_turn_a_node_fetches_verifies_and_begins_and_says_so(store: Store, tmp_path: Path) -> None:
    me = store.identity.node_id
    local = FakeLocal()
    loop = make_loop(store, tmp_path, local, [{"id": me, "state": "alive"}])
    put_plan(store, (me, B))
    assert asyncio.run(loop.step()) == "started"
    assert local.begun == [tmp_path / ("f" * 64)]
    assert isinstance(loop.bundles, FakeBundles) and loop.bundles.fetched == [B]  # from the origin
    assert my_upgrade(store) == NodeUpgrade("p1", "installing", "0.3.0")
    # Idempotent: stepping again while the one-node upgrade runs begins nothing more.
    assert asyncio.run(loop.step()) is None
    assert len(local.begun) == 1
    # Its guard confirms: the node record says so at the next step.
    local.current = LocalState("confirmed", "0.3.0")
    asyncio.run(loop.step())
    assert my_upgrade(store).phase == "confirmed"


def test_a_node_waits_for_the_ones_before_it(store: Store, tmp_path: Path) -> None:
    me = store.identity.node_id
    local = FakeLocal()
    first = "0" * 32
    store_other_node(store, first, "0.2.0")
    loop = make_loop(store, tmp_path, local, [{"id": me, "state": "alive"}, {"id": first, "state": "alive"}])
    put_plan(store, (first, me))
    asyncio.run(loop.step())
    assert local.begun == []
    store_other_node(store, first, "0.3.0", NodeUpgrade("p1", "trial", "0.3.0"))
    asyncio.run(loop.step())
    assert local.begun == []  # in trial: not healthy yet
    store_other_node(store, first, "0.3.0", NodeUpgrade("p1", "confirmed", "0.3.0"))
    asyncio.run(loop.step())
    assert len(local.begun) == 1


def test_a_failed_node_before_stops_later_ones(store: Store, tmp_path: Path) -> None:
    me = store.identity.node_id
    local = FakeLocal()
    store_other_node(store, A, "0.2.0", NodeUpgrade("p1", "rolled_back", "0.3.0", "health check failed"))
    loop = make_loop(store, tmp_path, local, [{"id": me, "state": "alive"}, {"id": A, "state": "alive"}])
    put_plan(store, (A, me))
    asyncio.run(loop.step())
    assert local.begun == []


def test_a_bundle_refused_here_fails_this_node_and_stops_the_rollout(store: Store, tmp_path: Path) -> None:
    me = store.identity.node_id
    local = FakeLocal(refuse="signed by an untrusted key")
    loop = make_loop(store, tmp_path, local, [{"id": me, "state": "alive"}])
    put_plan(store, (me, C))
    assert asyncio.run(loop.step()) == "failed"
    assert local.begun == []
    assert my_upgrade(store) == NodeUpgrade("p1", "failed", "0.3.0", "signed by an untrusted key")
    asyncio.run(loop.step())
    assert local.begun == []  # not tried again


def test_an_agent_that_died_while_installing_begins_again(store: Store, tmp_path: Path) -> None:
    me = store.identity.node_id
    PlanMarks(tmp_path).write(NodeUpgrade("p1", "installing", "0.3.0"))
    local = FakeLocal(current=LocalState("installing", "0.3.0"))
    loop = make_loop(store, tmp_path, local, [{"id": me, "state": "alive"}])  # a new process
    put_plan(store, (me,))
    assert asyncio.run(loop.step()) == "started"
    assert len(local.begun) == 1


def test_the_node_record_carries_the_plan_state_only_for_its_target(tmp_path: Path) -> None:
    marks = PlanMarks(tmp_path)
    assert current_upgrade(marks, FakeLocal()) == NodeUpgrade()
    marks.write(NodeUpgrade("p1", "installing", "0.3.0"))
    assert current_upgrade(marks, FakeLocal(current=LocalState("rolled_back", "0.3.0", "no"))) \
        == NodeUpgrade("p1", "rolled_back", "0.3.0", "no")
    # The one-node state of an earlier upgrade (another target) is not this plan's.
    assert current_upgrade(marks, FakeLocal(current=LocalState("confirmed", "0.2.0"))).phase == "installing"


def store_other_node(store: Store, node_id: str, version: str, upgrade: NodeUpgrade | None = None) -> None:
    # The store refuses records signed by another node's key only when they arrive; a test
    # may write another node's description from this one (as the join handshake does).
    value: dict[str, Any] = {"name": node_id[:1], "version": version}
    if upgrade is not None:
        value["upgrade"] = upgrade.to_value()
    store.put("node", node_id, value)


# -- the API -------------------------------------------------------------------------------

def api_app(store: Store, tmp_path: Path, local: FakeLocal | None,
            members: list[dict[str, Any]]) -> tuple[web.Application, BundleShelf]:
    shelf = BundleShelf(tmp_path)
    server = _bare_server(store)  # its auth and error middlewares
    UpgradeRoutes(UpgradeSettings(max_bundle_bytes=1000), store, store.identity.node_id, shelf, local,
                  lambda: members).add_to(server.app)
    return server.app, shelf


def _bare_server(store: Store) -> ApiServer:
    from pleaco.apps import AppStore
    from pleaco.metrics import Registry

    return ApiServer(identity=store.identity, node_name="t", store=store, apps=AppStore(store, 10),
                     reconciler=None, runtime=None, registry=Registry(), token="t",  # type: ignore[arg-type]
                     max_body_bytes=1 << 20)


def post(app: web.Application, *bodies: bytes) -> list[tuple[int, dict[str, Any]]]:
    """POST each body in turn (one server: an aiohttp app runs on one event loop)."""
    async def main() -> list[tuple[int, dict[str, Any]]]:
        out = []
        async with TestClient(TestServer(app)) as client:
            for body in bodies:
                resp = await client.post("/v1/upgrade", data=body, headers={"Authorization": "Bearer t"})
                out.append((resp.status, await resp.json()))
        return out

    return asyncio.run(main())


def test_post_refuses_a_bad_bundle_and_changes_nothing(store: Store, tmp_path: Path) -> None:
    me = store.identity.node_id
    app, shelf = api_app(store, tmp_path, FakeLocal(refuse="bad signature"), [{"id": me, "state": "alive"}])
    bad, large, empty = post(app, b"not a bundle", b"x" * 1001, b"")
    assert bad[0] == 400 and bad[1]["error"]["message"] == "bundle refused: bad signature"
    assert large[0] == 413
    assert empty[0] == 400 and "empty" in empty[1]["error"]["message"]
    assert read_plan(store) is None and list(shelf.dir.iterdir()) == []


def test_post_writes_a_plan_keeps_the_bundle_and_one_plan_runs_at_a_time(store: Store, tmp_path: Path) -> None:
    me = store.identity.node_id
    members = [{"id": me, "state": "alive"}, {"id": A, "state": "alive"}, {"id": B, "state": "dead"}]
    app, shelf = api_app(store, tmp_path, FakeLocal(), members)
    (status, body), (again, refused) = post(app, b"bundle bytes", b"another")
    assert status == 201, body
    sha = hashlib.sha256(b"bundle bytes").hexdigest()
    p = read_plan(store)
    assert p is not None and p.version == "0.3.0" and p.sha256 == sha and p.size == 12
    assert p.order == (A, me)  # the dead node is not in it; the origin last
    assert shelf.path(sha).read_bytes() == b"bundle bytes"
    assert body["plan"]["id"] == p.id and body["status"] == "running" and body["turn"] == A
    assert again == 409 and refused["error"]["code"] == "upgrade_running" and p.id in refused["error"]["message"]
    assert read_plan(store) == p
    with pytest.raises(PlanRunning):
        check_no_running_plan(store, members, ABSENT)


def test_post_without_the_one_node_upgrade_is_unavailable(store: Store, tmp_path: Path) -> None:
    app, _ = api_app(store, tmp_path, None, [])
    [(status, body)] = post(app, b"x")
    assert status == 503 and "not available" in body["error"]["message"]


# -- bundles between nodes -------------------------------------------------------------------

@dataclass
class FakeStream:
    """A member's answer on channel U: a header, then chunks, then the end."""

    frames: list[bytes]
    header: dict[str, Any] = field(default_factory=lambda: {"ok": True})

    async def receive_message(self) -> dict[str, Any]:
        return self.header

    async def receive(self) -> bytes:
        return self.frames.pop(0) if self.frames else b""

    async def close(self) -> None:
        pass


@dataclass
class FakeCluster:
    streams: dict[str, FakeStream]
    asked: list[str] = field(default_factory=list)

    @dataclass
    class Gossip:
        stream_timeout: float = 5.0

    gossip: Gossip = field(default_factory=Gossip)

    def register_channel(self, channel: bytes, handler: Any) -> None:
        pass

    def live_peers(self) -> list[Any]:
        @dataclass
        class Peer:
            node_id: str
            addr: str

        return [Peer(n, n) for n in self.streams]

    async def open_stream(self, addr: str, channel: bytes, header: dict[str, Any]) -> FakeStream:
        assert channel == b"U" and header == {"bundle": SHA}
        self.asked.append(addr)
        return self.streams[addr]


BODY = b"bundle bytes " * 1000
SHA = hashlib.sha256(BODY).hexdigest()


def test_a_bundle_is_fetched_from_the_origin_first_and_kept_whole(tmp_path: Path) -> None:
    cluster = FakeCluster({A: FakeStream([BODY]), C: FakeStream([BODY[:5000], BODY[5000:]])})
    shelf = BundleShelf(tmp_path, cluster)  # type: ignore[arg-type]
    path = asyncio.run(shelf.fetch(SHA, len(BODY), C))
    assert cluster.asked == [C] and path.read_bytes() == BODY and path == shelf.path(SHA)
    assert asyncio.run(shelf.fetch(SHA, len(BODY), C)) == path and cluster.asked == [C]  # kept: not fetched again
    assert [p.name for p in shelf.dir.iterdir()] == [f"{SHA}.bundle"]


def test_a_bundle_that_is_not_the_one_named_is_refused_and_not_kept(tmp_path: Path) -> None:
    for i, frames in enumerate(([BODY[:-1] + b"X"], [BODY[:-1]], [BODY, b"more"])):  # digest, short, long
        (tmp_path / str(i)).mkdir()
        shelf = BundleShelf(tmp_path / str(i), FakeCluster({A: FakeStream(list(frames))}))  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="bundle"):
            asyncio.run(shelf.fetch(SHA, len(BODY), A))
        assert list(shelf.dir.iterdir()) == []  # neither the bundle nor a partial file
    # A member that does not have it: the next one is asked.
    cluster = FakeCluster({A: FakeStream([], {"error": "not kept here"}), B: FakeStream([BODY])})
    (tmp_path / "next").mkdir()
    shelf = BundleShelf(tmp_path / "next", cluster)  # type: ignore[arg-type]
    assert asyncio.run(shelf.fetch(SHA, len(BODY), A)).read_bytes() == BODY and cluster.asked == [A, B]


# -- placement keeps a restarting node's replicas ----------------------------------------------

def test_a_node_restarting_into_a_release_keeps_its_replicas_for_a_while(store: Store) -> None:
    now = time.time()
    assert not restarting(store, A, 0.0, 30.0, now)  # no record
    store_other_node(store, A, "0.2.0")
    assert not restarting(store, A, 0.0, 30.0, now)  # not upgrading
    store_other_node(store, A, "0.2.0", NodeUpgrade("p1", "trial", "0.3.0"))
    assert restarting(store, A, 2.0, 30.0, now)  # away for its restart
    assert not restarting(store, A, 31.0, 30.0, now)  # away too long: a dead node like any other
    store_other_node(store, A, "0.3.0", NodeUpgrade("p1", "confirmed", "0.3.0"))
    assert restarting(store, A, 0.0, 30.0, now)  # back and settling
    assert not restarting(store, A, 0.0, 30.0, now + 31)  # long confirmed: nothing to hold
    store_other_node(store, A, "0.2.0", NodeUpgrade("p1", "failed", "0.3.0", "refused"))
    assert not restarting(store, A, 0.0, 30.0, now)  # it never restarted


def test_cluster_placement_keeps_a_held_member(tmp_path: Path) -> None:
    from pleaco.cluster.config import ClusterSettings
    from pleaco.cluster.membership import DEAD, Member
    from pleaco.cluster.service import Cluster
    from pleaco.metrics import Registry

    ident = Identity.generate()
    s = Store(tmp_path / "c.db", ident)
    try:
        cluster = Cluster(ClusterSettings(data_dir=tmp_path, gossip_listen="127.0.0.1:7401"), ident, s, Registry())

        class FakeMembership:
            loop_time = 100.0
            members = {A: Member(A, "x:1", 1, DEAD, {}, since=95.0)}

            def placement_nodes(self) -> list[str]:
                return [ident.node_id]

        cluster.membership = FakeMembership()  # type: ignore[assignment]
        cluster.ready = True
        asked: list[tuple[str, float]] = []

        def hold(node: str, away_for: float) -> bool:
            asked.append((node, away_for))
            return True

        assert cluster.placement_nodes() == [ident.node_id]  # the default holds nobody
        cluster.hold = hold
        assert cluster.placement_nodes() == sorted([ident.node_id, A]) and asked == [(A, 5.0)]
    finally:
        s.close()


def test_an_agent_restarting_into_a_release_does_not_leave_the_cluster(tmp_path: Path) -> None:
    from pleaco.agent import RESTART_WINDOW, Agent
    from pleaco.config import load
    from pleaco.host.trial import TrialState

    agent = Agent(load(env={}, overrides={"data_dir": str(tmp_path)}), argv=[])
    assert not agent._restarting()  # a plain stop: it leaves
    agent.restart_command = ["python", "-m", "pleaco", "agent"]
    assert agent._restarting()  # exec into another slot

    @dataclass
    class Upgrade:
        current: TrialState | None

        def state(self) -> TrialState | None:
            return self.current

    agent.restart_command = None
    agent.upgrade = Upgrade(TrialState("trial", "0.2.0", "0.3.0"))  # type: ignore[assignment]
    assert agent._restarting()  # systemd restarts the unit during the trial
    agent.upgrade = Upgrade(TrialState("rolled_back", "0.2.0", "0.3.0", updated=time.time()))  # type: ignore[assignment]
    assert agent._restarting()  # the guard restarts the old release
    agent.upgrade = Upgrade(TrialState("rolled_back", "0.2.0", "0.3.0",  # type: ignore[assignment]
                                       updated=time.time() - RESTART_WINDOW - 1))
    assert not agent._restarting()
    agent.upgrade = Upgrade(TrialState("confirmed", "0.2.0", "0.3.0"))  # type: ignore[assignment]
    assert not agent._restarting()


def test_cluster_stop_leaves_only_when_asked(tmp_path: Path) -> None:
    from pleaco.cluster.config import ClusterSettings
    from pleaco.cluster.service import Cluster
    from pleaco.metrics import Registry

    ident = Identity.generate()
    s = Store(tmp_path / "c.db", ident)
    left: list[bool] = []

    class FakeMembership:
        async def stop(self, leave: bool = True) -> None:
            left.append(leave)

    try:
        for leave in (False, True):
            cluster = Cluster(ClusterSettings(data_dir=tmp_path, gossip_listen="127.0.0.1:7401"), ident, s, Registry())
            cluster.membership = FakeMembership()  # type: ignore[assignment]
            asyncio.run(cluster.stop(leave))
        assert left == [False, True]
    finally:
        s.close()
