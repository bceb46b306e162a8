"""The messages nodes exchange, and their strict, bounded JSON codec.

A packet is one JSON object: ``{"t": TYPE, ...fields, "u": [updates], "r": [records]}``.
``u`` carries membership updates and ``r`` store records piggybacked on whatever the packet
is (memberlist piggybacks the same way). Streams (TCP) carry bigger messages of the same
form. ``decode`` checks every field's type and bound and raises ``MessageError`` for
anything else: nothing that came off the network reaches the protocol unchecked.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass, field
from typing import Any

from pleaco.errors import InvalidInput
from pleaco.store.hlc import Timestamp
from pleaco.store.record import KINDS, Record

NODE_ID = re.compile(r"^[0-9a-f]{32}\Z")
ADDR = re.compile(r"^[0-9A-Za-z.:\[\]-]{1,253}:[0-9]{1,5}\Z", re.ASCII)
MAX_INT = 2**63 - 1
MAX_KEY = 512
# Deepest nesting a record value may have. App specs are three levels deep; 32 leaves room
# while staying far from Python's recursion limit in the code that signs and checks values.
MAX_DEPTH = 32


class MessageError(InvalidInput, ValueError, code="invalid_message"):
    """A message that is not well formed; the text says which field."""


@dataclass(frozen=True)
class Update:
    """A membership change: a member is alive (with its address and metadata), suspect or dead.

    ``incarnation`` orders updates about one member; only that member raises it (to refute).
    ``source`` is who suspects or declares dead, so confirmations can be counted."""

    kind: str  # alive | suspect | dead | left
    node: str
    incarnation: int
    addr: str = ""
    meta: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"k": self.kind, "n": self.node, "i": self.incarnation}
        if self.addr:
            out["a"] = self.addr
        if self.meta:
            out["m"] = self.meta
        if self.source:
            out["f"] = self.source
        return out


@dataclass(frozen=True)
class Packet:
    """One UDP packet. ``type`` is ping | iping | ack | nack | gossip."""

    type: str
    seq: int = 0
    target: str = ""  # ping, iping: the member to probe
    addr: str = ""  # iping: where the target is
    nack: bool = False  # iping: answer with a nack if the target does not answer
    updates: tuple[Update, ...] = ()
    records: tuple[Record, ...] = ()
    notices: tuple[Notice, ...] = ()
    loads: tuple[LoadReport, ...] = ()


@dataclass(frozen=True)
class AppLoadEntry:
    """One app's load at one node: what its proxy served over the last window, and its
    replicas there. Ephemeral figures, gossiped and never stored (pleaco.cluster.load)."""

    app: str
    rps: float  # requests per second through this node's proxy
    concurrency: float  # mean requests in flight through it
    p50: float | None  # latency quantiles, seconds; None without requests
    p99: float | None
    replicas: int  # this node's running replicas of the app
    cpu: float  # cores those replicas used (mean over the last sample interval)
    memory: int  # bytes those replicas use

    def to_json(self) -> list[Any]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000, 2)

        return [self.app, round(self.rps, 2), round(self.concurrency, 3), ms(self.p50), ms(self.p99),
                self.replicas, round(self.cpu, 3), self.memory]


@dataclass(frozen=True)
class LoadReport:
    """A node's load report, or one part of it: a report with more apps than fit in a
    packet is split into parts, each carrying whole entries (see split_load)."""

    node: str  # the reporting node
    wall_ms: int  # when it sampled (its clock): a newer report replaces an older one
    part: int  # which part of the report (0 when it fits one)
    entries: tuple[AppLoadEntry, ...]

    def to_json(self) -> list[Any]:
        return [self.node, self.wall_ms, self.part, [e.to_json() for e in self.entries]]


@dataclass(frozen=True)
class Notice:
    """A record too large for a packet, announced instead of carried: who has it, which
    version. A node whose copy is older fetches it over a stream from the announcer."""

    kind: str
    key: str
    wall_ms: int
    counter: int
    node: str

    @classmethod
    def of(cls, rec: Record) -> Notice:
        return cls(rec.kind, rec.key, rec.ts.wall_ms, rec.ts.counter, rec.ts.node_id)

    @property
    def ts(self) -> tuple[int, int, str]:
        return (self.wall_ms, self.counter, self.node)

    def to_json(self) -> list[Any]:
        return [self.kind, self.key, self.wall_ms, self.counter, self.node]


PACKET_TYPES = frozenset({"ping", "iping", "ack", "nack", "gossip"})
UPDATE_KINDS = frozenset({"alive", "suspect", "dead", "left"})


def record_to_json(rec: Record) -> dict[str, Any]:
    return {
        "k": rec.kind,
        "y": rec.key,
        "v": rec.value,
        "w": rec.ts.wall_ms,
        "c": rec.ts.counter,
        "o": rec.ts.node_id,
        "s": base64.b64encode(rec.signature).decode(),
    }


def record_from_json(raw: Any) -> Record:
    obj = _obj(raw, "record", {"k", "y", "v", "w", "c", "o", "s"})
    kind = _str(obj, "k", "record")
    if kind not in KINDS:
        raise MessageError(f"record.k: unknown kind {kind!r}")
    key = _str(obj, "y", "record", max_len=MAX_KEY)
    value = obj.get("v")
    if value is not None and not isinstance(value, dict):
        raise MessageError("record.v: expected an object or null")
    if _depth(value) > MAX_DEPTH:
        raise MessageError(f"record.v: nested deeper than {MAX_DEPTH}")
    try:
        sig = base64.b64decode(_str(obj, "s", "record", max_len=100), validate=True)
    except (binascii.Error, ValueError):
        raise MessageError("record.s: not base64") from None
    if len(sig) != 64:
        raise MessageError("record.s: expected a 64-byte signature")
    ts = Timestamp(_int(obj, "w", "record"), _int(obj, "c", "record"), _node(obj, "o", "record"))
    return Record(kind, key, value, ts, sig)


def encode(packet: Packet) -> bytes:
    body: dict[str, Any] = {"t": packet.type}
    if packet.seq:
        body["q"] = packet.seq
    if packet.target:
        body["g"] = packet.target
    if packet.addr:
        body["a"] = packet.addr
    if packet.nack:
        body["x"] = True
    if packet.updates:
        body["u"] = [u.to_json() for u in packet.updates]
    if packet.records:
        body["r"] = [record_to_json(r) for r in packet.records]
    if packet.notices:
        body["n"] = [n.to_json() for n in packet.notices]
    if packet.loads:
        body["l"] = [r.to_json() for r in packet.loads]
    return dumps(body)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def loads(data: bytes) -> Any:
    """Parse JSON from the network: any failure (bad UTF-8, syntax, nesting bombs) is a MessageError."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise MessageError(f"not JSON: {exc.__class__.__name__}") from None


