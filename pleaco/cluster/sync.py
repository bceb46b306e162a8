"""The store's side of dissemination: records in and out of gossip and push-pull.

Every change that takes effect in the local store (a local write, or a remote record that
won) is queued for gossip, so a record spreads epidemically from wherever it is new.
Push-pull compares digests, ``[kind, key, wall_ms, counter, node]`` per record, and then
moves only the records that differ, which is how a node that was away catches up.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pleaco import logs
from pleaco.cluster.messages import MessageError, Notice
from pleaco.store import Record, Store, UnknownOrigin

log = logs.get("pleaco.cluster.sync")

MAX_DIGEST = 1 << 20
# Records from origins this node does not know yet, kept to be checked again when a
# ``node`` record arrives (see StoreSync.records_received). A node just admitted writes
# records at once (its own state, an app deployed through it) and gossip may bring them
# before the member's admission of it: refused, their few piggybacked sends are spent and
# only the next push-pull (30 s) would bring them. 256 records of at most 64 KiB bound the
# memory at 16 MiB; only members can send records at all (packets are sealed with the
# cluster key), so the bound is for bugs, not strangers.
MAX_PARKED = 256


class StoreSync:
    def __init__(self, store: Store, on_reject: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.on_reject = on_reject or (lambda reason: None)
        self._queue_record: Callable[[Record], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._parked: dict[tuple[str, str], Record] = {}
        store.subscribe(self._changed)

    def attach(self, queue_record: Callable[[Record], None]) -> None:
        """Start spreading changes through ``queue_record`` (membership's broadcast queue)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._queue_record = queue_record

    def _changed(self, rec: Record) -> None:
        if self._queue_record is None or self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._queue_record(rec)
        else:
            self._loop.call_soon_threadsafe(self._queue_record, rec)
        if rec.kind == "node" and self._parked:
            # Not from inside the store's notification: the next turn of the loop.
            self._loop.call_soon_threadsafe(self._retry_parked)

    def records_received(self, sender: str, records: Sequence[Record]) -> None:
        # One transaction for the lot: a push-pull to a joining node brings every record.
        _, rejected = self.store.apply_many(records)
        for rec, exc in rejected:
            if isinstance(exc, UnknownOrigin):
                self._park(rec)
                log.debug("gossip.record_parked", sender=sender, kind=rec.kind, key=rec.key, origin=rec.origin)
                continue
            self.on_reject("record_rejected")
            log.debug("gossip.record_rejected", sender=sender, kind=rec.kind, key=rec.key, error=str(exc))

    def _park(self, rec: Record) -> None:
        key = (rec.kind, rec.key)
        held = self._parked.pop(key, None)
        self._parked[key] = rec if held is None or rec.order_key() > held.order_key() else held
        while len(self._parked) > MAX_PARKED:  # the oldest parked goes first
            dropped = self._parked.pop(next(iter(self._parked)))
            self.on_reject("record_rejected")
            log.debug("gossip.record_rejected", kind=dropped.kind, key=dropped.key,
                      error=f"from unknown node {dropped.origin} (more than {MAX_PARKED} such records waiting)")

    def _retry_parked(self) -> None:
        """Check the parked records again (a ``node`` record arrived): those whose origin is
        known now are applied (and so spread on by ``_changed``), the others wait on."""
        if not self._parked:
            return
        parked, self._parked = list(self._parked.values()), {}
        applied, rejected = self.store.apply_many(parked)
        for rec, exc in rejected:
            if isinstance(exc, UnknownOrigin):
                self._park(rec)
            else:
                self.on_reject("record_rejected")
                log.debug("gossip.record_rejected", kind=rec.kind, key=rec.key, error=str(exc))
        if applied:
            log.debug("gossip.records_unparked", records=len(applied))

    def wanted(self, notices: Sequence[Notice]) -> list[list[str]]:
        """The [kind, key] of announced records (too large for a packet) that are newer
        than this node's copy, or that it lacks."""
        return [[n.kind, n.key] for n in notices if _newer(n.ts, self.store.peek(n.kind, n.key))]

    def digest(self) -> list[list[Any]]:
        return [[r.kind, r.key, r.ts.wall_ms, r.ts.counter, r.ts.node_id] for r in self.store.peek_all()]

    def diff(self, remote_digest: Any) -> tuple[list[Record], list[list[str]]]:
        """(records the peer lacks or has older, keys the peer has newer)."""
        remote = _parse_digest(remote_digest)
        send: list[Record] = []
        local_keys = set()
        for rec in self.store.peek_all():  # only read and sent: no copies of every value
            key = (rec.kind, rec.key)
            local_keys.add(key)
            theirs = remote.get(key)
            mine = (rec.ts.wall_ms, rec.ts.counter, rec.ts.node_id)
            if theirs is None or mine > theirs:
                send.append(rec)
        want = [[kind, key] for (kind, key), ts in remote.items() if (kind, key) not in local_keys or _newer(
            ts, self.store.peek(kind, key))]
        return send, want

    def records_for(self, keys: Any) -> list[Record]:
        if not isinstance(keys, list) or len(keys) > MAX_DIGEST:
            raise MessageError("want: expected a list of [kind, key]")
        out = []
        for item in keys:
            if not (isinstance(item, list) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise MessageError("want: expected a list of [kind, key]")
            rec = self.store.peek(item[0], item[1])
            if rec is not None:
                out.append(rec)
        return out


def _newer(ts: tuple[int, int, str], rec: Record | None) -> bool:
    return rec is None or ts > (rec.ts.wall_ms, rec.ts.counter, rec.ts.node_id)


def _parse_digest(raw: Any) -> dict[tuple[str, str], tuple[int, int, str]]:
    if raw is None:
        return {}
    if not isinstance(raw, list) or len(raw) > MAX_DIGEST:
        raise MessageError("digest: expected a list")
    out = {}
    for item in raw:
        if not (isinstance(item, list) and len(item) == 5):
            raise MessageError("digest: expected [kind, key, wall_ms, counter, node] entries")
        kind, key, wall, counter, node = item
        if not (isinstance(kind, str) and isinstance(key, str) and isinstance(node, str)
                and isinstance(wall, int) and isinstance(counter, int)
                and not isinstance(wall, bool) and not isinstance(counter, bool)):
            raise MessageError("digest: expected [kind, key, wall_ms, counter, node] entries")
        out[(kind, key)] = (wall, counter, node)
    return out
