"""The packet codec: every packet round-trips, and anything malformed is a MessageError (and nothing else)."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pleaco.cluster import messages
from pleaco.cluster.messages import (
    MAX_INT,
    MessageError,
    Packet,
    Update,
    decode,
    decode_records,
    decode_updates,
    encode,
    loads,
    record_from_json,
    record_to_json,
)
from pleaco.identity import Identity
from pleaco.store.hlc import Timestamp
from pleaco.store.record import Record, RecordError

ME = Identity.generate()
PEER = Identity.generate()
N1 = "0123456789abcdef0123456789abcdef"
N2 = "fedcba9876543210fedcba9876543210"


def rec(kind: str = "app", key: str = "web", value: dict[str, Any] | None = None, wall: int = 1_700_000_000_000,
        counter: int = 0, who: Identity = ME) -> Record:
    return Record.create(who, kind, key, {"image": "nginx"} if value is None else value,
                         Timestamp(wall, counter, who.node_id))


def tombstone(key: str = "gone") -> Record:
    return Record.create(ME, "route", key, None, Timestamp(5, 7, ME.node_id))


UPDATES = (
    Update("alive", N1, 3, "10.0.0.1:7401", {"name": "n1", "zone": "a"}),
    Update("suspect", N2, 0, source=N1),
    Update("dead", N1, MAX_INT, "[::1]:7401", source=N2),
    Update("left", N2, 9),
)
RECORDS = (rec(), rec("node", ME.node_id, {"public_key": ME.public_key.hex(), "name": "é ✓"}), tombstone(),
           rec("secret", "k" * messages.MAX_KEY, {"nested": {"list": [1, 2.5, None, True, "x"]}}, 0, MAX_INT, PEER))

PACKETS = [
    Packet("ping", seq=1, target=N1),
    Packet("iping", seq=2, target=N1, addr="host.example:7401", nack=True),
    Packet("iping", seq=MAX_INT, target=N2, addr="[fe80::1]:1"),
    Packet("ack", seq=3),
    Packet("nack", seq=4),
    Packet("gossip"),
    Packet("gossip", updates=UPDATES, records=RECORDS),
    Packet("ping", seq=5, target=N2, updates=UPDATES[:1], records=RECORDS[:1]),
    Packet("ack", seq=6, updates=UPDATES, records=RECORDS),
]


@pytest.mark.parametrize("packet", PACKETS, ids=lambda p: p.type)
def test_every_packet_round_trips(packet: Packet) -> None:
    data = encode(packet)
    assert isinstance(data, bytes)
    assert decode(data) == packet
    # The encoding is deterministic, so a re-encoding of the decoded packet is byte-identical.
    assert encode(decode(data)) == data


def test_round_tripped_records_still_verify() -> None:
    keys = {ME.node_id: ME.public_key, PEER.node_id: PEER.public_key}
    out = decode(encode(Packet("gossip", records=RECORDS)))
    assert len(out.records) == len(RECORDS)
    for r in out.records:
        r.verify(keys.get)
    assert out.records[2].deleted


def test_encode_leaves_out_empty_fields() -> None:
    assert json.loads(encode(Packet("ack"))) == {"t": "ack"}
    body = json.loads(encode(Packet("iping", 9, N1, "h:1", True)))
    assert body == {"t": "iping", "q": 9, "g": N1, "a": "h:1", "x": True}
    assert Update("suspect", N1, 1).to_json() == {"k": "suspect", "n": N1, "i": 1}


def test_record_json_round_trip() -> None:
    for r in RECORDS:
        raw = record_to_json(r)
        assert set(raw) == {"k", "y", "v", "w", "c", "o", "s"}
        assert record_from_json(json.loads(json.dumps(raw))) == r
    assert decode_records([record_to_json(r) for r in RECORDS], "push") == list(RECORDS)


def test_decode_updates_round_trip() -> None:
    assert decode_updates([u.to_json() for u in UPDATES]) == UPDATES
    assert decode_updates([]) == ()


def test_loads() -> None:
    assert loads(b'{"a":[1,2]}') == {"a": [1, 2]}
    for bad in (b"", b"{", b"\xff\xfe\xfd", b"[" * 100_000, b'{"a":' * 50_000, b"1" * 5000, b"nul"):
        with pytest.raises(MessageError, match="not JSON"):
            loads(bad)


# -- malformed input -------------------------------------------------------------------------

VALID: dict[str, Any] = {
    "t": "iping", "q": 1, "g": N1, "a": "h:1", "x": False,
    "u": [{"k": "alive", "n": N1, "i": 1, "a": "h:2", "m": {"a": "b"}, "f": N2}],
    "r": [record_to_json(RECORDS[0])],
}


def test_the_base_of_the_malformed_cases_is_valid() -> None:
    assert decode(json.dumps(VALID).encode()).type == "iping"


def mutate(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(body: dict[str, Any]) -> None:
        target: Any = body
        for step in path[:-1]:
            target = target[step]
        if value is DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return apply


DELETE = object()
BAD_NODES = ["", "0123456789ABCDEF0123456789ABCDEF", N1[:-1], N1 + "0", N1 + "\n", "g" * 32, 7, None, ["x"]]
BAD_ADDRS = ["host", "host:", "host:0", "host:65536", "host:99999", "host:123456", "ho st:80", "host:8o",
             ":80", "host:80\n", "hőst:80", "a" * 254 + ":80", 80, None, "host:-1", "host:+80"]
BAD_INTS = [-1, MAX_INT + 1, 2**64, True, False, 1.0, 1.5, "1", None, [1], {"v": 1}]

CASES: list[tuple[str, tuple[Any, ...], Any]] = [
    *[("packet.t", ("t",), v) for v in ["pong", "", "PING", 1, None, True, "x" * 300, "\ud800"]],
    ("packet.t", ("t",), DELETE),
    *[("packet.q", ("q",), v) for v in BAD_INTS],
    *[("packet.g", ("g",), v) for v in BAD_NODES],
    *[("packet.a", ("a",), v) for v in BAD_ADDRS],
    *[("packet.x", ("x",), v) for v in [1, 0, "true", None, "false", []]],
    *[("packet.u", ("u",), v) for v in [{}, "u", 1, None, True]],
    *[("packet.r", ("r",), v) for v in [{}, "r", 1, None]],
    ("unknown field 'z'", ("z",), 1),
    ("unknown field 'seq'", ("seq",), 1),
    ("update: expected an object", ("u", 0), []),
    ("update: expected an object", ("u", 0), "alive"),
    ("unknown field 'zz'", ("u", 0, "zz"), 1),
    *[("update.k", ("u", 0, "k"), v) for v in ["zombie", "", 1, None, "ALIVE", "\ud800"]],
    ("update.k", ("u", 0, "k"), DELETE),
    *[("update.n", ("u", 0, "n"), v) for v in BAD_NODES],
    ("update.n", ("u", 0, "n"), DELETE),
    *[("update.i", ("u", 0, "i"), v) for v in BAD_INTS],
    ("update.i", ("u", 0, "i"), DELETE),
    *[("update.a", ("u", 0, "a"), v) for v in BAD_ADDRS],
    ("an alive update needs an address", ("u", 0, "a"), DELETE),
    *[("update.f", ("u", 0, "f"), v) for v in BAD_NODES],
    *[("update.m", ("u", 0, "m"), v) for v in [
        [], "m", 1, None, {"a": 1}, {"a": None}, {"a": ["b"]}, {"k" * 64: "v"}, {"k": "v" * 256},
        {f"k{i}": "v" for i in range(17)},
    ]],
    ("record: expected an object", ("r", 0), [1]),
    ("record: expected an object", ("r", 0), None),
    ("unknown field 'sig'", ("r", 0, "sig"), "x"),
    *[("record.k", ("r", 0, "k"), v) for v in ["widget", "", "APP", 1, None, "\ud800"]],
    *[("record.y", ("r", 0, "y"), v) for v in ["y" * (messages.MAX_KEY + 1), 1, None, ["web"], "web\ud800"]],
    *[("record.v", ("r", 0, "v"), v) for v in [[], "value", 1, True, 2.5]],
    *[("record.w", ("r", 0, "w"), v) for v in BAD_INTS],
    *[("record.c", ("r", 0, "c"), v) for v in BAD_INTS],
    *[("record.o", ("r", 0, "o"), v) for v in BAD_NODES],
    *[("record.s", ("r", 0, "s"), v) for v in [
        "", "!!!!", "not base64 at all", base64.b64encode(b"x" * 63).decode(), base64.b64encode(b"x" * 65).decode(),
        "A" * 101, 1, None, base64.b64encode(b"x" * 64).decode()[:-2],
    ]],
    *[(f"record.{k}", ("r", 0, k), DELETE) for k in ("k", "y", "w", "c", "o", "s")],
]


@pytest.mark.parametrize(("expect", "path", "value"), CASES, ids=[f"{'.'.join(map(str, c[1]))}={c[2]!r}"[:60]
                                                                  for c in CASES])
def test_malformed_field_is_a_message_error(expect: str, path: tuple[Any, ...], value: Any) -> None:
    body = copy.deepcopy(VALID)
    mutate(path, value)(body)
    with pytest.raises(MessageError) as info:
        decode(json.dumps(body).encode())
    assert expect in str(info.value)


@pytest.mark.parametrize("raw", [b"[]", b'"gossip"', b"1", b"null", b"true", b"[{}]", b'[{"t":"ack"}]'])
def test_a_packet_must_be_an_object(raw: bytes) -> None:
    with pytest.raises(MessageError, match="packet: expected an object"):
        decode(raw)


def test_ping_and_iping_need_their_fields() -> None:
    with pytest.raises(MessageError, match="a ping needs a target"):
        decode(b'{"t":"ping"}')
    with pytest.raises(MessageError, match="iping needs a target"):
        decode(json.dumps({"t": "iping", "a": "h:1"}).encode())
    with pytest.raises(MessageError, match="an iping needs the target's address"):
        decode(json.dumps({"t": "iping", "g": N1}).encode())


def test_ports_at_the_bounds() -> None:
    for addr in ("h:1", "h:65535", "10.1.2.3:7401", "[::1]:80", "my-host.local:8080"):
        assert decode(json.dumps({"t": "iping", "g": N1, "a": addr}).encode()).addr == addr


def test_non_ascii_digits_are_not_a_port() -> None:
    with pytest.raises(MessageError):
        decode(json.dumps({"t": "iping", "g": N1, "a": "h:\u0661\u0662\u0663"}).encode())


def test_oversized_lists() -> None:
    update = {"k": "suspect", "n": N1, "i": 1}
    with pytest.raises(MessageError, match=r"packet\.u"):
        decode(json.dumps({"t": "gossip", "u": [update] * 4097}).encode())
    assert len(decode(json.dumps({"t": "gossip", "u": [update] * 4096}).encode()).updates) == 4096
    with pytest.raises(MessageError, match=r"packet\.r"):
        decode(json.dumps({"t": "gossip", "r": [None] * 4097}).encode())
    raw = [record_to_json(RECORDS[0])] * 3
    with pytest.raises(MessageError, match="push: expected a list of at most 2"):
        decode_records(raw, "push", 2)
    assert len(decode_records(raw, "push", 3)) == 3
    with pytest.raises(MessageError, match="push"):
        decode_records({"r": raw}, "push")


def test_sixteen_meta_pairs_are_fine() -> None:
    meta = {f"k{i}": "v" * 255 for i in range(16)}
    meta["k" * 63] = meta.pop("k0")
    (u,) = decode_updates([{"k": "alive", "n": N1, "i": 0, "a": "h:1", "m": meta}])
    assert u.meta == meta


@pytest.mark.parametrize("data", [
    b"[" * 100_000,
    b'{"t":"gossip","u":' + b"[" * 100_000,
    b'{"t":"gossip","r":[{"v":' + b'{"a":' * 100_000,
    b'{"t":"ack","q":' + b"9" * 5000 + b"}",
    b'{"t":"ack"',
    b'{"t":"ack"}garbage',
    b"\xff" * 20,
    b'{"t":"ack\xff"}',
    b"",
])
def test_hostile_bytes_are_a_message_error(data: bytes) -> None:
    try:
        decode(data)
    except MessageError:
        return
    pytest.fail(f"decode accepted {data[:40]!r}")


def test_lone_surrogates_in_checked_strings() -> None:
    for body in ({"t": "\ud800"}, {"t": "ping", "g": N1[:-1] + "\udfff"}, {"t": "iping", "g": N1, "a": "h\ud800:1"}):
        with pytest.raises(MessageError):
            decode(json.dumps(body).encode())


def test_lone_surrogate_in_meta_is_a_message_error() -> None:
    body = {"t": "gossip", "u": [{"k": "alive", "n": N1, "i": 1, "a": "h:1", "m": {"name": "\ud800"}}]}
    with pytest.raises(MessageError):
        decode(json.dumps(body).encode())


def test_lone_surrogate_in_meta_key_is_a_message_error() -> None:
    body = {"t": "gossip", "u": [{"k": "alive", "n": N1, "i": 1, "a": "h:1", "m": {"\udc80": "x"}}]}
    with pytest.raises(MessageError):
        decode(json.dumps(body).encode())


def test_lone_surrogate_in_a_record_value_never_reaches_the_store() -> None:
    raw = record_to_json(RECORDS[0])
    raw["v"] = {"image": "\ud800"}
    try:
        (r,) = decode(json.dumps({"t": "gossip", "r": [raw]}).encode()).records
    except MessageError:
        return
    # Accepted by the codec: then the record's signature check refuses it (it cannot be signed bytes).
    with pytest.raises(RecordError):
        r.verify({ME.node_id: ME.public_key}.get)


# -- fuzzing ----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | \
    st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=5),
    max_leaves=12,
)
node_ids = st.sampled_from([N1, N2]) | st.text("0123456789abcdefABCDEF", min_size=30, max_size=34)
addrs = st.sampled_from(["h:1", "[::1]:7401", "h:0", "h:70000", "h", ""]) | st.text(max_size=12)
ints = st.sampled_from([0, 1, MAX_INT, MAX_INT + 1, -1, True]) | st.integers()
kinds = st.sampled_from(["ping", "iping", "ack", "nack", "gossip", "alive", "suspect", "dead", "left", "app", "node"])


def fieldish(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly plausible values for a field, sometimes any JSON at all."""
    return st.one_of(valid, valid, json_values)