def decode(data: bytes) -> Packet:
    obj = _obj(loads(data), "packet", {"t", "q", "g", "a", "x", "u", "r", "n", "l"})
    ptype = _str(obj, "t", "packet")
    if ptype not in PACKET_TYPES:
        raise MessageError(f"packet.t: unknown type {ptype!r}")
    seq = _int(obj, "q", "packet") if "q" in obj else 0
    target = _node(obj, "g", "packet") if "g" in obj else ""
    addr = _addr(obj, "a", "packet") if "a" in obj else ""
    nack = obj.get("x", False)
    if not isinstance(nack, bool):
        raise MessageError("packet.x: expected a boolean")
    if ptype in ("ping", "iping") and not target:
        raise MessageError(f"packet: a {ptype} needs a target")
    if ptype == "iping" and not addr:
        raise MessageError("packet: an iping needs the target's address")
    return Packet(ptype, seq, target, addr, nack, decode_updates(obj.get("u", [])),
                  tuple(decode_records(obj.get("r", []), "packet.r", 4096)), decode_notices(obj.get("n", [])),
                  decode_loads(obj.get("l", [])))


# -- load reports ---------------------------------------------------------------------------

APP_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")  # a DNS label, as app names are
MAX_FIGURE = 1e12  # no real figure (requests/s, ms, cores) comes near; bounds what arithmetic sees
MAX_LOAD_ENTRIES = 256  # per report part: more cannot fit a packet anyway


def decode_loads(raw: Any) -> tuple[LoadReport, ...]:
    out = []
    for item in _list(raw, "packet.l", 64):
        if not (isinstance(item, list) and len(item) == 4):
            raise MessageError("packet.l: expected [node, wall_ms, part, entries] reports")
        obj = dict(zip(("o", "w", "p"), item[:3], strict=True))
        node, wall_ms, part = _node(obj, "o", "load"), _int(obj, "w", "load"), _int(obj, "p", "load")
        if part > 0xFFFF:
            raise MessageError("load.p: expected a part number below 65536")
        entries = []
        for e in _list(item[3], "load.entries", MAX_LOAD_ENTRIES):
            if not (isinstance(e, list) and len(e) == 8):
                raise MessageError("load.entries: expected [app, rps, concurrency, p50, p99, replicas, cpu, memory]")
            app = e[0]
            if not isinstance(app, str) or not APP_NAME.match(app):
                raise MessageError("load.entries: the app is not an app name")
            replicas, memory = (_int({"v": v}, "v", "load.entries") for v in (e[5], e[7]))
            p50, p99 = (None if v is None else _figure(v) / 1000 for v in (e[3], e[4]))
            entries.append(AppLoadEntry(app, _figure(e[1]), _figure(e[2]), p50, p99, replicas, _figure(e[6]),
                                        memory))
        out.append(LoadReport(node, wall_ms, part, tuple(entries)))
    return tuple(out)


