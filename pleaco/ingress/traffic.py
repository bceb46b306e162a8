"""Per-app traffic figures from the proxy's access log, read at as little cost as possible.

Caddy 2.6's own metrics are per server and handler, not per host (and Debian's 2.6.2 emits
no ``caddy_http_*`` series at all); its ``/reverse_proxy/upstreams`` lists static upstreams
only, and pleaco's come from DNS. Its access log does name the host: the proxy writes JSON
lines (level, time, the request, duration, status, ...) to a loopback TCP port of the agent,
every request up to ``Sampling.first`` a second and one in ``Sampling.every`` beyond, and
the agent weighs each line by the requests it stands for (``_Tick``).

What it costs was measured candidate by candidate (benchmarks/README.md): on Caddy's side a
written line, and the filter encoder even for a line the sampler drops; on the agent's side
one ``readline`` and one JSON parse per request in Python, on the same cores as Caddy. So
the lines are sampled, Caddy's plain encoder is used, and the agent reads whatever has
arrived in one chunk at most every BATCH_INTERVAL (under load, many lines per read),
counting per app in coarse time slots, not per request.

Figures per app over the last ``window`` seconds: requests per second, concurrency (mean
requests in flight, by Little's law: the time the completed requests spent in flight
divided by the window; a log line only exists once a request is done, so a request still
running counts when it ends) and latency quantiles from a histogram.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pleaco import hostport, logs
from pleaco.metrics import Counter, Gauge, Histogram, Registry

log = logs.get("pleaco.ingress.traffic")

# Seconds of completed requests the per-app figures look back over. Short enough that a
# load step shows within a gossip round or two; the autoscaler averages the samples over
# its own windows (6 s panic, 60 s stable).
WINDOW = 2.0
SLOT = 0.25  # seconds per time slot the counts are kept in
HISTORY = 16.0  # seconds of slots kept (the longest window asked for)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_LINE = 64 * 1024  # a longer line is not one of Caddy's access-log lines (headers are capped far below)
READ_SIZE = 256 * 1024
# Seconds between reads of the access-log stream after a short one. Caddy's writes land in
# the socket's receive buffer meanwhile (80 bytes a request: 10 000 requests/s fill 40 KB,
# far below the kernel's autotuned buffer, so the proxy never waits on the agent).
BATCH_INTERVAL = 0.05

@dataclass(frozen=True)
class Sampling:
    """The access log's sampling, as the proxy is configured with it (zap's sampler, which
    Caddy's logs take): per ``interval`` seconds and log level, the first ``first`` lines are
    written, then one in ``every``. ``every`` 1 writes every request."""

    first: int = 100
    every: int = 1
    interval: float = 1.0


class _Tick:
    """zap's sampler counter for one level, mirrored from the lines it let through: the
    line that resets the counter is always written (it is number 1 of its tick), so its
    time starts the tick here too; line k of a tick stands for one request up to ``first``,
    and for ``every`` requests after (itself and the every - 1 dropped before it)."""

    __slots__ = ("n", "reset_at")

    def __init__(self) -> None:
        self.n = 0
        self.reset_at = float("-inf")

    def weight(self, ts: float, s: Sampling) -> int:
        if ts >= self.reset_at:
            self.n, self.reset_at = 1, ts + s.interval
            return 1
        self.n += 1
        return 1 if self.n <= s.first else s.every


@dataclass(frozen=True)
class AppTraffic:
    """One app's traffic through this node's proxy over a window."""

    rps: float  # completed requests per second
    concurrency: float  # mean requests in flight (Little's law)
    p50: float | None  # seconds; None without requests in the window
    p99: float | None
    requests: int  # requests completed in the window


class _Slot:
    __slots__ = ("buckets", "count", "duration")

    def __init__(self) -> None:
        self.count = 0
        self.duration = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def merge(self, other: _Slot) -> None:
        self.count += other.count
        self.duration += other.duration
        for i, n in enumerate(other.buckets):
            self.buckets[i] += n


def quantile(buckets: list[int], q: float) -> float | None:
    """The q-quantile of a histogram over LATENCY_BUCKETS (counts per bucket, the last one
    open-ended), linearly interpolated inside its bucket as Prometheus' histogram_quantile
    does; None for an empty histogram."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    running = 0
    for i, n in enumerate(buckets):
        if running + n >= rank and n:
            if i == len(LATENCY_BUCKETS):
                return LATENCY_BUCKETS[-1]
            low = LATENCY_BUCKETS[i - 1] if i else 0.0
            return low + (LATENCY_BUCKETS[i] - low) * (rank - running) / n
        running += n
    return LATENCY_BUCKETS[-1]


