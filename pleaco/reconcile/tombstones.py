"""Tombstone collection, a loop: deletes are kept as tombstones so they replicate, and
dropped after ``tombstone_ttl`` seconds (a day outlasts any partition expected to heal)."""

from __future__ import annotations

import asyncio
import time

from pleaco import logs
from pleaco.reconcile.loop import Loop
from pleaco.store import Store

log = logs.get("pleaco.reconcile.tombstones")


class TombstoneCollector(Loop):
    name = "tombstones"

    def __init__(self, store: Store, ttl: float) -> None:
        super().__init__()
        self.store = store
        self.ttl = ttl
        self.interval = min(3600.0, ttl / 4)

    async def step(self) -> str | None:
        horizon = int((time.time() - self.ttl) * 1000)
        dropped = await asyncio.to_thread(self.store.collect_tombstones, horizon)
        if dropped:
            log.info("store.tombstones_collected", count=dropped)
        return None
