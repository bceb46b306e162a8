"""Piggybacked dissemination: a queue of updates, each sent a limited number of times.

Like memberlist's TransmitLimitedQueue: every packet a node sends carries as many queued
items as fit, those sent least often first; an item is dropped after
``retransmit_mult * ceil(log10(N + 1))`` sends, which is enough for an epidemic to reach
every node with high probability while keeping the per-node cost logarithmic. A newer item
about the same thing (the same member, the same record) replaces the older one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class _Item:
    key: str
    payload: Any
    size: int
    transmits: int
    order: int


class BroadcastQueue:
    def __init__(self, retransmit_mult: int, num_nodes: Callable[[], int]) -> None:
        self.retransmit_mult = retransmit_mult
        self.num_nodes = num_nodes
        self._items: dict[str, _Item] = {}
        self._order = 0

    def limit(self) -> int:
        return self.retransmit_mult * max(1, math.ceil(math.log10(self.num_nodes() + 1)))

    def queue(self, key: str, payload: Any, size: int) -> None:
        """Queue ``payload`` (``size`` bytes encoded), replacing anything queued under ``key``."""
        self._order += 1
        self._items[key] = _Item(key, payload, size, 0, self._order)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def take(self, budget: int, per_item_overhead: int = 1, count: bool = True) -> list[Any]:
        """Items that fit in ``budget`` bytes, least sent (then newest) first. With ``count``
        False the sends are not counted against the limit (packets to dead members)."""
        return self.take_sized(budget, per_item_overhead, count)[0]

    def take_sized(self, budget: int, per_item_overhead: int = 1, count: bool = True) -> tuple[list[Any], int]:
        """``take``, and the bytes the items use (so a second queue can fill the rest)."""
        if not self._items:
            return [], 0
        start = budget
        limit = self.limit()
        out = []
        for item in sorted(self._items.values(), key=lambda i: (i.transmits, -i.order)):
            cost = item.size + per_item_overhead
            if cost > budget:
                continue
            budget -= cost
            out.append(item.payload)
            if count:
                item.transmits += 1
                if item.transmits >= limit:
                    del self._items[item.key]
            if budget < 32:
                break
        return out, start - budget
