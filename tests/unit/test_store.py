"""The SQLite store: apply/merge, trust, durability, transactions, tombstones, listeners."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pleaco.identity import Identity
from pleaco.store import HLC, MAX_RECORD_BYTES, Record, RecordError, RecordTooLarge, Store, Timestamp, merge
from pleaco.store.record import gossip_size

# Hypothesis runs many examples, each with fresh stores committing with synchronous=FULL;
# on tmpfs the fsyncs cost nothing. Convergence does not depend on where the file is.
RAM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

ADMIN = Identity.generate()
PEERS = [Identity.generate() for _ in range(3)]


class FakeClock:
    def __init__(self, ms: int = 1_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def admission(node: Identity, wall_ms: int = 1, by: Identity = ADMIN) -> Record:
    """The ``node`` record, signed by ``by``, that admits ``node``'s public key."""
    value = {"public_key": node.public_key.hex(), "name": f"n-{node.node_id[:4]}"}
    return Record.create(by, "node", node.node_id, value, Timestamp(wall_ms, 0, by.node_id))


def peer_record(
    node: Identity, kind: str = "app", key: str = "web", value: dict[str, Any] | None = None, wall_ms: int = 5_000
) -> Record:
    if value is None:
        value = {"image": "nginx:1"}
    return Record.create(node, kind, key, value, Timestamp(wall_ms, 0, node.node_id))


def open_store(path: Path, identity: Identity = ADMIN, clock: FakeClock | None = None) -> Store:
    hlc = HLC(identity.node_id, now_ms=clock) if clock is not None else None
    return Store(path, identity, hlc)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(tmp_path / "state.db", clock=FakeClock(1_000))
    yield s
    s.close()


@pytest.fixture
def trusting_store(store: Store) -> Store:
    """A store where every peer in PEERS has been admitted by ADMIN."""
    for peer in PEERS:
        assert store.apply(admission(peer))
    return store


# -- local writes and reads --------------------------------------------------------------


class FailingUpsert:
    """Makes the store's ``n``-th row write from now on fail as a full disk would."""

    def __init__(self, s: Store, n: int) -> None:
        self.store, self.n, self.calls = s, n, 0
        self.real = s._upsert
        s._upsert = self.upsert  # type: ignore[method-assign]

    def upsert(self, rec: Record) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise OSError("disk full")
        self.real(rec)

    def restore(self) -> None:
        self.store._upsert = self.real  # type: ignore[method-assign]


def test_put_get_value_delete(store: Store) -> None:
    rec = store.put("app", "web", {"image": "nginx:1"})
    assert rec.origin == ADMIN.node_id
    assert store.value("app", "web") == {"image": "nginx:1"}
    assert store.get("app", "web") == rec
    tomb = store.delete("app", "web")
    assert tomb.deleted and tomb.ts > rec.ts
    assert store.value("app", "web") is None
    assert store.get("app", "web") == tomb  # the tombstone is kept
    assert store.records("app") == []
    assert store.records("app", include_deleted=True) == [tomb]
    assert store.count() == 1


def test_local_writes_verify_against_the_store(store: Store) -> None:
    rec = store.put("scale", "web", {"replicas": 3})
    rec.verify(store.public_key_of)


def test_records_and_all_are_sorted(store: Store) -> None:
    store.put("scale", "b", {"replicas": 1})
    store.put("app", "b", {"image": "x"})
    store.put("app", "a", {"image": "y"})
    assert [r.key for r in store.records("app")] == ["a", "b"]
    assert [(r.kind, r.key) for r in store.all()] == [("app", "a"), ("app", "b"), ("scale", "b")]


def test_unknown_kind_is_refused_everywhere(store: Store) -> None:
    with pytest.raises(RecordError):
        store.put("bogus", "k", {})
    with pytest.raises(RecordError):
        store.delete("bogus", "k")
    with pytest.raises(RecordError):
        store.records("bogus")
    rec = store.put("app", "k", {})
    sig = ADMIN.sign(Record.signed_bytes("bogus", "k", {}, rec.ts))
    before = store.all()
    with pytest.raises(RecordError):
        store.apply(Record("bogus", "k", {}, rec.ts, sig))
    assert store.all() == before


