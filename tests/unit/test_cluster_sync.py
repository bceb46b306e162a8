"""Push-pull anti-entropy between two real stores: digests, diffs, and convergence."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pleaco.cluster.messages import MessageError, decode_records, record_to_json
from pleaco.cluster.sync import MAX_PARKED, StoreSync
from pleaco.identity import Identity
from pleaco.store import HLC, Record, Store, Timestamp

A = Identity.generate()
B = Identity.generate()
STRANGER = Identity.generate()
RAM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def make_store(path: Path, identity: Identity, clock: Clock) -> Store:
    store = Store(path, identity, HLC(identity.node_id, clock))
    # A node's own node record, keyed by its id and carrying its key, is self-certifying.
    store.put("node", identity.node_id, {"public_key": identity.public_key.hex(), "name": identity.node_id[:6]})
    return store


def introduce(a: Store, b: Store) -> None:
    """Each store learns the other's node record (what the join handshake hands over)."""
    ra, rb = a.get("node", a.identity.node_id), b.get("node", b.identity.node_id)
    assert ra is not None and rb is not None
    b.apply(ra)
    a.apply(rb)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Store, Store, Clock, Clock]]:
    ca, cb = Clock(1_000), Clock(1_000)
    a, b = make_store(tmp_path / "a.db", A, ca), make_store(tmp_path / "b.db", B, cb)
    introduce(a, b)
    yield a, b, ca, cb
    a.close()
    b.close()


def keys(records: list[Record]) -> set[tuple[str, str]]:
    return {(r.kind, r.key) for r in records}


def exchange(a: Store, b: Store) -> None:
    """One push-pull, as the protocol runs it: digests, then only the differing records both ways."""
    sa, sb = StoreSync(a), StoreSync(b)
    send, want = sa.diff(sb.digest())
    sb.records_received(A.node_id, send)
    sa.records_received(B.node_id, decode_records([record_to_json(r) for r in sb.records_for(want)], "pull"))


def test_digest_lists_every_record_with_its_stamp(pair: tuple[Store, Store, Clock, Clock]) -> None:
    a, _, _, _ = pair
    a.put("app", "web", {"image": "nginx"})
    a.delete("route", "old")
    digest = StoreSync(a).digest()
    assert len(digest) == a.count() == 4
    for kind, key, wall, counter, node in digest:
        rec = a.get(kind, key)
        assert rec is not None
        assert [wall, counter, node] == [rec.ts.wall_ms, rec.ts.counter, rec.ts.node_id]
    assert ["route", "old"] in [d[:2] for d in digest]  # tombstones too


def test_diff_and_want(pair: tuple[Store, Store, Clock, Clock]) -> None:
    a, b, ca, cb = pair
    shared = a.put("app", "same", {"v": 1})
    b.apply(shared)
    ca.ms = 2_000
    only_a = a.put("app", "only-a", {"v": 1})
    a_older = a.put("app", "both-b-newer", {"v": "a"})
    a_newer_early = b.put("app", "both-a-newer", {"v": "b"})
    cb.ms = 3_000
    only_b = b.put("app", "only-b", {"v": 1})
    b_newer = b.put("app", "both-b-newer", {"v": "b"})
    ca.ms = 4_000
    a_newer = a.put("app", "both-a-newer", {"v": "a"})
    a_tomb = a.delete("scale", "gone")

    send, want = StoreSync(a).diff(StoreSync(b).digest())
    assert {(r.kind, r.key): r for r in send} == {
        ("app", "only-a"): only_a, ("app", "both-a-newer"): a_newer, ("scale", "gone"): a_tomb,
    }
    assert sorted(map(tuple, want)) == [("app", "both-b-newer"), ("app", "only-b")]
    # And the other way round, the mirror image.
    send_b, want_b = StoreSync(b).diff(StoreSync(a).digest())
    assert keys(send_b) == {("app", "only-b"), ("app", "both-b-newer")}
    assert {r.ts for r in send_b} == {only_b.ts, b_newer.ts}
    assert sorted(map(tuple, want_b)) == [("app", "both-a-newer"), ("app", "only-a"), ("scale", "gone")]
    assert shared not in send and a_older not in send and a_newer_early not in send_b


