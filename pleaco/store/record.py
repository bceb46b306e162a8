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
    {"node", "app", "release", "build", "route", "secret", "scale", "upgrade", "subnet"}
)

Value = dict[str, Any] | None


class RecordError(InvalidInput, ValueError, code="invalid_record"):
    """A record that is malformed, of an unknown kind, or whose signature does not verify."""


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
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
            raise RecordError(f"record {self.kind}/{self.key} from unknown node {self.origin}")
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
