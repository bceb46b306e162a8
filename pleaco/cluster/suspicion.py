"""Lifeguard's suspicion timeout: it starts long and shrinks as members confirm.

With ``k`` expected independent confirmations, the timeout after ``c`` of them is

    max(min, max - (max - min) * log(c + 1) / log(k + 1))

so one member's bad link (no confirmation) gives the suspect the long timeout to refute,
while a member that many find unreachable is declared dead quickly (Dadgar et al.,
"Lifeguard: Local Health Awareness for More Accurate Failure Detection", 2018).
"""

from __future__ import annotations

import math


def suspicion_bounds(mult: int, max_mult: int, n: int, probe_interval: float) -> tuple[float, float]:
    """(min, max) timeout for a cluster of ``n`` members, memberlist's formula."""
    node_scale = max(1.0, math.log10(max(1.0, float(n))))
    low = mult * node_scale * probe_interval
    return low, low * max_mult


class Suspicion:
    def __init__(self, start: float, low: float, high: float, k: int, source: str) -> None:
        self.start = start
        self.low = low
        self.high = high
        self.k = k
        # The member that raised the suspicion is not a confirmation: only others are.
        self.confirmations: set[str] = set()
        self.source = source

    def confirm(self, source: str) -> bool:
        """Count an independent confirmation; True when it is new and changes the deadline."""
        if self.k < 1 or source == self.source or source in self.confirmations:
            return False
        if len(self.confirmations) >= self.k:
            return False
        self.confirmations.add(source)
        return True

    def timeout(self) -> float:
        if self.k < 1:
            return self.low
        frac = math.log(len(self.confirmations) + 1) / math.log(self.k + 1)
        return max(self.low, self.high - (self.high - self.low) * frac)

    def deadline(self) -> float:
        return self.start + self.timeout()
