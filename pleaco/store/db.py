"""The replicated store on disk: SQLite in WAL mode, one row per record.

Writes are committed with ``synchronous=FULL`` before ``put`` returns, so a write the API
acknowledged survives a crash or power loss. Local writes are stamped by this node's HLC and
signed with its key; records from elsewhere go through ``apply``, which verifies the
signature and keeps whichever version wins the last-writer-wins order.

Reads never touch SQLite: every record is also held decoded in memory, loaded once at start
and updated after each commit (this object is the file's only writer), with each kind's keys
kept sorted so that a key-prefix lookup costs O(log n + found). ``get``, ``value``,
``records`` and ``all`` hand out copies of the values, which callers may change; ``peek``
and ``peek_records`` hand out the cached records themselves, for the hot paths that only
read them (a change to one would alter what this node holds and void its signature).
"""

from __future__ import annotations

import bisect
import functools
import json
import sqlite3
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pleaco import logs
from pleaco.identity import Identity, node_id_for
from pleaco.store.hlc import HLC, Timestamp
from pleaco.store.record import KINDS, Record, RecordError, Value, canonical_json, check_size

log = logs.get("pleaco.store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    kind      TEXT    NOT NULL,
    key       TEXT    NOT NULL,
    value     TEXT,              -- canonical JSON, NULL for a tombstone
    wall_ms   INTEGER NOT NULL,
    counter   INTEGER NOT NULL,
    node_id   TEXT    NOT NULL,
    signature BLOB    NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
"""

Listener = Callable[[Record], None]

# Strings in record values up to this length are interned in the cache (see _compact):
# names, images, hosts, ids; longer ones (sealed secrets, build logs) are rarely repeated.
INTERN_MAX = 128


class Store:
    """This node's copy of the replicated state."""

    def __init__(self, path: Path, identity: Identity, hlc: HLC | None = None) -> None:
        self.path = path
        self.identity = identity
        self.hlc = hlc or HLC(identity.node_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection guarded by a lock: SQLite serialises writers anyway, and the
        # agent's writes are small. check_same_thread=False lets worker threads read.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        # Goes up with every change that took effect (local or merged): a reader that
        # derives something from many records recomputes it only when this moved.
        self.generation = 0
        self._listeners: list[Listener] = []
        # The decoded records, per kind and key (tombstones included), each kind's keys in
        # order, and the records written by the open transaction (cached once it commits).
        self._cache: dict[str, dict[str, Record]] = {kind: {} for kind in KINDS}
        self._keys: dict[str, list[str]] = {kind: [] for kind in KINDS}
        self._pending: dict[tuple[str, str], Record] = {}
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            for row in self._db.execute("SELECT * FROM records"):
                rec = _row_to_record(row)
                if rec.kind in self._cache:  # a kind this version no longer knows stays on disk only
                    self._cache[rec.kind][rec.key] = rec
            for kind, recs in self._cache.items():
                self._keys[kind] = sorted(recs)
        latest = max((r.ts for recs in self._cache.values() for r in recs.values()), default=None)
        if latest is not None:
            # Never issue a timestamp below one already on disk, even if the clock went back.
            self.hlc.observe(latest)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(record)`` after every change that took effect (from any thread)."""
        self._listeners.append(listener)

    def _notify(self, record: Record) -> None:
        self.generation += 1
        # The listeners get the cached record when it is this one (it nearly always is): what
        # they keep (the gossip queue keeps every change until it is sent) then shares its
        # value with the cache instead of holding a second copy.
        cached = self.peek(record.kind, record.key)
        if cached is not None and cached.ts == record.ts and cached.signature == record.signature:
            record = cached
        for listener in list(self._listeners):
            listener(record)

    # -- writes --------------------------------------------------------------------------

    def put(self, kind: str, key: str, value: dict[str, Any]) -> Record:
        """Write a value locally; durable on return."""
        return self._write_local(kind, key, value)

    def delete(self, kind: str, key: str) -> Record:
        """Write a tombstone locally; durable on return."""
        return self._write_local(kind, key, None)

    def put_many(self, items: list[tuple[str, str, Value]]) -> list[Record]:
        """Several local writes in one transaction: all of them are durable, or none.

        Raises RecordTooLarge (nothing written) when a record is larger than the cluster
        replicates (``MAX_RECORD_BYTES``)."""
        for kind, key, value in items:
            check_size(kind, key, value)
        records = [Record.create(self.identity, k, key, v, self.hlc.now()) for k, key, v in items]
        with self._transaction():
            for rec in records:
                self._upsert(rec)
        for rec in records:
            self._notify(rec)
        return records

    def _write_local(self, kind: str, key: str, value: Value) -> Record:
        return self.put_many([(kind, key, value)])[0]

    def apply(self, record: Record) -> bool:
        """Merge a record from elsewhere. True when it won and was stored.

        Raises RecordError when the record is of an unknown kind, from an unknown node, or
        its signature does not verify; nothing is stored then.
        """
        applied, rejected = self.apply_many([record])
        if rejected:
            raise rejected[0][1]
        return bool(applied)

    def apply_many(self, records: Sequence[Record]) -> tuple[list[Record], list[tuple[Record, RecordError]]]:
        """Merge records from elsewhere in one transaction: one disk sync for a push-pull's
        thousands, not one each. Returns (those that won and were stored, those refused with
        why). Each is checked as ``apply`` checks it, in order, against the store as the
        ones before it left it (an admission early in the batch admits a later record's
        origin); a refused one changes nothing.
        """
        applied: list[Record] = []
        rejected: list[tuple[Record, RecordError]] = []
        with self._transaction():
            for record in records:
                try:
                    record.verify(functools.partial(self._verifying_key, record))
                    self._check_revocation(record)
                except RecordError as exc:
                    rejected.append((record, exc))
                    continue
                self.hlc.observe(record.ts)
                if record.wins_over(self._get(record.kind, record.key)):
                    self._upsert(record)
                    applied.append(record)
        for rec in applied:
            self._notify(rec)
        return applied, rejected

    def _upsert(self, rec: Record) -> None:
        text = None if rec.value is None else canonical_json(rec.value)
        self._db.execute(
            "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
            (rec.kind, rec.key, text, rec.ts.wall_ms, rec.ts.counter, rec.ts.node_id, rec.signature),
        )
        # The cache holds the value as it reads back from disk (JSON's types, a copy of the
        # caller's dict), so a read answers the same before and after a restart.
        value = None if text is None else _compact(json.loads(text))
        cached = Record(rec.kind, sys.intern(rec.key), value, _interned(rec.ts), rec.signature)
        self._pending[(rec.kind, rec.key)] = cached

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._pending.clear()
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._pending.clear()
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            for rec in self._pending.values():
                self._remember(rec)
            self._pending.clear()

    def _remember(self, rec: Record) -> None:
        """Cache a committed record (the lock is held)."""
        recs = self._cache[rec.kind]
        if rec.key not in recs:
            bisect.insort(self._keys[rec.kind], rec.key)
        recs[rec.key] = rec

    def _forget(self, kind: str, key: str) -> None:
        """Drop a record deleted from disk from the cache (the lock is held)."""
        if self._cache[kind].pop(key, None) is not None:
            keys = self._keys[kind]
            del keys[bisect.bisect_left(keys, key)]

    def collect_tombstones(self, older_than_ms: int) -> int:
        """Drop tombstones stamped before ``older_than_ms``; returns how many went.

        With a cluster of one every live node has seen a tombstone the moment it is written;
        the cluster layer decides the horizon once there are peers.
        """
        with self._lock:
            with self._transaction():
                cur = self._db.execute(
                    "DELETE FROM records WHERE value IS NULL AND wall_ms < ?", (older_than_ms,)
                )
            gone = [(r.kind, r.key) for recs in self._cache.values() for r in recs.values()
                    if r.value is None and r.ts.wall_ms < older_than_ms]
            for kind, key in gone:
                self._forget(kind, key)
            return int(cur.rowcount)

    # -- reads ---------------------------------------------------------------------------

    def get(self, kind: str, key: str) -> Record | None:
        """The stored version of a record, tombstones included (its value a copy)."""
        rec = self.peek(kind, key)
        return None if rec is None else _copied(rec)

    def value(self, kind: str, key: str) -> dict[str, Any] | None:
        """The live value of a record (a copy), or None when absent or deleted."""
        rec = self.peek(kind, key)
        return None if rec is None or rec.value is None else _thaw(rec.value)

    def records(self, kind: str, include_deleted: bool = False, prefix: str = "") -> list[Record]:
        """The records of a kind in key order, their values copies; with ``prefix``, only
        keys that start with it (found by the sorted index: the other keys cost nothing)."""
        return [_copied(r) for r in self.peek_records(kind, prefix=prefix, include_deleted=include_deleted)]

    def all(self) -> list[Record]:
        """Every record, tombstones included, in (kind, key) order, their values copies."""
        return [_copied(r) for r in self.peek_all()]

    def peek_all(self) -> list[Record]:
        """Like ``all``, without the copies: read them only (digests, records to send)."""
        return [r for kind in sorted(KINDS) for r in self.peek_records(kind, include_deleted=True)]

    def count(self) -> int:
        with self._lock:
            return sum(len(recs) for recs in self._cache.values())

    def peek(self, kind: str, key: str) -> Record | None:
        """Like ``get``, without the copy: the record is the store's own, read it only."""
        with self._lock:
            return self._get(kind, key)

    def peek_records(self, kind: str, prefix: str = "", include_deleted: bool = False) -> list[Record]:
        """Like ``records``, without the copies (read them only), and only the keys that
        start with ``prefix``: O(log n) to find them, then O(found)."""
        if kind not in KINDS:
            raise RecordError(f"unknown record kind {kind!r}")
        with self._lock:
            keys, recs = self._keys[kind], self._cache[kind]
            if prefix:
                lo = bisect.bisect_left(keys, prefix)
                if lo == len(keys) or not keys[lo].startswith(prefix):
                    return []  # the common case (an app without routes): no second search
                # Every key starting with the prefix sorts below prefix + the highest code point.
                keys = keys[lo:bisect.bisect_left(keys, prefix + "\U0010ffff", lo)]
            found = [recs[k] for k in keys]
        return found if include_deleted else [r for r in found if r.value is not None]

    def _get(self, kind: str, key: str) -> Record | None:
        # Within a transaction (the lock held: only its own thread reads) its writes so far
        # count, so that each record of an apply_many sees the ones before it.
        pending = self._pending.get((kind, key))
        if pending is not None:
            return pending
        recs = self._cache.get(kind)
        return None if recs is None else recs.get(key)

    # -- trust ---------------------------------------------------------------------------

    def _verifying_key(self, record: Record, origin: str) -> bytes | None:
        """The key to check ``record`` with.

        A node's own ``node`` record is self-certifying: it carries the public key its id
        is derived from, so it verifies against that key. That is what lets the first
        member's description reach a node that joined through another member. It admits
        nobody by itself: records only arrive from members (gossip and push-pull are
        signed by admitted keys) or from the join handshake, where a member checked the
        token; revocation (``node/ID/revoked``) still wins.
        """
        if record.kind == "node" and record.key == origin and record.value is not None:
            embedded = record.value.get("public_key")
            if isinstance(embedded, str):
                try:
                    key = bytes.fromhex(embedded)
                except ValueError:
                    return None
                return key if node_id_for(key) == origin else None
        return self.public_key_of(origin)

    def revoked_at(self, node_id: str) -> int | None:
        """When the node's key was revoked (``node/ID/revoked``), in wall ms, or None."""
        value = self.value("node", f"{node_id}/revoked")
        if value is None:
            return None
        at = value.get("at_ms")
        return at if isinstance(at, int) else 0

    def _check_revocation(self, record: Record) -> None:
        # A node may not write (or delete) its own revocation; anyone else admitted may.
        if record.kind == "node" and record.key == f"{record.origin}/revoked":
            raise RecordError(f"node {record.origin} cannot change its own revocation")
        at = self.revoked_at(record.origin)
        if at is not None and record.ts.wall_ms > at:
            raise RecordError(f"record {record.kind}/{record.key} from revoked node {record.origin}")

    def public_key_of(self, node_id: str) -> bytes | None:
        """The admitted public key of a node: our own, or one a ``node`` record admits."""
        if node_id == self.identity.node_id:
            return self.identity.public_key
        value = self.value("node", node_id)
        if value is None or not isinstance(value.get("public_key"), str):
            return None
        try:
            key = bytes.fromhex(value["public_key"])
        except ValueError:
            return None
        # The id is derived from the key: a record pairing an id with another key is void.
        return key if node_id_for(key) == node_id else None


def _thaw(value: Any) -> Any:
    """A copy of a decoded JSON value (dicts and lists copied all the way down): what every
    read used to get from decoding the row again, at about half the cost."""
    if type(value) is dict:
        return {k: _thaw(v) for k, v in value.items()}
    if type(value) is list:
        return [_thaw(v) for v in value]
    return value


def _compact(value: Any) -> Any:
    """A decoded JSON value with its object keys and short strings interned: every record
    repeats the same keys ("image", "revision", ...) and mostly the same images and node
    ids, held once each instead of once per record (a third of the cache's memory)."""
    if type(value) is dict:
        return {sys.intern(k): _compact(v) for k, v in value.items()}
    if type(value) is list:
        return [_compact(v) for v in value]
    if type(value) is str and len(value) <= INTERN_MAX:
        return sys.intern(value)
    return value


def _copied(rec: Record) -> Record:
    if rec.value is None:
        return rec
    return Record(rec.kind, rec.key, _thaw(rec.value), rec.ts, rec.signature)


def _interned(ts: Timestamp) -> Timestamp:
    # Node ids repeat in every record: one string per node, not per record, in the cache.
    return Timestamp(ts.wall_ms, ts.counter, sys.intern(ts.node_id))


def _row_to_record(row: tuple[Any, ...]) -> Record:
    kind, key, value, wall_ms, counter, node_id, signature = row
    key, node_id = sys.intern(key), sys.intern(node_id)
    try:
        decoded = None if value is None else _compact(json.loads(value))
    except json.JSONDecodeError as exc:  # only a corrupted file gets here
        raise RecordError(f"record {kind}/{key} holds invalid JSON") from exc
    return Record(kind, key, decoded, Timestamp(wall_ms, counter, node_id), bytes(signature))