# -- apply: merge --------------------------------------------------------------------------


def test_apply_newer_wins_older_loses(trusting_store: Store) -> None:
    s = trusting_store
    old = peer_record(PEERS[0], value={"v": 1}, wall_ms=5_000)
    new = peer_record(PEERS[1], value={"v": 2}, wall_ms=6_000)
    assert s.apply(new) is True
    assert s.apply(old) is False
    assert s.get("app", "web") == new
    assert s.apply(new) is False  # idempotent: the same record again changes nothing
    assert s.get("app", "web") == new


def test_apply_tombstone_then_older_value_stays_deleted(trusting_store: Store) -> None:
    s = trusting_store
    live = peer_record(PEERS[0], wall_ms=5_000)
    dead = Record.create(PEERS[1], "app", "web", None, Timestamp(6_000, 0, PEERS[1].node_id))
    assert s.apply(dead)
    assert not s.apply(live)
    assert s.value("app", "web") is None


def test_apply_advances_the_local_clock_past_remote_records(trusting_store: Store) -> None:
    remote = peer_record(PEERS[0], wall_ms=10**12)  # far ahead of the store's 1000 ms clock
    trusting_store.apply(remote)
    local = trusting_store.put("app", "web", {"image": "mine"})
    assert local.ts > remote.ts
    assert trusting_store.value("app", "web") == {"image": "mine"}


def test_local_write_after_losing_remote_still_wins(trusting_store: Store) -> None:
    s = trusting_store
    first = s.put("app", "web", {"v": "local-1"})
    assert not s.apply(peer_record(PEERS[0], value={"v": "remote-old"}, wall_ms=1))
    assert s.get("app", "web") == first


json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=6)
record_values = st.none() | st.dictionaries(
    st.text(max_size=5), json_scalars | st.lists(json_scalars, max_size=3), max_size=3
)


@st.composite
def peer_records(draw: st.DrawFn) -> Record:
    node = draw(st.sampled_from([*PEERS, ADMIN]))
    kind = draw(st.sampled_from(["app", "scale"]))  # not "node": admissions stay fixed
    key = draw(st.sampled_from(["a", "b"]))
    # Tiny clock ranges, so that equal timestamps from one origin with different values
    # (a buggy or hostile origin) are common.
    ts = Timestamp(draw(st.integers(10, 11)), draw(st.integers(0, 1)), node.node_id)
    return Record.create(node, kind, key, draw(record_values), ts)


def _fresh_store(directory: str, name: str) -> Store:
    s = open_store(Path(directory) / name, clock=FakeClock(1_000))
    for peer in PEERS:
        s.apply(admission(peer))
    return s


@settings(max_examples=100, deadline=None)
@given(batch=st.lists(peer_records(), min_size=1, max_size=10), data=st.data())
def test_two_stores_converge_whatever_the_order(batch: list[Record], data: st.DataObject) -> None:
    order_b = data.draw(st.permutations(batch))
    with tempfile.TemporaryDirectory(dir=RAM_DIR) as d:
        a, b = _fresh_store(d, "a.db"), _fresh_store(d, "b.db")
        try:
            for rec in batch:
                a.apply(rec)
            for rec in order_b:
                b.apply(rec)
            for rec in reversed(batch):  # duplicates change nothing
                b.apply(rec)
            assert a.all() == b.all()
            # And the state is exactly the per-(kind, key) merge of everything applied.
            expected: dict[tuple[str, str], Record | None] = {}
            for rec in batch:
                expected[rec.kind, rec.key] = merge(expected.get((rec.kind, rec.key)), rec)
            applied = [r for r in a.all() if r.kind != "node"]
            assert applied == [expected[k] for k in sorted(expected)]
        finally:
            a.close()
            b.close()


def test_equal_timestamps_from_one_origin_resolve_the_same_in_both_orders(tmp_path: Path) -> None:
    ts = Timestamp(5_000, 0, PEERS[0].node_id)
    x = Record.create(PEERS[0], "app", "web", {"v": "x"}, ts)
    y = Record.create(PEERS[0], "app", "web", {"v": "y"}, ts)
    a = _fresh_store(str(tmp_path), "a.db")
    b = _fresh_store(str(tmp_path), "b.db")
    try:
        a.apply(x)
        a.apply(y)
        b.apply(y)
        b.apply(x)
        assert a.get("app", "web") == b.get("app", "web") == merge(x, y)
    finally:
        a.close()
        b.close()


