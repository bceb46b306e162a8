"""Every record kind stays within what the cluster replicates: a route or repository
record within one gossip packet (it travels in the packets), any other within
MAX_RECORD_BYTES (announced in the packets and fetched over a stream), or its write is
an explicit error naming the record. Each kind's largest record is built here from the
bounds its writer enforces; a new kind fails ``test_every_kind_has_a_worst_case`` until
its worst case is added."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pleaco.apps import AUTOSCALE_SUFFIX, DECISION_SUFFIX, AppStore
from pleaco.builds.model import REPO_CHARS, Build
from pleaco.builds.scan import Finding
from pleaco.builds.secrets import SecretBox
from pleaco.builds.service import RECORD_FINDINGS, RECORD_OUTPUT_BYTES
from pleaco.errors import InvalidInput
from pleaco.identity import Identity
from pleaco.reconcile.autoscale import HISTORY, decision_record
from pleaco.reconcile.routes import InstanceStatus, RouteTable
from pleaco.reconcile.upgrade import MAX_PLAN_NODES, MAX_REASON, MAX_VERSION, PLAN_KEY, NodeUpgrade, new_plan
from pleaco.scale import AutoscalePolicy, Decision
from pleaco.scale.decide import COUNTS_KEPT
from pleaco.stacks.volumes import KIND as VOLUME_KIND
from pleaco.stacks.volumes import VolumeRecord
from pleaco.store import KINDS, MAX_RECORD_BYTES, PACKET_RECORD_BYTES, RecordTooLarge, Store
from pleaco.store.record import gossip_size

NODE = "f" * 32
LONG_APP = "a" * 63  # the longest app name (a DNS label)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db", Identity.generate())
    yield s
    s.close()


def largest_route(store: Store) -> int:
    inst = InstanceStatus(replica=99, container="c" * 12, release=10**9, state="restarting", healthy=False,
                          host_port=65535, restarts=10**9, last_exit_code=-2**31, backoff_s=3600.0,
                          error="e" * 100_000, node=NODE, address="[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
                          serving=False)
    routes = RouteTable(store, store.identity.node_id)
    routes.publish({LONG_APP: [inst]}, "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")
    [rec] = store.records("route")
    return gossip_size(rec.kind, rec.key, rec.value)


def largest_build(store: Store) -> int:
    finding = Finding(id="CVE-" + "9" * 40, package="p" * 200, ecosystem="Debian", installed="1" * 100,
                      fixed="2" * 100, severity="critical", summary="s" * 10_000)
    b = Build(id=f"{LONG_APP}-{'f' * 12}", app=LONG_APP, commit="f" * 40, repo="r" * REPO_CHARS, branch="b" * 255,
              state="failed", reason="x" * 100_000, node=NODE, trigger="webhook", delivery="d" * 64,
              source_sha256="f" * 64, image="sha256:" + "f" * 64, tag="t" * 200, pushed="p" * 300,
              pushed_digest="sha256:" + "f" * 64, steps={s: 1e9 for s in ("fetch", "build", "test", "scan", "push")},
              test={"command": ["sh", "-c", "c" * 4096], "exit_code": 1, "timed_out": False,
                    "output": "o" * RECORD_OUTPUT_BYTES},
              scan={"scanner": "pleaco-osv", "packages": 10**6, "fail_on": "critical",
                    "findings": [finding.to_json()] * RECORD_FINDINGS, "blocking": RECORD_FINDINGS})
    store.put("build", b.id, b.record_value())
    rec = store.get("build", b.id)
    assert rec is not None and rec.value is not None
    assert rec.value["test"]["output"].endswith("o" * 512)  # trimmed from the front, the end kept
    return gossip_size(rec.kind, rec.key, rec.value)


def largest_secret(store: Store, tmp_path: Path) -> int:
    box = SecretBox(tmp_path)
    kind, key, value = box.put_write(f"deploy-key/{LONG_APP}", "k" * 16384)  # connect's own bound
    store.put(kind, key, value)
    return gossip_size(kind, key, value)


def largest_node(store: Store) -> int:
    upgrade = NodeUpgrade.from_value({"plan": "p" * 1000, "phase": "rolled_back", "version": "v" * 1000,
                                      "reason": "r" * 100_000})  # as the writer trims it
    value = {"name": "n" * 255, "public_key": "f" * 64, "address": "h" * 255 + ":65535",
             "gossip": "h" * 255 + ":65535", "version": "v" * 64, "admitted_by": NODE,
             "upgrade": upgrade.to_value()}
    store.put("node", NODE, value)
    return gossip_size("node", NODE, value)


def largest_upgrade(store: Store) -> int:
    """The plan: its node order is the part that grows, bounded by MAX_PLAN_NODES."""
    nodes = [f"{i:032x}" for i in range(MAX_PLAN_NODES)]
    plan = new_plan("9" * MAX_VERSION, "f" * 64, 2**62, nodes[0], nodes, 4e9)
    store.put("upgrade", PLAN_KEY, plan.to_value())
    assert len(NodeUpgrade.from_value({"reason": "r" * 100_000}).reason) == MAX_REASON
    return gossip_size("upgrade", PLAN_KEY, plan.to_value())


def largest_scale(store: Store) -> int:
    """The count, the autoscale policy and the autoscaler's decision record (its history
    cut to fit by its writer), each at its largest."""
    store.put("scale", LONG_APP, {"replicas": 10**6})
    sizes = [gossip_size("scale", LONG_APP, {"replicas": 10**6})]
    big = 1.7976931348623157e308
    policy = AutoscalePolicy(min_replicas=10**6, max_replicas=10**6, metric="concurrency", target=big,
                             stable_window=big, panic_window=big, panic_threshold=big, tolerance=0.9999999999999999,
                             scale_down_rate=big)
    sizes.append(gossip_size("scale", LONG_APP + AUTOSCALE_SUFFIX, policy.to_value()))
    record = None
    for i in range(2 * HISTORY):
        decision = Decision(desired=10**6, reason="r" * 100_000, panic=True, panic_last=-big,
                            counts=tuple((-big, 10**6) for _ in range(COUNTS_KEPT)))
        record = decision_record(LONG_APP, decision, 10**6, policy, NODE, 1e15 + i, record)
        sizes.append(gossip_size("scale", LONG_APP + DECISION_SUFFIX, record))
    return max(sizes)


def largest_volume(store: Store) -> int:
    """A volume claim: the longest app and volume names, a node id, the removal mark."""
    rec = VolumeRecord(LONG_APP, "v" * 63, NODE, 10**15, removing=True)
    store.put(VOLUME_KIND, rec.key, rec.to_value())
    return gossip_size(VOLUME_KIND, rec.key, rec.to_value())


def apps_refuse_what_is_too_large(store: Store) -> int:
    """An app's spec (env) and its release records are bounded by the write itself: too
    large is a 400 naming the record, and nothing is written."""
    apps = AppStore(store, 10)
    before = store.count()
    with pytest.raises(RecordTooLarge) as err:
        apps.deploy(LONG_APP, {"image": "img", "env": {"BLOB": "x" * MAX_RECORD_BYTES}})
    assert isinstance(err.value, InvalidInput) and f"app/{LONG_APP}" in str(err.value)
    assert store.count() == before
    result = apps.deploy(LONG_APP, {"image": "img", "env": {"BLOB": "x" * (MAX_RECORD_BYTES // 2 - 1000)}})
    rec = store.get("release", f"{LONG_APP}/{result.spec.revision}")
    assert rec is not None
    return gossip_size(rec.kind, rec.key, rec.value)


# kind -> (how to make its largest record, the bound it must keep)
WORST: dict[str, tuple[Callable[[Store, Path], int], int]] = {
    "route": (lambda s, _: largest_route(s), PACKET_RECORD_BYTES),
    "build": (lambda s, _: largest_build(s), MAX_RECORD_BYTES),
    "secret": (largest_secret, MAX_RECORD_BYTES),
    "node": (lambda s, _: largest_node(s), MAX_RECORD_BYTES),
    "scale": (lambda s, _: largest_scale(s), PACKET_RECORD_BYTES),
    "app": (lambda s, _: apps_refuse_what_is_too_large(s), MAX_RECORD_BYTES),
    "release": (lambda s, _: apps_refuse_what_is_too_large(s), MAX_RECORD_BYTES),
    # Kinds DESIGN.md names that nothing writes yet: their writers must add a worst case.
    "upgrade": (lambda s, _: largest_upgrade(s), MAX_RECORD_BYTES),
    "subnet": (lambda s, _: 0, MAX_RECORD_BYTES),
    "volume": (lambda s, _: largest_volume(s), PACKET_RECORD_BYTES),
}


def test_every_kind_has_a_worst_case() -> None:
    assert set(WORST) == set(KINDS)


@pytest.mark.parametrize("kind", sorted(WORST))
def test_the_largest_record_of_each_kind_is_within_its_bound(kind: str, store: Store, tmp_path: Path) -> None:
    make, bound = WORST[kind]
    assert make(store, tmp_path) <= bound
