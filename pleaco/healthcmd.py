"""A replica's health as a command run inside it (Docker's own healthcheck), for apps that
speak no HTTP: a database (``pg_isready``), a cache (``redis-cli ping``), a worker.

pleaco's HTTP probe (the spec's ``health`` path) needs a port and a path; a command check
needs neither. The engine runs it (``docker exec`` of the test every ``interval``, for at
most ``timeout``, ``retries`` failures in a row to be unhealthy, failures inside
``start_period`` not counted) and keeps the result in the container's state, which the
app loop reads from each listing it makes anyway: no extra engine call per replica. A
replica is healthy (routed, counted, a rollout's next step) once the engine says
``healthy``; ``unhealthy`` stops it, as a failed HTTP probe does, and the app loop starts
another.

Spec value: ``{"test": ["CMD", "redis-cli", "ping"], "interval": 5.0, "timeout": 3.0,
"retries": 3, "start_period": 0.0}`` (``test`` as Docker takes it: ``CMD`` and an argument
list, or ``CMD-SHELL`` and one shell line). A deploy may give just the list or just a shell
line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pleaco.errors import InvalidInput

# Defaults: an interval short enough that a new replica turns healthy within a few seconds
# of being ready (Docker's own 30 s would hold every rollout step that long), a timeout
# that a local ping-style command never needs, and Docker's 3 retries.
DEFAULT_INTERVAL = 2.0
DEFAULT_TIMEOUT = 5.0
DEFAULT_RETRIES = 3
# Docker refuses intervals and timeouts under 1 ms and takes whole nanoseconds; an hour is
# longer than any check anyone means.
MIN_SECONDS, MAX_SECONDS = 0.001, 3600.0
MAX_RETRIES = 100
MAX_TEST_BYTES = 4096


# The timing keys of a health command (durations in seconds), as a Compose healthcheck names
# them too (pleaco.stacks.compose takes them from here).
TIMINGS = ("interval", "timeout", "retries", "start_period")


class HealthCommandError(InvalidInput, ValueError, code="invalid"):
    """A health command that is not one (names the field and the problem)."""


@dataclass(frozen=True)
class HealthCommand:
    test: tuple[str, ...]  # ("CMD", argv...) or ("CMD-SHELL", "one shell line")
    interval: float = DEFAULT_INTERVAL
    timeout: float = DEFAULT_TIMEOUT
    retries: int = DEFAULT_RETRIES
    start_period: float = 0.0

    def to_value(self) -> dict[str, Any]:
        return {"test": list(self.test), "interval": self.interval, "timeout": self.timeout, "retries": self.retries,
                "start_period": self.start_period}

    def to_docker(self) -> dict[str, Any]:
        """The ``Healthcheck`` of a container's config (durations in nanoseconds)."""
        return {"test": list(self.test), "interval": _ns(self.interval), "timeout": _ns(self.timeout),
                "retries": self.retries, "start_period": _ns(self.start_period)}

    def describe(self) -> str:
        return " ".join(self.test[1:])

    @classmethod
    def from_value(cls, value: dict[str, Any]) -> HealthCommand:
        return cls(test=tuple(value["test"]), interval=float(value.get("interval", DEFAULT_INTERVAL)),
                   timeout=float(value.get("timeout", DEFAULT_TIMEOUT)),
                   retries=int(value.get("retries", DEFAULT_RETRIES)),
                   start_period=float(value.get("start_period", 0.0)))


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def parse_health_cmd(value: Any, field: str = "health_cmd") -> HealthCommand:
    """A deploy's ``health_cmd``: a shell line, an argument list, a Docker test list
    (``["CMD", ...]``, ``["CMD-SHELL", "..."]``) or a mapping with ``test`` and the timings."""
    timings: dict[str, Any] = {}
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"test", *TIMINGS})
        if unknown:
            raise HealthCommandError(f"{field}.{unknown[0]}: unknown field (allowed: {', '.join(('test', *TIMINGS))})")
        timings = {k: v for k, v in value.items() if k != "test"}
        value = value.get("test")
    test = _test(value, field)
    for key in ("interval", "timeout", "start_period"):
        if key in timings:
            raw = timings[key]
            if not isinstance(raw, (int, float)) or isinstance(raw, bool) or not math.isfinite(raw):
                raise HealthCommandError(f"{field}.{key}: {raw!r} is not a number of seconds")
            low = 0.0 if key == "start_period" else MIN_SECONDS
            if not low <= raw <= MAX_SECONDS:
                raise HealthCommandError(f"{field}.{key}: {raw!r} must be {low:g}..{MAX_SECONDS:g} seconds")
            timings[key] = float(raw)
    if "retries" in timings:
        raw = timings["retries"]
        if not isinstance(raw, int) or isinstance(raw, bool) or not 1 <= raw <= MAX_RETRIES:
            raise HealthCommandError(f"{field}.retries: {raw!r} must be a whole number 1..{MAX_RETRIES}")
    return HealthCommand(test=test, **timings)


def _test(value: Any, field: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = ["CMD-SHELL", value]
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise HealthCommandError(f"{field}: expected a shell line or a list of strings, got {value!r}")
    if value[0] not in ("CMD", "CMD-SHELL"):
        value = ["CMD", *value]
    if len(value) < 2 or not value[1].strip():
        raise HealthCommandError(f"{field}: the command is empty")
    if value[0] == "CMD-SHELL" and len(value) != 2:
        raise HealthCommandError(f"{field}: CMD-SHELL takes one shell line, got {len(value) - 1}")
    if any("\x00" in a for a in value) or sum(len(a.encode("utf-8", "replace")) for a in value) > MAX_TEST_BYTES:
        raise HealthCommandError(f"{field}: the command must be under {MAX_TEST_BYTES} bytes without NUL")
    return tuple(value)
