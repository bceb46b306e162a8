"""Hybrid logical clock (Kulkarni et al., 2014).

A timestamp is ``(wall_ms, counter, node_id)``. It stays close to physical time, never goes
backwards on one node even when the wall clock does, and orders every event that one node
could have seen before another. Ties between nodes are broken by node id, which makes the
order total, so last-writer-wins picks the same winner everywhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, order=True, slots=True)  # slots: one per record held in memory
class Timestamp:
    wall_ms: int
    counter: int
    node_id: str

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.counter}@{self.node_id[:8]}"


class HLC:
    """A thread-safe hybrid logical clock for one node."""

    def __init__(self, node_id: str, now_ms: Callable[[], int] | None = None) -> None:
        self._node_id = node_id
        self._now_ms = now_ms or (lambda: time.time_ns() // 1_000_000)
        self._wall = 0
        self._counter = 0
        self._lock = threading.Lock()

    def now(self) -> Timestamp:
        """A new timestamp for a local event, greater than every one issued or seen before."""
        with self._lock:
            pt = self._now_ms()
            if pt > self._wall:
                self._wall, self._counter = pt, 0
            else:
                self._counter += 1
            return Timestamp(self._wall, self._counter, self._node_id)

    def observe(self, ts: Timestamp) -> None:
        """Advance past a timestamp received from elsewhere (or read back from disk)."""
        with self._lock:
            pt = self._now_ms()
            wall = max(pt, self._wall, ts.wall_ms)
            if wall == self._wall and wall == ts.wall_ms:
                counter = max(self._counter, ts.counter) + 1
            elif wall == self._wall:
                counter = self._counter + 1
            elif wall == ts.wall_ms:
                counter = ts.counter + 1
            else:
                counter = 0
            self._wall, self._counter = wall, counter