def test_identical_stores_have_nothing_to_exchange(pair: tuple[Store, Store, Clock, Clock]) -> None:
    a, b, _, _ = pair
    for rec in (a.put("app", "x", {"n": 1}), a.delete("app", "y")):
        b.apply(rec)
    assert StoreSync(a).diff(StoreSync(b).digest()) == ([], [])
    assert StoreSync(b).diff(StoreSync(a).digest()) == ([], [])


def test_empty_or_absent_digest_sends_everything(pair: tuple[Store, Store, Clock, Clock]) -> None:
    a, _, _, _ = pair
    a.put("app", "x", {"n": 1})
    digests: list[Any] = [[], None]
    for digest in digests:
        send, want = StoreSync(a).diff(digest)
        assert send == a.all()
        assert want == []


def test_exchange_both_ways_converges(pair: tuple[Store, Store, Clock, Clock]) -> None:
    a, b, ca, cb = pair
    a.put("app", "web", {"image": "a"})
    a.delete("route", "x")
    cb.ms = 2_000
    b.put("app", "web", {"image": "b"})
    b.put("app", "api", {"image": "b"})
    b.put("route", "x", {"to": "web"})
    ca.ms = 9_000
    a.put("scale", "web", {"replicas": 3})
    assert a.all() != b.all()
    exchange(a, b)
    assert a.all() == b.all()
    assert a.value("app", "web") == {"image": "b"}  # b's write came later
    assert b.value("scale", "web") == {"replicas": 3}
    assert a.value("route", "x") == {"to": "web"}
    assert StoreSync(a).diff(StoreSync(b).digest()) == ([], [])


def test_records_for(pair: tuple[Store, Store, Clock, Clock]) -> None:
    a, _, _, _ = pair
    rec = a.put("app", "web", {"n": 1})
    sync = StoreSync(a)
    assert sync.records_for([["app", "web"], ["app", "missing"], ["nokind", "x"]]) == [rec]
    assert sync.records_for([]) == []


@pytest.mark.parametrize("keys_", [None, {}, "app/web", [["app"]], [["app", "web", "x"]], [["app", 1]],
                                   [("app", "web")], ["app"], [[None, "web"]]])
def test_records_for_rejects_malformed_wants(pair: tuple[Store, Store, Clock, Clock], keys_: Any) -> None:
    with pytest.raises(MessageError, match="want"):
        StoreSync(pair[0]).records_for(keys_)


@pytest.mark.parametrize("digest", [
    {}, "digest", 1, True, [None], [[]], [["app", "web", 1, 2]], [["app", "web", 1, 2, A.node_id, 0]],
    [("app", "web", 1, 2, A.node_id)], [[1, "web", 1, 2, A.node_id]], [["app", None, 1, 2, A.node_id]],
    [["app", "web", "1", 2, A.node_id]], [["app", "web", 1, 2.0, A.node_id]], [["app", "web", True, 2, A.node_id]],
    [["app", "web", 1, False, A.node_id]], [["app", "web", 1, 2, None]], [["app", "web", 1, 2, 7]],
    [["app", "web", 1, 2, A.node_id], "x"],
])
def test_malformed_digests_are_message_errors(pair: tuple[Store, Store, Clock, Clock], digest: Any) -> None:
    with pytest.raises(MessageError, match="digest"):
        StoreSync(pair[0]).diff(digest)


def test_records_received_rejects_unverifiable_records(pair: tuple[Store, Store, Clock, Clock]) -> None:
    a, _, _, _ = pair
    rejections: list[str] = []
    sync = StoreSync(a, on_reject=rejections.append)
    # From a node nobody admitted.
    foreign = Record.create(STRANGER, "app", "evil", {"x": 1}, Timestamp(10**13, 0, STRANGER.node_id))
    # B's key, but the value changed after signing.
    good = Record.create(B, "app", "ok", {"x": 1}, Timestamp(10**13, 0, B.node_id))
    forged = Record(good.kind, good.key, {"x": 2}, good.ts, good.signature)
    before = a.all()
    sync.records_received(B.node_id, [foreign, forged])
    # The forged one is refused; the stranger's waits for an admission that never comes.
    assert rejections == ["record_rejected"]
    assert a.all() == before
    sync.records_received(B.node_id, [good])
    assert a.get("app", "ok") == good
    assert len(rejections) == 1