class TrafficStats:
    def __init__(self, registry: Registry, clock: Callable[[], float] = time.monotonic,
                 sampling: Sampling | None = None) -> None:
        self.hosts: dict[str, str] = {}
        self.clock = clock
        self.sampling = sampling or Sampling()
        self._ticks: dict[str, _Tick] = {}  # per log level
        self.m_requests = registry.register(
            Counter("pleaco_app_requests_total", "Requests this node's proxy served, by app and status class "
                    "(estimated from the sampled access log above [proxy] access_log_first requests/s).",
                    ("app", "code"))
        )
        self.m_duration = registry.register(
            Histogram("pleaco_app_request_duration_seconds", "Proxy request latency by app (this node).", ("app",),
                      buckets=LATENCY_BUCKETS)
        )
        self.m_lines = registry.register(
            Counter("pleaco_proxy_access_log_lines_total", "Access log lines read, by result.", ("result",))
        )
        self.m_reads = registry.register(
            Counter("pleaco_proxy_access_log_reads_total", "Reads of the access log stream (lines come in batches).")
        )
        registry.register(
            Gauge("pleaco_app_requests_in_flight",
                  f"Requests in flight per app through this node's proxy, the mean over the last {WINDOW:g} s "
                  "(Little's law).", ("app",), collect=self.in_flight)
        )
        # Per app: the time slots (slot number -> counts) of the last HISTORY seconds.
        self._slots: dict[str, deque[tuple[int, _Slot]]] = {}

    def set_hosts(self, hosts: dict[str, str]) -> None:
        self.hosts = dict(hosts)

    # -- reading -------------------------------------------------------------------------

    def record(self, line: bytes) -> None:
        """One access-log line (kept for callers with single lines; ``feed`` is the batch path)."""
        self.feed_lines([line])

    def feed_lines(self, lines: list[bytes]) -> None:
        """A batch of lines: counted per app in one time slot, the metrics updated once per
        app and status class rather than once per line."""
        slot_no = int(self.clock() / SLOT)
        ok = unknown = unparsed = 0
        batch: dict[str, _Slot] = {}
        codes: dict[tuple[str, str], int] = {}
        hosts = self.hosts
        sampling = self.sampling
        for line in lines:
            if not line.strip():
                continue
            parsed = _parse(line)
            if parsed is None:
                unparsed += 1
                continue
            level, ts, host, duration, status = parsed
            weight = 1
            if sampling.every > 1 and ts is not None:
                tick = self._ticks.get(level)
                if tick is None:
                    tick = self._ticks[level] = _Tick()
                weight = tick.weight(ts, sampling)
            app = hosts.get(host)
            if app is None:
                unknown += 1
                continue
            ok += 1
            slot = batch.get(app)
            if slot is None:
                slot = batch[app] = _Slot()
            slot.count += weight
            slot.duration += duration * weight
            slot.buckets[bisect.bisect_left(LATENCY_BUCKETS, duration)] += weight
            key = (app, f"{status // 100}xx" if status else "0")
            codes[key] = codes.get(key, 0) + weight
        for (app, code), n in codes.items():
            self.m_requests.inc(n, app=app, code=code)
        for app, got in batch.items():
            self.m_duration.add(got.buckets, got.duration, app=app)
            self._slot(app, slot_no).merge(got)
        for result, n in (("ok", ok), ("unknown_host", unknown),
                          ("unparsed", unparsed)):
            if n:
                self.m_lines.inc(n, result=result)

    def _slot(self, app: str, slot_no: int) -> _Slot:
        slots = self._slots.get(app)
        if slots is None:
            slots = self._slots[app] = deque()
        if not slots or slots[-1][0] != slot_no:
            slots.append((slot_no, _Slot()))
            oldest = slot_no - int(HISTORY / SLOT)
            while slots[0][0] < oldest:
                slots.popleft()
        return slots[-1][1]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection from the proxy's log writer: newline-delimited JSON until it
        closes, read in chunks of whatever has arrived, at most every BATCH_INTERVAL: in
        between the socket is not even watched (its transport paused), so lines gather in the
        kernel's buffer and a wake-up costs the same for one line as for hundreds."""
        rest = b""
        transport = writer.transport
        try:
            while chunk := await reader.read(READ_SIZE):
                self.m_reads.inc()
                data = rest + chunk
                cut = data.rfind(b"\n")
                if cut < 0:
                    rest = data
                else:
                    self.feed_lines(data[:cut].split(b"\n"))
                    rest = data[cut + 1:]
                if len(rest) > MAX_LINE:
                    self.m_lines.inc(result="unparsed")
                    rest = b""  # not a line of ours; skip to the next newline's worth
                if len(chunk) < READ_SIZE and isinstance(transport, asyncio.ReadTransport):
                    await self._gather(transport)
        except ConnectionError as exc:
            log.debug("proxy.access_log_closed", error=str(exc))
        except asyncio.CancelledError:
            pass  # the agent is stopping; a leaf task with nothing to hand back
        finally:
            writer.close()

    @staticmethod
    async def _gather(transport: asyncio.ReadTransport) -> None:
        if transport.is_closing():
            return
        transport.pause_reading()
        try:
            await asyncio.sleep(BATCH_INTERVAL)
        finally:
            if not transport.is_closing():
                transport.resume_reading()

    # -- figures -------------------------------------------------------------------------

    def snapshot(self, window: float = WINDOW) -> dict[str, AppTraffic]:
        """Every app with requests in the last ``window`` seconds (at most HISTORY)."""
        now = self.clock()
        now_slot = int(now / SLOT)
        window = max(SLOT, min(window, HISTORY))
        first = now_slot - round(window / SLOT)
        # The window's seconds are the current slot so far, the whole slots before it, and
        # the part of the oldest slot still inside the window: that slot counts for that
        # share of its requests (as if they came evenly). Whole slots only, dividing by the
        # window, read the current slot's share low (up to 12 % of a 2 s window: a report
        # taken just after a slot began saw a 2x load step as 1.75x).
        oldest_share = 1.0 - (now - now_slot * SLOT) / SLOT
        out = {}
        for app, slots in list(self._slots.items()):
            count, weighted, duration = 0, 0.0, 0.0
            buckets = [0] * (len(LATENCY_BUCKETS) + 1)
            for slot_no, slot in slots:
                if slot_no < first:
                    continue
                share = oldest_share if slot_no == first else 1.0
                count += slot.count
                weighted += slot.count * share
                duration += slot.duration * share
                buckets = [a + b for a, b in zip(buckets, slot.buckets, strict=True)]
            if not count:
                if slots and slots[-1][0] < now_slot - int(HISTORY / SLOT):
                    del self._slots[app]  # idle for the whole history: forget it
                continue
            out[app] = AppTraffic(rps=weighted / window, concurrency=duration / window, p50=quantile(buckets, 0.5),
                                  p99=quantile(buckets, 0.99), requests=round(weighted))
        return out

    def in_flight(self) -> dict[tuple[str, ...], float]:
        return {(app, ): round(t.concurrency, 3) for app, t in self.snapshot().items()}


def _parse(line: bytes) -> tuple[str, float | None, str, float, int] | None:
    """(level, time, host without port and lower case, duration in seconds, status) of one
    access-log line; the time is None when the line has none."""
    ts: float | None
    try:
        entry = json.loads(line)
        host = str(entry["request"].get("host", ""))
        duration = float(entry.get("duration", 0.0))
        status = int(entry.get("status", 0))
        level = str(entry.get("level", "info"))
        ts = float(entry["ts"]) if "ts" in entry else None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None
    if not 0.0 <= duration < float("inf") or (ts is not None and not abs(ts) < float("inf")):
        return None
    return level, ts, hostport.request_host(host), duration, status