def _figure(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_FIGURE:
        raise MessageError(f"load.entries: expected a figure in 0..{MAX_FIGURE:g}")
    return float(value)


def _sendable(e: AppLoadEntry) -> AppLoadEntry:
    """The entry with every figure inside what decode_loads accepts (a receiver drops a
    whole packet it cannot decode)."""
    def clamp(v: float) -> float:
        return min(MAX_FIGURE, v) if v >= 0 else 0.0  # NaN fails v >= 0

    def q(v: float | None) -> float | None:
        return None if v is None else clamp(v * 1000) / 1000

    return AppLoadEntry(e.app, clamp(e.rps), clamp(e.concurrency), q(e.p50), q(e.p99),
                        min(max(0, e.replicas), MAX_INT), clamp(e.cpu), min(max(0, e.memory), MAX_INT))


def split_load(node: str, wall_ms: int, entries: list[AppLoadEntry], budget: int) -> list[LoadReport]:
    """A node's report in parts of at most ``budget`` bytes encoded, each with whole entries
    (largest apps first, so that when not every part arrives the busiest are the likeliest
    to). An entry alone larger than the budget cannot happen with bounded names; it would
    get a part of its own."""
    ordered = sorted((_sendable(e) for e in entries if APP_NAME.match(e.app)),
                     key=lambda e: (-e.rps, -e.replicas, e.app))
    head = len(dumps(LoadReport(node, wall_ms, 0xFFFF, ()).to_json()))
    parts: list[list[AppLoadEntry]] = [[]]
    used = head
    for entry in ordered:
        size = len(dumps(entry.to_json())) + 1
        if parts[-1] and used + size > budget:
            parts.append([])
            used = head
        parts[-1].append(entry)
        used += size
    return [LoadReport(node, wall_ms, i, tuple(p)) for i, p in enumerate(parts)]


def decode_notices(raw: Any) -> tuple[Notice, ...]:
    out = []
    for item in _list(raw, "packet.n"):
        if not (isinstance(item, list) and len(item) == 5):
            raise MessageError("packet.n: expected [kind, key, wall_ms, counter, node] entries")
        obj = dict(zip(("k", "y", "w", "c", "o"), item, strict=True))
        kind = _str(obj, "k", "notice")
        if kind not in KINDS:
            raise MessageError(f"notice: unknown kind {kind!r}")
        out.append(Notice(kind, _str(obj, "y", "notice", max_len=MAX_KEY), _int(obj, "w", "notice"),
                          _int(obj, "c", "notice"), _node(obj, "o", "notice")))
    return tuple(out)


def decode_records(raw: Any, what: str, max_len: int = 1 << 20) -> list[Record]:
    return [record_from_json(r) for r in _list(raw, what, max_len)]


def decode_updates(raw: Any) -> tuple[Update, ...]:
    out = []
    for item in _list(raw, "packet.u"):
        obj = _obj(item, "update", {"k", "n", "i", "a", "m", "f"})
        kind = _str(obj, "k", "update")
        if kind not in UPDATE_KINDS:
            raise MessageError(f"update.k: unknown kind {kind!r}")
        meta = obj.get("m", {})
        if not isinstance(meta, dict) or len(meta) > 16 or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) < 64 and len(v) < 256
            and _utf8(k) and _utf8(v) for k, v in meta.items()
        ):
            raise MessageError("update.m: expected up to 16 short UTF-8 string pairs")
        addr = _addr(obj, "a", "update") if "a" in obj else ""
        if kind == "alive" and not addr:
            raise MessageError("update: an alive update needs an address")
        out.append(Update(kind, _node(obj, "n", "update"), _int(obj, "i", "update"), addr, meta,
                          _node(obj, "f", "update") if "f" in obj else ""))
    return tuple(out)


# -- field checks ---------------------------------------------------------------------------


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (it may come from anyone)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _obj(raw: Any, what: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise MessageError(f"{what}: expected an object")
    unknown = set(raw) - allowed
    if unknown:
        raise MessageError(f"{what}: unknown field {sorted(unknown)[0]!r}")
    return raw


def _list(raw: Any, what: str, max_len: int = 4096) -> list[Any]:
    if not isinstance(raw, list) or len(raw) > max_len:
        raise MessageError(f"{what}: expected a list of at most {max_len}")
    return raw


def _str(obj: dict[str, Any], key: str, what: str, max_len: int = 256) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or len(value) > max_len:
        raise MessageError(f"{what}.{key}: expected a string of at most {max_len} characters")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise MessageError(f"{what}.{key}: not valid UTF-8") from None
    return value


def _int(obj: dict[str, Any], key: str, what: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise MessageError(f"{what}.{key}: expected an integer in 0..2^63-1")
    return value


def _node(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not NODE_ID.match(value):
        raise MessageError(f"{what}.{key}: expected a node id (32 hex digits)")
    return value


def _addr(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not ADDR.match(value) or not 0 < int(value.rpartition(":")[2]) < 65536:
        raise MessageError(f"{what}.{key}: expected HOST:PORT")
    return value
