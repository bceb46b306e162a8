"""The replicated store on disk: SQLite in WAL mode, one row per record.

Writes are committed with ``synchronous=FULL`` before ``put`` returns, so a write the API
acknowledged survives a crash or power loss. Local writes are stamped by this node's HLC and
signed with its key; records from elsewhere go through ``apply``, which verifies the
signature and keeps whichever version wins the last-writer-wins order.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
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
        self._listeners: list[Listener] = []
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
            row = self._db.execute(
                "SELECT wall_ms, counter, node_id FROM records ORDER BY wall_ms DESC, counter DESC LIMIT 1"
            ).fetchone()
        if row is not None:
            # Never issue a timestamp below one already on disk, even if the clock went back.
            self.hlc.observe(Timestamp(*row))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- subscriptions -------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(record)`` after every change that took effect (from any thread)."""
        self._listeners.append(listener)

    def _notify(self, record: Record) -> None:
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
        record.verify(lambda origin: self._verifying_key(record, origin))
        self._check_revocation(record)
        self.hlc.observe(record.ts)
        with self._transaction():
            current = self._get(record.kind, record.key)
            if not record.wins_over(current):
                return False
            self._upsert(record)
        self._notify(record)
        return True

    def _upsert(self, rec: Record) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                rec.kind,
                rec.key,
                None if rec.value is None else canonical_json(rec.value),
                rec.ts.wall_ms,
                rec.ts.counter,
                rec.ts.node_id,
                rec.signature,
            ),
        )

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def collect_tombstones(self, older_than_ms: int) -> int:
        """Drop tombstones stamped before ``older_than_ms``; returns how many went.

        With a cluster of one every live node has seen a tombstone the moment it is written;
        the cluster layer decides the horizon once there are peers.
        """
        with self._transaction():
            cur = self._db.execute(
                "DELETE FROM records WHERE value IS NULL AND wall_ms < ?", (older_than_ms,)
            )
            return cur.rowcount

    # -- reads ---------------------------------------------------------------------------

    def get(self, kind: str, key: str) -> Record | None:
        """The stored version of a record, tombstones included."""
        with self._lock:
            return self._get(kind, key)

    def value(self, kind: str, key: str) -> dict[str, Any] | None:
        """The live value of a record, or None when absent or deleted."""
        rec = self.get(kind, key)
        return None if rec is None else rec.value

    def records(self, kind: str, include_deleted: bool = False, prefix: str = "") -> list[Record]:
        """The records of a kind, by key; with ``prefix``, only keys that start with it (a
        range scan of the primary key, so its cost does not grow with the other keys)."""
        if kind not in KINDS:
            raise RecordError(f"unknown record kind {kind!r}")
        sql = "SELECT * FROM records WHERE kind = ?"
        args: list[str] = [kind]
        if prefix:
            sql += " AND key >= ? AND key < ?"
            args += [prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)]
        if not include_deleted:
            sql += " AND value IS NOT NULL"
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY key", args).fetchall()
        return [_row_to_record(r) for r in rows]

    def all(self) -> list[Record]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM records ORDER BY kind, key").fetchall()
        return [_row_to_record(r) for r in rows]

    def count(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM records").fetchone()
        return int(n)

    def _get(self, kind: str, key: str) -> Record | None:
        row = self._db.execute(
            "SELECT * FROM records WHERE kind = ? AND key = ?", (kind, key)
        ).fetchone()
        return None if row is None else _row_to_record(row)

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


def _row_to_record(row: tuple[Any, ...]) -> Record:
    kind, key, value, wall_ms, counter, node_id, signature = row
    try:
        decoded = None if value is None else json.loads(value)
    except json.JSONDecodeError as exc:  # only a corrupted file gets here
        raise RecordError(f"record {kind}/{key} holds invalid JSON") from exc
    return Record(kind, key, decoded, Timestamp(wall_ms, counter, node_id), bytes(signature))