valid_addrs = st.sampled_from(["h:1", "h:65535", "10.0.0.1:7401", "[::1]:7401", "node-1.lan:80"])
short_text = st.text(max_size=10)
valid_updates = st.one_of(
    st.builds(Update, st.just("alive"), st.sampled_from([N1, N2]), st.integers(0, MAX_INT), valid_addrs,
              st.dictionaries(short_text, short_text, max_size=3), st.sampled_from(["", N1])),
    st.builds(Update, st.sampled_from(["suspect", "dead", "left"]), st.sampled_from([N1, N2]),
              st.integers(0, MAX_INT), st.sampled_from(["", "h:2"]), st.just({}), st.sampled_from(["", N2])),
)
valid_packets = st.one_of(
    st.builds(Packet, st.sampled_from(["ack", "nack", "gossip"]), st.integers(0, MAX_INT)),
    st.builds(Packet, st.just("ping"), st.integers(0, MAX_INT), st.sampled_from([N1, N2])),
    st.builds(Packet, st.just("iping"), st.integers(0, MAX_INT), st.sampled_from([N1, N2]), valid_addrs,
              st.booleans()),
).flatmap(lambda p: st.builds(
    lambda u, r: Packet(p.type, p.seq, p.target, p.addr, p.nack, tuple(u), tuple(r)),
    st.lists(valid_updates, max_size=3), st.lists(st.sampled_from(RECORDS), max_size=2)))


