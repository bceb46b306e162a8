"""Records of the replicated store: what they hold, how they are signed, how they merge.

A record is ``(kind, key) -> value`` stamped with an HLC timestamp and signed by the node
where the write happened (its origin). A delete is a record whose value is ``None`` (a
tombstone), so it replicates and wins over older writes like any other record.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pleaco.errors import InvalidInput
from pleaco.identity import Identity, verify
from pleaco.store.hlc import Timestamp

FORMAT_VERSION = 1

# The kinds DESIGN.md names. A record of any other kind is refused, so a typo in code (or a
# hostile peer) cannot create state that nothing reads.
KINDS = frozenset(
    {"node", "app", "release", "build", "route", "secret", "scale", "upgrade", "subnet", "volume", "job"}
)

Value = dict[str, Any] | None

# Records spread by gossip. One that fits in a packet rides in it (piggybacked); a larger
# one is announced in the packets instead (a notice: kind, key, version) and each node
# that lacks it fetches it over a stream from the node that announced it, at once, so it
# spreads as fast, a hop at a time (pleaco.cluster.membership). Neither is left to
# anti-entropy. The store is below the cluster, so the packet's figures are kept here;
# tests/unit/test_record.py checks them against the cluster's own: GOSSIP_MAX_PACKET is
# GossipConfig.max_packet's default (1400: under a 1500-byte MTU); the overhead is the
# envelope (wire.OVERHEAD: header, AEAD tag, sender, seq and signature, 128 bytes), the
# packet's own fields (membership.PACKET_BASE, 120) and the separator every piggybacked
# item costs (1).
GOSSIP_MAX_PACKET = 1400
GOSSIP_PACKET_OVERHEAD = 128 + 120 + 1
PACKET_RECORD_BYTES = GOSSIP_MAX_PACKET - GOSSIP_PACKET_OVERHEAD
# The largest record the cluster replicates at all; a write of a larger one is refused
# (RecordTooLarge, a 400 through the API) and nothing is written. 64 KiB holds an app with
# a generous environment, and a build with its test output and findings (their writers
# trim to fit), while every node holding every record in memory stays cheap.
MAX_RECORD_BYTES = 64 << 10
# What a record costs on the wire besides its kind, key and value: the field names and
# punctuation of {"k":,"y":,"v":,"w":,"c":,"o":"","s":""} (40), the wall clock in ms
# (13 digits until 2286), the HLC counter (at most 10 digits), the origin's node id (32 hex)
# and the base64 of its 64-byte signature (88).
_RECORD_FIXED_BYTES = 40 + 13 + 10 + 32 + 88


class RecordError(InvalidInput, ValueError, code="invalid_record"):
    """A record that is malformed, of an unknown kind, or whose signature does not verify."""


class UnknownOrigin(RecordError):
    """A record whose origin this store does not know (yet): its ``node`` record, which a
    member writes when it admits the node, has not arrived. Gossip delivers in no order, so
    the record may well be good; it can be checked again once the node record is here."""


class RecordTooLarge(RecordError):
    """A write whose record is larger than the cluster replicates; nothing is written."""

    def __init__(self, kind: str, key: str, size: int, limit: int = MAX_RECORD_BYTES) -> None:
        super().__init__(f"record {kind}/{key} is {size} bytes as gossip carries it, over the limit of "
                         f"{limit} bytes (the largest record the cluster replicates)")
        self.kind, self.key, self.size, self.limit = kind, key, size, limit


def _json_len(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))


def gossip_size(kind: str, key: str, value: Value) -> int:
    """The bytes the record ``(kind, key) -> value`` takes in a gossip packet, whoever
    signs it and whenever (an upper bound: the clock and counter at their widest)."""
    return _RECORD_FIXED_BYTES + _json_len(kind) + _json_len(key) + _json_len(value)


def check_size(kind: str, key: str, value: Value) -> None:
    """Raise RecordTooLarge when the record is larger than the cluster replicates."""
    size = gossip_size(kind, key, value)
    if size > MAX_RECORD_BYTES:
        raise RecordTooLarge(kind, key, size)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)  # slots: the store holds every record in memory
class Record:
    kind: str
    key: str
    value: Value
    ts: Timestamp
    signature: bytes

    @property
    def origin(self) -> str:
        """The node where this write happened (the HLC's node id is always the origin's)."""
        return self.ts.node_id

    @property
    def deleted(self) -> bool:
        return self.value is None

    @staticmethod
    def signed_bytes(kind: str, key: str, value: Value, ts: Timestamp) -> bytes:
        """The exact bytes an origin signs: versioned, canonical JSON of every field."""
        body = [FORMAT_VERSION, kind, key, value, ts.wall_ms, ts.counter, ts.node_id]
        try:
            return canonical_json(body).encode()
        except UnicodeEncodeError:  # a lone surrogate, which json.loads lets through
            raise RecordError(f"record {kind}/{key!r} holds text that is not valid UTF-8") from None

    @classmethod
    def create(cls, identity: Identity, kind: str, key: str, value: Value, ts: Timestamp) -> Record:
        if kind not in KINDS:
            raise RecordError(f"unknown record kind {kind!r}")
        if ts.node_id != identity.node_id:
            raise RecordError("a record must be stamped by the node that signs it")
        sig = identity.sign(cls.signed_bytes(kind, key, value, ts))
        return cls(kind, key, value, ts, sig)

    def verify(self, public_key_of: Callable[[str], bytes | None]) -> None:
        """Raise RecordError unless the origin is known and its signature is valid."""
        if self.kind not in KINDS:
            raise RecordError(f"unknown record kind {self.kind!r}")
        pub = public_key_of(self.origin)
        if pub is None:
            raise UnknownOrigin(f"record {self.kind}/{self.key} from unknown node {self.origin}")
        if not verify(pub, self.signature, self.signed_bytes(self.kind, self.key, self.value, self.ts)):
            raise RecordError(f"record {self.kind}/{self.key}: bad signature from {self.origin}")

    def order_key(self) -> tuple[int, int, str, bytes]:
        """Total order for last-writer-wins: HLC, then node id, then signature.

        Two records with the same HLC and origin can only come from a buggy or hostile
        origin; comparing the signature still picks the same winner on every node, which
        keeps merge commutative.
        """
        return (self.ts.wall_ms, self.ts.counter, self.ts.node_id, self.signature)

    def wins_over(self, other: Record | None) -> bool:
        return other is None or self.order_key() > other.order_key()


def merge(a: Record | None, b: Record | None) -> Record | None:
    """Last-writer-wins merge of two versions of one record (commutative, associative, idempotent)."""
    if a is None:
        return b
    if b is None:
        return a
    return b if b.wins_over(a) else a
