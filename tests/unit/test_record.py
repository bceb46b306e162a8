"""Records: signing, verification and the last-writer-wins merge."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pleaco.identity import Identity
from pleaco.store.hlc import Timestamp
from pleaco.store.record import (
    GOSSIP_MAX_PACKET,
    GOSSIP_PACKET_OVERHEAD,
    KINDS,
    MAX_RECORD_BYTES,
    Record,
    RecordError,
    RecordTooLarge,
    canonical_json,
    check_size,
    gossip_size,
    merge,
)

IDENTITIES = [Identity.generate() for _ in range(3)]
KEYS = {i.node_id: i.public_key for i in IDENTITIES}
ALICE = IDENTITIES[0]


def known(node_id: str) -> bytes | None:
    return KEYS.get(node_id)


def make(
    identity: Identity = ALICE,
    kind: str = "app",
    key: str = "web",
    value: dict[str, Any] | None = None,
    wall_ms: int = 1_000,
    counter: int = 0,
) -> Record:
    if value is None:
        value = {"image": "nginx:1"}
    return Record.create(identity, kind, key, value, Timestamp(wall_ms, counter, identity.node_id))


# -- strategies -------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
record_values = st.none() | st.dictionaries(st.text(max_size=6), json_values, max_size=4)


@st.composite
def records(draw: st.DrawFn) -> Record:
    """Versions of one record (same kind and key), from several origins, with small clocks.

    The ranges are tiny on purpose, so equal timestamps from one node with different values
    (a buggy or hostile origin) show up often.
    """
    identity = draw(st.sampled_from(IDENTITIES))
    ts = Timestamp(draw(st.integers(0, 3)), draw(st.integers(0, 2)), identity.node_id)
    return Record.create(identity, "app", "web", draw(record_values), ts)


maybe_records = st.none() | records()


# -- signing ----------------------------------------------------------------------------


def test_created_record_verifies() -> None:
    rec = make()
    rec.verify(known)  # does not raise
    assert rec.origin == ALICE.node_id
    assert not rec.deleted


def test_tombstone_verifies_and_is_deleted() -> None:
    rec = Record.create(ALICE, "app", "web", None, Timestamp(5, 0, ALICE.node_id))
    rec.verify(known)
    assert rec.deleted


def test_signed_bytes_are_canonical() -> None:
    ts = Timestamp(1, 2, "n")
    a = Record.signed_bytes("app", "k", {"b": 1, "a": [1, 2]}, ts)
    b = Record.signed_bytes("app", "k", {"a": [1, 2], "b": 1}, ts)
    assert a == b
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"kind": "scale"}, id="kind"),
        pytest.param({"key": "web2"}, id="key"),
        pytest.param({"value": {"image": "evil:1"}}, id="value"),
        pytest.param({"value": None}, id="value-to-tombstone"),
        pytest.param({"ts": Timestamp(1_001, 0, ALICE.node_id)}, id="wall_ms"),
        pytest.param({"ts": Timestamp(1_000, 1, ALICE.node_id)}, id="counter"),
        pytest.param({"ts": Timestamp(1_000, 0, IDENTITIES[1].node_id)}, id="origin"),
    ],
)
def test_altered_field_is_rejected(change: dict[str, Any]) -> None:
    rec = make()
    forged = dataclasses.replace(rec, **change)
    with pytest.raises(RecordError):
        forged.verify(known)


def test_tombstone_turned_into_value_is_rejected() -> None:
    rec = Record.create(ALICE, "app", "web", None, Timestamp(5, 0, ALICE.node_id))
    with pytest.raises(RecordError):
        dataclasses.replace(rec, value={"image": "x"}).verify(known)


@pytest.mark.parametrize("position", [0, 31, 63])
def test_flipped_signature_bit_is_rejected(position: int) -> None:
    rec = make()
    sig = bytearray(rec.signature)
    sig[position] ^= 0x01
    with pytest.raises(RecordError, match="bad signature"):
        dataclasses.replace(rec, signature=bytes(sig)).verify(known)


@pytest.mark.parametrize("signature", [b"", b"\x00" * 64, b"\x01" * 10])
def test_junk_signature_is_rejected(signature: bytes) -> None:
    with pytest.raises(RecordError):
        dataclasses.replace(make(), signature=signature).verify(known)


def test_signature_by_another_key_is_rejected() -> None:
    rec = make(identity=ALICE)
    other = make(identity=IDENTITIES[1])
    # Alice's record carrying Bob's (valid, for his own record) signature.
    with pytest.raises(RecordError):
        dataclasses.replace(rec, signature=other.signature).verify(known)


def test_unknown_origin_is_rejected() -> None:
    stranger = Identity.generate()
    rec = make(identity=stranger)
    with pytest.raises(RecordError, match="unknown node"):
        rec.verify(known)
    rec.verify(lambda node_id: stranger.public_key if node_id == stranger.node_id else None)


def test_origin_with_wrong_admitted_key_is_rejected() -> None:
    rec = make(identity=ALICE)
    with pytest.raises(RecordError):
        rec.verify(lambda node_id: IDENTITIES[1].public_key)


def test_unknown_kind_is_refused_on_create() -> None:
    with pytest.raises(RecordError, match="unknown record kind"):
        make(kind="bogus")


def test_unknown_kind_is_refused_on_verify() -> None:
    rec = make()
    # Even with a valid signature over the unknown kind, the kind itself is refused.
    sig = ALICE.sign(Record.signed_bytes("bogus", rec.key, rec.value, rec.ts))
    forged = Record("bogus", rec.key, rec.value, rec.ts, sig)
    with pytest.raises(RecordError, match="unknown record kind"):
        forged.verify(known)


def test_every_design_kind_is_accepted() -> None:
    assert {"node", "app", "release", "build", "route", "secret", "scale", "upgrade", "subnet",
            "volume"} == KINDS
    for kind in sorted(KINDS):
        make(kind=kind).verify(known)


def test_create_refuses_a_timestamp_from_another_node() -> None:
    with pytest.raises(RecordError):
        Record.create(ALICE, "app", "web", {}, Timestamp(1, 0, IDENTITIES[1].node_id))


# -- merge ------------------------------------------------------------------------------


def test_newer_timestamp_wins() -> None:
    old = make(wall_ms=1_000, value={"v": 1})
    new = make(wall_ms=1_001, value={"v": 2})
    assert merge(old, new) is new
    assert merge(new, old) is new


def test_counter_breaks_equal_wall_time() -> None:
    a = make(wall_ms=1_000, counter=0, value={"v": 1})
    b = make(wall_ms=1_000, counter=1, value={"v": 2})
    assert merge(a, b) is b
    assert merge(b, a) is b


def test_node_id_breaks_equal_hlc() -> None:
    low, high = sorted(IDENTITIES[:2], key=lambda i: i.node_id)
    a = make(identity=low, value={"v": 1})
    b = make(identity=high, value={"v": 2})
    assert merge(a, b) is b
    assert merge(b, a) is b


def test_tombstone_wins_over_older_value_and_loses_to_newer() -> None:
    live = make(wall_ms=1_000)
    dead = Record.create(ALICE, "app", "web", None, Timestamp(2_000, 0, ALICE.node_id))
    later = make(wall_ms=3_000, value={"image": "back:2"})
    assert merge(live, dead) is dead
    assert merge(dead, later) is later


def test_equal_timestamps_same_node_different_values_pick_one_winner() -> None:
    a = make(value={"v": "a"})
    b = make(value={"v": "b"})
    assert a.ts == b.ts and a.signature != b.signature
    winner = merge(a, b)
    assert winner is merge(b, a)
    assert winner in (a, b)


def test_merge_with_nothing() -> None:
    rec = make()
    assert merge(None, None) is None
    assert merge(rec, None) is rec
    assert merge(None, rec) is rec


@settings(max_examples=200, deadline=None)
@given(a=maybe_records, b=maybe_records)
def test_merge_is_commutative(a: Record | None, b: Record | None) -> None:
    assert merge(a, b) == merge(b, a)


@settings(max_examples=200, deadline=None)
@given(a=maybe_records, b=maybe_records, c=maybe_records)
def test_merge_is_associative(a: Record | None, b: Record | None, c: Record | None) -> None:
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@settings(max_examples=200, deadline=None)
@given(a=maybe_records)
def test_merge_is_idempotent(a: Record | None) -> None:
    assert merge(a, a) == a


@settings(max_examples=200, deadline=None)
@given(a=records(), b=records())
def test_merge_returns_one_of_its_inputs_and_the_winner_is_not_older(a: Record, b: Record) -> None:
    winner = merge(a, b)
    assert winner is a or winner is b
    assert winner is not None
    assert winner.order_key() >= a.order_key()
    assert winner.order_key() >= b.order_key()


@settings(max_examples=200, deadline=None)
@given(batch=st.lists(records(), min_size=1, max_size=8), data=st.data())
def test_merge_folds_to_the_same_winner_in_any_order(batch: list[Record], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(batch))
    left: Record | None = None
    for rec in batch:
        left = merge(left, rec)
    right: Record | None = None
    for rec in shuffled:
        right = merge(right, rec)
    assert left == right


def test_unencodable_record_is_a_record_error() -> None:
    rec = make()
    with pytest.raises(RecordError):
        dataclasses.replace(rec, key="\ud800").verify(known)


# -- size: a record fits in one gossip packet -----------------------------------------


def test_the_stores_packet_figures_are_the_clusters() -> None:
    """The store keeps its own copy of the gossip packet figures (it is below the cluster):
    they must be the cluster's."""
    from pleaco.cluster import membership, wire
    from pleaco.cluster.config import GossipConfig

    assert GossipConfig().max_packet == GOSSIP_MAX_PACKET
    assert wire.OVERHEAD + membership.PACKET_BASE + 1 == GOSSIP_PACKET_OVERHEAD


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), key=st.text(max_size=80),
       value=st.none() | st.dictionaries(st.text(max_size=20), st.text(max_size=60) | st.integers(), max_size=6),
       wall=st.integers(0, 10**13 - 1), counter=st.integers(0, 10**10 - 1))
def test_gossip_size_bounds_what_gossip_sends(kind: str, key: str, value: Any, wall: int, counter: int) -> None:
    from pleaco.cluster import messages

    try:
        rec = Record.create(ALICE, kind, key, value, Timestamp(wall, counter, ALICE.node_id))
    except RecordError:  # text that is not UTF-8
        return
    sent = len(messages.dumps(messages.record_to_json(rec)))
    assert sent <= gossip_size(kind, key, value) <= sent + 23  # exact but for the clock's width


def test_too_large_names_kind_key_size_and_limit() -> None:
    check_size("app", "web", {"env": {"A": "x" * 500}})
    with pytest.raises(RecordTooLarge) as err:
        check_size("app", "web", {"env": {"A": "x" * MAX_RECORD_BYTES}})
    assert isinstance(err.value, RecordError)
    msg = str(err.value)
    assert "app/web" in msg and str(err.value.size) in msg and str(MAX_RECORD_BYTES) in msg