# -- apply: trust ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda r: {"kind": "scale"}, id="kind"),
        pytest.param(lambda r: {"key": "other"}, id="key"),
        pytest.param(lambda r: {"value": {"image": "evil"}}, id="value"),
        pytest.param(lambda r: {"value": None}, id="value-tombstone"),
        pytest.param(lambda r: {"ts": dataclasses.replace(r.ts, wall_ms=r.ts.wall_ms + 1)}, id="wall_ms"),
        pytest.param(lambda r: {"ts": dataclasses.replace(r.ts, counter=r.ts.counter + 1)}, id="counter"),
        pytest.param(lambda r: {"ts": dataclasses.replace(r.ts, node_id=PEERS[1].node_id)}, id="node_id"),
        pytest.param(lambda r: {"signature": bytes([r.signature[0] ^ 0xFF]) + r.signature[1:]}, id="signature"),
        pytest.param(lambda r: {"signature": r.signature[:-1]}, id="signature-truncated"),
    ],
)
def test_apply_rejects_altered_records_and_changes_nothing(trusting_store: Store, change: Any) -> None:
    s = trusting_store
    s.apply(peer_record(PEERS[1], key="other", value={"keep": True}, wall_ms=100))
    seen: list[Record] = []
    s.subscribe(seen.append)
    before = s.all()
    rec = peer_record(PEERS[0])
    forged = dataclasses.replace(rec, **change(rec))
    with pytest.raises(RecordError):
        s.apply(forged)
    assert s.all() == before
    assert seen == []


def test_records_from_an_unknown_node_are_refused_until_admitted(store: Store) -> None:
    stranger = Identity.generate()
    rec = peer_record(stranger)
    with pytest.raises(RecordError, match="unknown node"):
        store.apply(rec)
    assert store.all() == []
    store.put("node", stranger.node_id, {"public_key": stranger.public_key.hex(), "name": "s"})
    assert store.apply(rec) is True
    assert store.get("app", "web") == rec


def test_admission_arriving_by_apply_is_honoured(store: Store) -> None:
    stranger = Identity.generate()
    peer = PEERS[0]
    store.apply(admission(peer))  # ADMIN admits peer
    store.apply(admission(stranger, by=peer, wall_ms=2))  # peer admits stranger
    assert store.apply(peer_record(stranger))


def test_a_node_record_is_self_certifying_but_admits_only_itself(store: Store) -> None:
    # A node's own node record carries the key its id derives from, so it verifies alone
    # (records only reach a store from members; see Store._verifying_key). It does not let
    # the node write anything else before it is admitted, nor vouch for another key.
    stranger, other = Identity.generate(), Identity.generate()
    with pytest.raises(RecordError):
        store.apply(peer_record(stranger))
    ts = Timestamp(1, 0, stranger.node_id)
    lying = {"public_key": other.public_key.hex()}
    forged = Record("node", stranger.node_id, lying, ts,
                    stranger.sign(Record.signed_bytes("node", stranger.node_id, lying, ts)))
    with pytest.raises(RecordError):
        store.apply(forged)
    assert store.apply(admission(stranger, by=stranger))
    assert store.public_key_of(stranger.node_id) == stranger.public_key


def test_removed_node_is_refused_again(trusting_store: Store) -> None:
    s = trusting_store
    peer = PEERS[2]
    s.delete("node", peer.node_id)
    with pytest.raises(RecordError):
        s.apply(peer_record(peer))


@pytest.mark.parametrize("value", [{"public_key": "not hex"}, {"public_key": 12}, {"name": "no key"}])
def test_malformed_admission_does_not_admit(store: Store, value: dict[str, Any]) -> None:
    stranger = Identity.generate()
    store.put("node", stranger.node_id, value)
    with pytest.raises(RecordError):
        store.apply(peer_record(stranger))


def test_admission_of_another_key_does_not_admit(store: Store) -> None:
    stranger, other = Identity.generate(), Identity.generate()
    store.put("node", stranger.node_id, {"public_key": other.public_key.hex()})
    with pytest.raises(RecordError):
        store.apply(peer_record(stranger))