def containers(obj: Any) -> list[Any]:
    """Every dict and list inside ``obj`` (itself included)."""
    out = [obj]
    for child in obj.values() if isinstance(obj, dict) else obj:
        if isinstance(child, dict | list):
            out.extend(containers(child))
    return out


def decode_or_message_error(data: bytes) -> Packet | None:
    try:
        return decode(data)
    except MessageError:
        return None


def assert_accepted_packets_re_encode(packet: Packet | None) -> None:
    if packet is None:
        return
    # Whatever decode accepts is well formed: it re-encodes, and decodes to the same packet.
    assert decode(encode(packet)) == packet


FUZZ = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@settings(FUZZ, max_examples=500)
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(data: bytes) -> None:
    decode_or_message_error(data)


@settings(FUZZ, max_examples=200)
@given(json_values)
def test_fuzz_any_json(value: Any) -> None:
    decode_or_message_error(json.dumps(value).encode())


@settings(FUZZ, max_examples=100)
@given(valid_packets)
def test_fuzz_valid_packets_round_trip(packet: Packet) -> None:
    assert decode(encode(packet)) == packet


@settings(FUZZ, max_examples=200)
@given(valid_packets, st.data())
def test_fuzz_packets_with_damaged_fields(packet: Packet, data: st.DataObject) -> None:
    body = json.loads(encode(packet))
    for _ in range(data.draw(st.integers(1, 3))):
        target = data.draw(st.sampled_from(containers(body)))
        if isinstance(target, dict):
            key = data.draw(st.sampled_from([*target, "zz"]) if target else st.just("t"))
            if data.draw(st.booleans()) and key in target:
                del target[key]
            else:
                target[key] = data.draw(json_values)
        elif target:
            target[data.draw(st.integers(0, len(target) - 1))] = data.draw(json_values)
        else:
            target.append(data.draw(json_values))
    assert_accepted_packets_re_encode(decode_or_message_error(json.dumps(body).encode()))