def test_a_record_that_outran_its_origins_admission_is_applied_when_the_admission_arrives(
        pair: tuple[Store, Store, Clock, Clock]) -> None:
    """Gossip brings a just-admitted node's record before the member's admission of it: it
    is kept, applied and spread once the admission is here, not left to a push-pull."""
    a, b, _, _ = pair
    queued: list[Record] = []
    rejections: list[str] = []

    async def main() -> None:
        sync = StoreSync(b, on_reject=rejections.append)
        sync.attach(queued.append)
        early = Record.create(STRANGER, "app", "deployed-through-the-new-node", {"x": 1},
                              Timestamp(10**13, 0, STRANGER.node_id))
        sync.records_received(A.node_id, [early])
        assert b.get("app", "deployed-through-the-new-node") is None
        admission = a.put("node", STRANGER.node_id, {"public_key": STRANGER.public_key.hex(), "name": "new"})
        sync.records_received(A.node_id, [admission])
        deadline = time.monotonic() + 10  # the retry runs on the loop, after this call
        while b.get("app", "deployed-through-the-new-node") is None:
            assert time.monotonic() < deadline, "the parked record was not applied on admission"
            await asyncio.sleep(0.001)
        assert b.get("app", "deployed-through-the-new-node") == early

    asyncio.run(main())
    assert rejections == []
    assert [(r.kind, r.key) for r in queued] == [("node", STRANGER.node_id), ("app", "deployed-through-the-new-node")]


def test_parked_records_are_bounded(pair: tuple[Store, Store, Clock, Clock]) -> None:
    a, _, _, _ = pair
    rejections: list[str] = []
    sync = StoreSync(a, on_reject=rejections.append)
    records = [Record.create(STRANGER, "app", f"r{i}", {"i": i}, Timestamp(10**13, i, STRANGER.node_id))
               for i in range(MAX_PARKED + 3)]
    sync.records_received(B.node_id, records)
    assert len(rejections) == 3  # the three oldest parked are dropped, counted as refused


def test_changes_are_queued_for_gossip_once_attached(pair: tuple[Store, Store, Clock, Clock]) -> None:
    a, b, _, _ = pair
    queued: list[Record] = []

    async def main() -> None:
        sync = StoreSync(b)
        b.put("app", "before-attach", {"n": 0})
        sync.attach(queued.append)
        rec = a.put("app", "remote", {"n": 1})
        sync.records_received(A.node_id, [rec])  # a remote record that won
        sync.records_received(A.node_id, [rec])  # again: it changes nothing, so nothing is queued
        b.put("app", "local", {"n": 2})

    asyncio.run(main())
    assert [(r.kind, r.key) for r in queued] == [("app", "remote"), ("app", "local")]


# -- convergence from any pair of histories ----------------------------------------------------

ops = st.lists(
    st.tuples(st.sampled_from("ab"), st.sampled_from(["app", "route", "scale"]), st.sampled_from("xyz"),
              st.one_of(st.none(), st.integers(0, 3)), st.integers(0, 3)),
    max_size=12,
)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(ops)
def test_any_histories_converge_after_one_exchange(history: list[tuple[str, str, str, int | None, int]]) -> None:
    with tempfile.TemporaryDirectory(dir=RAM_DIR) as tmp:
        ca, cb = Clock(1_000), Clock(1_000)
        a, b = make_store(Path(tmp) / "a.db", A, ca), make_store(Path(tmp) / "b.db", B, cb)
        try:
            introduce(a, b)
            for who, kind, key, value, tick in history:
                store, clock = (a, ca) if who == "a" else (b, cb)
                clock.ms += tick
                if value is None:
                    store.delete(kind, key)
                else:
                    store.put(kind, key, {"v": value})
            send, _ = StoreSync(a).diff(StoreSync(b).digest())
            # The diff is exactly what differs: nothing a already agrees with b on is sent.
            for rec in send:
                assert b.get(rec.kind, rec.key) != rec
            exchange(a, b)
            assert a.all() == b.all()
            assert StoreSync(a).diff(StoreSync(b).digest()) == ([], [])
        finally:
            a.close()
            b.close()