def test_admission_pairing_an_id_with_a_foreign_key_is_void(store: Store) -> None:
    # The node id is derived from the key, so "id X has key K" is only believed when
    # node_id_for(K) == X: otherwise K's holder could sign records in X's name.
    victim, forger = Identity.generate(), Identity.generate()
    store.put("node", victim.node_id, {"public_key": forger.public_key.hex()})
    ts = Timestamp(5_000, 0, victim.node_id)
    value = {"image": "evil"}
    forged = Record("app", "web", value, ts, forger.sign(Record.signed_bytes("app", "web", value, ts)))
    with pytest.raises(RecordError):
        store.apply(forged)
    assert store.get("app", "web") is None


# -- durability ------------------------------------------------------------------------------


def test_put_close_reopen_keeps_the_value(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = open_store(path)
    written = s.put("app", "web", {"image": "nginx:1", "env": {"A": "é"}})
    s.delete("scale", "gone")
    s.close()
    s2 = open_store(path)
    try:
        assert s2.get("app", "web") == written
        assert s2.value("app", "web") == {"image": "nginx:1", "env": {"A": "é"}}
        gone = s2.get("scale", "gone")
        assert gone is not None and gone.deleted
        written.verify(s2.public_key_of)
    finally:
        s2.close()


def test_reopen_with_a_clock_behind_issues_later_timestamps(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = open_store(path, clock=FakeClock(50_000))
    for i in range(3):
        s.put("app", f"a{i}", {"i": i})  # 50000.0, 50000.1, 50000.2
    s.close()
    clock = FakeClock(5)  # the wall clock has gone back
    s2 = open_store(path, clock=clock)
    try:
        highest = max(r.ts for r in s2.all())
        assert highest == Timestamp(50_000, 2, ADMIN.node_id)
        rec = s2.put("app", "a0", {"i": "new"})
        assert rec.ts > highest
        assert s2.value("app", "a0") == {"i": "new"}  # the new write is not lost to the old one
    finally:
        s2.close()


def test_reopen_respects_remote_records_from_the_future(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = open_store(path, clock=FakeClock(1_000))
    s.apply(admission(PEERS[0]))
    remote = peer_record(PEERS[0], wall_ms=9_000_000)
    s.apply(remote)
    s.close()
    s2 = open_store(path, clock=FakeClock(1_000))
    try:
        rec = s2.put("scale", "x", {"replicas": 1})
        assert (rec.ts.wall_ms, rec.ts.counter) > (remote.ts.wall_ms, remote.ts.counter)
    finally:
        s2.close()


# -- put_many --------------------------------------------------------------------------------


def test_put_many_writes_all(store: Store) -> None:
    recs = store.put_many([("app", "web", {"image": "x"}), ("scale", "web", {"replicas": 2}), ("app", "old", None)])
    assert [r.ts for r in recs] == sorted(r.ts for r in recs)
    assert store.value("app", "web") == {"image": "x"}
    assert store.value("scale", "web") == {"replicas": 2}
    old = store.get("app", "old")
    assert old is not None and old.deleted


def test_put_many_with_a_bad_item_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = open_store(path)
    s.put("app", "keep", {"v": 1})
    before = s.all()
    with pytest.raises(RecordError):
        s.put_many([("app", "web", {"image": "x"}), ("bogus", "k", {}), ("scale", "web", {"replicas": 1})])
    assert s.all() == before
    s.close()
    s2 = open_store(path)
    try:
        assert s2.all() == before
    finally:
        s2.close()


def test_put_many_failing_mid_transaction_rolls_back(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = open_store(path)
    s.put("app", "keep", {"v": 1})
    before = s.all()
    fired: list[Record] = []
    s.subscribe(fired.append)
    failing = FailingUpsert(s, 3)
    with pytest.raises(OSError, match="disk full"):
        s.put_many([("app", "a", {"v": 1}), ("app", "keep", {"v": 2}), ("scale", "a", {"replicas": 1})])
    assert failing.calls == 3  # two rows really were written inside the transaction before the failure
    assert s.all() == before
    assert fired == []
    failing.restore()
    s.put("app", "after", {"v": 3})  # the connection is usable again (no transaction left open)
    s.close()
    s2 = open_store(path)
    try:
        assert [r.key for r in s2.all()] == ["after", "keep"]
        assert s2.value("app", "keep") == {"v": 1}
    finally:
        s2.close()


# -- tombstone collection --------------------------------------------------------------------


def test_collect_tombstones_drops_only_old_tombstones(tmp_path: Path) -> None:
    clock = FakeClock(100)
    s = open_store(tmp_path / "state.db", clock=clock)
    try:
        s.put("app", "live-old", {"v": 1})  # @100, live: never collected
        s.delete("app", "dead-old")  # @100
        clock.ms = 200
        s.delete("app", "dead-at-horizon")  # @200
        clock.ms = 300
        s.delete("app", "dead-new")  # @300
        assert s.collect_tombstones(older_than_ms=200) == 1
        keys = [r.key for r in s.all()]
        assert keys == ["dead-at-horizon", "dead-new", "live-old"]
        assert s.collect_tombstones(older_than_ms=200) == 0
        assert s.collect_tombstones(older_than_ms=10_000) == 2
        assert [r.key for r in s.all()] == ["live-old"]
    finally:
        s.close()


# -- listeners -------------------------------------------------------------------------------


def test_listeners_fire_on_effective_changes_only(trusting_store: Store) -> None:
    s = trusting_store
    fired: list[Record] = []
    s.subscribe(fired.append)
    newer = peer_record(PEERS[0], value={"v": 2}, wall_ms=6_000)
    older = peer_record(PEERS[1], value={"v": 1}, wall_ms=5_000)
    assert s.apply(newer)
    assert fired == [newer]
    assert not s.apply(older)  # loses: no notification
    assert not s.apply(newer)  # duplicate: no notification
    assert fired == [newer]
    with pytest.raises(RecordError):
        s.apply(peer_record(Identity.generate()))  # rejected: no notification
    assert fired == [newer]
    local = s.put("scale", "web", {"replicas": 1})
    tomb = s.delete("scale", "web")
    many = s.put_many([("app", "x", {}), ("app", "y", {})])
    assert fired == [newer, local, tomb, *many]


def test_every_listener_is_called(store: Store) -> None:
    first: list[str] = []
    second: list[str] = []
    store.subscribe(lambda r: first.append(r.key))
    store.subscribe(lambda r: second.append(r.key))
    store.put("app", "web", {})
    assert first == second == ["web"]


# -- the in-memory copy ----------------------------------------------------------------------


def test_reads_hand_out_copies_and_the_cache_stays_signed(store: Store) -> None:
    value = {"image": "x", "env": {"A": "1"}, "ports": [1, 2]}
    store.put("app", "web", value)
    value["env"]["A"] = "changed after the write"  # the caller's dict is not the store's
    got = store.value("app", "web")
    assert got == {"image": "x", "env": {"A": "1"}, "ports": [1, 2]}
    assert got is not None
    got["env"]["A"] = "2"
    got["ports"].append(3)
    rec = store.get("app", "web")
    assert rec is not None and rec.value is not None
    rec.value["image"] = "y"
    store.records("app")[0].value["env"].clear()  # type: ignore[index]
    store.all()[0].value["image"] = "z"  # type: ignore[index]
    kept = store.peek("app", "web")
    assert kept is not None and kept.value == {"image": "x", "env": {"A": "1"}, "ports": [1, 2]}
    kept.verify(store.public_key_of)  # what this node sends its peers still verifies


def test_the_memory_copy_answers_as_the_file_does(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = open_store(path)
    s.put("app", "b", {"tuple": (1, 2), "nested": {"k": [None, True, 1.5]}})
    s.put("app", "a", {"v": 1})
    s.delete("app", "a")
    s.put("scale", "b", {"replicas": 3})
    s.put_many([("release", "b/1", {"r": 1}), ("release", "b/2", {"r": 2})])
    live = s.all()
    assert s.value("app", "b") == {"tuple": [1, 2], "nested": {"k": [None, True, 1.5]}}  # JSON's types
    assert s.count() == 5
    s.close()
    s2 = open_store(path)
    try:
        assert s2.all() == live
        assert s2.records("app", include_deleted=True) == [r for r in live if r.kind == "app"]
        assert s2.count() == 5
    finally:
        s2.close()


def test_peek_records_finds_a_key_prefix_only(store: Store) -> None:
    for key in ["web/n2", "web/n1", "web2/n1", "we/n1", "api/n1", "web", "web/\U0010fff0"]:
        store.put("route", key, {"k": key})
    store.delete("route", "web/n2")
    assert [r.key for r in store.peek_records("route", prefix="web/")] == ["web/n1", "web/\U0010fff0"]
    assert [r.key for r in store.peek_records("route", prefix="web/", include_deleted=True)] == [
        "web/n1", "web/n2", "web/\U0010fff0"]
    assert [r.key for r in store.peek_records("route", prefix="zzz")] == []
    assert len(store.peek_records("route")) == 6
    with pytest.raises(RecordError):
        store.peek_records("bogus")


def test_collected_tombstones_leave_memory_too(tmp_path: Path) -> None:
    clock = FakeClock(100)
    s = open_store(tmp_path / "state.db", clock=clock)
    try:
        s.delete("app", "gone")
        clock.ms = 300
        s.put("app", "gone2", {"v": 1})
        assert s.collect_tombstones(older_than_ms=200) == 1
        assert s.get("app", "gone") is None
        assert [r.key for r in s.peek_records("app", include_deleted=True)] == ["gone2"]
        assert s.count() == 1
        s.put("app", "gone", {"v": 2})  # the key can come back
        assert [r.key for r in s.records("app")] == ["gone", "gone2"]
    finally:
        s.close()


def test_apply_many_checks_each_record_against_those_before_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    s = open_store(path)
    fired: list[Record] = []
    s.subscribe(fired.append)
    peer = PEERS[0]
    good = peer_record(peer, key="web", value={"v": 1}, wall_ms=5_000)
    newer = peer_record(peer, key="web", value={"v": 2}, wall_ms=6_000)
    older = peer_record(peer, key="web", value={"v": 0}, wall_ms=4_000)
    forged = dataclasses.replace(peer_record(peer, key="api"), value={"image": "evil"})
    stranger = peer_record(PEERS[1], key="db")  # PEERS[1] is never admitted
    batch = [good, forged, admission(peer), stranger, newer, older]
    # ``good`` comes before its origin's admission: refused; ``newer`` after it: stored.
    applied, rejected = s.apply_many(batch)
    assert applied == [admission(peer), newer]
    assert [r for r, _ in rejected] == [good, forged, stranger]
    assert all(isinstance(exc, RecordError) for _, exc in rejected)
    assert fired == applied
    assert s.value("app", "web") == {"v": 2} and s.get("app", "api") is None and s.get("app", "db") is None
    live = s.all()
    s.close()
    s2 = open_store(path)
    try:
        assert s2.all() == live
    finally:
        s2.close()


def test_apply_many_rolls_back_whole_on_a_disk_error(trusting_store: Store) -> None:
    s = trusting_store
    before = s.all()
    FailingUpsert(s, 2)
    with pytest.raises(OSError):
        s.apply_many([peer_record(PEERS[0], key="a"), peer_record(PEERS[0], key="b")])
    assert s.all() == before and s.peek("app", "a") is None


def test_a_record_larger_than_the_cluster_replicates_is_refused_and_nothing_is_written(store: Store) -> None:
    before = store.all()
    with pytest.raises(RecordTooLarge) as err:
        store.put_many([("scale", "web", {"replicas": 1}), ("app", "web", {"env": {"A": "x" * MAX_RECORD_BYTES}})])
    assert (err.value.kind, err.value.key, err.value.limit) == ("app", "web", MAX_RECORD_BYTES)
    with pytest.raises(RecordTooLarge):
        store.put("secret", "deploy-key/web", {"v": "k" * MAX_RECORD_BYTES})
    assert store.all() == before
    # A record exactly at the limit is written.
    fits = {"v": ""}
    fits["v"] = "x" * (MAX_RECORD_BYTES - gossip_size("secret", "k", fits))
    assert gossip_size("secret", "k", fits) == MAX_RECORD_BYTES
    store.put("secret", "k", fits)
    assert store.value("secret", "k") == fits