@FUZZ
@given(st.sampled_from(PACKETS), st.data())
def test_fuzz_mutated_encodings(packet: Packet, data: st.DataObject) -> None:
    raw = bytearray(encode(packet))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and raw:
            raw[i] = data.draw(st.sampled_from(b'{}[]":,0123456789-.eEtfnul\\ \xff\x00'))
        elif op == "truncate":
            del raw[i:]
        elif op == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        elif op == "delete" and raw:
            del raw[i]
    assert_accepted_packets_re_encode(decode_or_message_error(bytes(raw)))


def nested_value(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def deepest_accepted_record(raw: dict[str, Any]) -> tuple[int, Record]:
    """The most deeply nested record value decode still accepts (binary search), and that record."""
    template = json.dumps({"t": "gossip", "r": [{**raw, "v": "@@"}]})
    lo, hi = 1, 20_000
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            decode(template.replace('"@@"', nested_value(mid)).encode())
            lo = mid
        except MessageError:
            hi = mid - 1
    (r,) = decode(template.replace('"@@"', nested_value(lo)).encode()).records
    return lo, r


def call_deeper(frames: int, fn: Callable[[], object]) -> object:
    return fn() if frames == 0 else call_deeper(frames - 1, fn)


def test_a_decoded_record_can_be_checked_deeper_in_the_stack() -> None:
    raw = record_to_json(RECORDS[0])
    depth, r = deepest_accepted_record(raw)
    assert depth >= 1
    # The value differs from what was signed: checking it must say so (RecordError), from any caller.
    with pytest.raises(RecordError):
        call_deeper(8, lambda: r.verify({ME.node_id: ME.public_key}.get))
