"""Per-app traffic metrics from the proxy's access log.

Caddy 2.6's own metrics are per server and handler, not per host, so they cannot tell apps
apart. Its access log can: the proxy writes one JSON line per request (``net`` log writer)
to a loopback TCP port of the agent, which maps the request's host to the app and counts.
In-flight requests per app are derived the way the autoscaler needs them, by Little's law
over a short window (arrival rate x mean duration), since a log line only exists once a
request is done.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque

from pleaco import logs
from pleaco.metrics import Counter, Gauge, Histogram, Registry

log = logs.get("pleaco.ingress.traffic")

WINDOW = 10.0  # seconds of completed requests the in-flight estimate looks back over
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class TrafficStats:
    def __init__(self, registry: Registry) -> None:
        self.hosts: dict[str, str] = {}
        self.m_requests = registry.register(
            Counter("pleaco_app_requests_total", "Requests the proxy served, by app and status class.",
                    ("app", "code"))
        )
        self.m_duration = registry.register(
            Histogram("pleaco_app_request_duration_seconds", "Proxy request latency by app.", ("app",),
                      buckets=LATENCY_BUCKETS)
        )
        self.m_lines = registry.register(
            Counter("pleaco_proxy_access_log_lines_total", "Access log lines read, by result.", ("result",))
        )
        registry.register(
            Gauge("pleaco_app_requests_in_flight",
                  f"Requests in flight per app, estimated over the last {WINDOW:g} s (Little's law).",
                  ("app",), collect=self.in_flight)
        )
        # Per app: (finish time, duration) of recent requests.
        self._recent: dict[str, deque[tuple[float, float]]] = {}

    def set_hosts(self, hosts: dict[str, str]) -> None:
        self.hosts = dict(hosts)

    def record(self, line: bytes) -> None:
        try:
            entry = json.loads(line)
            request = entry["request"]
            host = str(request.get("host", "")).rsplit(":", 1)[0].lower()
            duration = float(entry.get("duration", 0.0))
            status = int(entry.get("status", 0))
        except (ValueError, KeyError, TypeError, AttributeError):
            self.m_lines.inc(result="unparsed")
            return
        app = self.hosts.get(host)
        if app is None:
            self.m_lines.inc(result="unknown_host")
            return
        self.m_lines.inc(result="ok")
        self.m_requests.inc(app=app, code=f"{status // 100}xx" if status else "0")
        self.m_duration.observe(duration, app=app)
        recent = self._recent.setdefault(app, deque())
        now = time.monotonic()
        recent.append((now, duration))
        while recent and now - recent[0][0] > WINDOW:
            recent.popleft()

    def in_flight(self) -> dict[tuple[str, ...], float]:
        now = time.monotonic()
        out: dict[tuple[str, ...], float] = {}
        for app, recent in self._recent.items():
            total = sum(d for t, d in recent if now - t <= WINDOW)
            out[(app,)] = round(total / WINDOW, 3)
        return out

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection from the proxy's log writer: newline-delimited JSON until it closes."""
        try:
            while line := await reader.readline():
                self.record(line)
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.debug("proxy.access_log_closed", error=str(exc))
        except asyncio.CancelledError:
            pass  # the agent is stopping; a leaf task with nothing to hand back
        finally:
            writer.close()
