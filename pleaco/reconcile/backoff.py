"""Exponential back-off for crashing replicas (CrashLoopBackOff)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Backoff:
    base: float
    maximum: float
    failures: int = 0
    next_attempt: float = 0.0  # monotonic seconds

    def delay(self) -> float:
        """The wait after the current number of failures: base, 2·base, 4·base, ... max."""
        if self.failures <= 0:
            return 0.0
        # The exponent is capped before it is used: 2**1024 is beyond a float, and a replica
        # that crashes for days reaches that many failures.
        return float(min(self.maximum, self.base * 2.0 ** min(self.failures - 1, 60)))

    def fail(self, now: float) -> float:
        """Count a failure; returns the delay before the next attempt."""
        self.failures += 1
        delay = self.delay()
        self.next_attempt = now + delay
        return delay

    def ready(self, now: float) -> bool:
        return now >= self.next_attempt

    def reset(self) -> None:
        self.failures = 0
        self.next_attempt = 0.0
