"""State at scale: what one write, one listing and one join cost as the number of apps grows.

One agent (no proxy container) gets apps written through the API by 8 concurrent clients
(each app: pleaco/hello:latest, port 8080, a host name of its own, 0 replicas, so no
container runs and only the state is measured). At each size (default 500, then 5000, on
the same agent, in one run) it measures:

- writes/s and p50/p99 latency of the last ``WINDOW`` deploys that brought it to that size
  (creating new apps, as in the issue);
- ``apps ls``: the CLI, as a user runs it (Python start included), and GET /v1/apps alone;
- a joining node: a second agent started with a join token, timed from its start until its
  own API counts every app;
- one write's time to reach that second node: a deploy on the first, until the second's
  API shows the app (polled every 0.02 s; median of ``PROPAGATION_SAMPLES``);
- the first agent's RSS (VmRSS) once all of that is done.

The joiner is stopped after its measurements; both agents are stopped and their data dirs
removed at the end (no container is ever started: every app has 0 replicas).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import HELLO, HELLO_PORT, Agent, BenchError, Row, finish_workdir, log, wait_until
from benchmarks.idle import rss_kb
from pleaco.api.client import Client
from pleaco.api.errors import ApiError

CLIENTS = 8
WINDOW = 500  # deploys measured per size: the last ones before the size is reached
PROPAGATION_SAMPLES = 5
WRITES_GOAL = 0.8  # writes/s at the largest size against the smallest
PROPAGATION_GOAL_S = 0.5
RSS_GOAL_MB = 100.0
# Only the API and gossip: no Caddy container (the proxy loop still runs, publishing routes).
AGENT_ARGS = ["--proxy-image="]


def spec(name: str) -> dict[str, Any]:
    return {"image": HELLO, "port": HELLO_PORT, "host": f"{name}.state.test", "replicas": 0}


def write_apps(agent: Agent, names: list[str]) -> list[float]:
    """Deploy ``names`` with CLIENTS concurrent clients; each deploy's latency in seconds."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    it = iter(names)

    def client_loop() -> None:
        client = Client(agent.url, agent.token, timeout=60.0)
        while True:
            with lock:
                name = next(it, None)
            if name is None or errors:
                return
            t0 = time.monotonic()
            try:
                client.deploy(name, spec(name))
            except ApiError as exc:
                with lock:
                    errors.append(f"deploy {name}: {exc}")
                return
            with lock:
                latencies.append(time.monotonic() - t0)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise BenchError(errors[0])
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(fn: Any, n: int = 3) -> float:
    """Median wall time of ``n`` calls of ``fn``."""
    samples = []
    for _ in range(n):
        t0 = time.monotonic()
        fn()
        samples.append(time.monotonic() - t0)
    return statistics.median(samples)


def app_count(agent: Agent) -> int:
    try:
        return int(agent.client.status()["apps"])
    except ApiError:
        return -1


def measure_size(workdir: Path, first: Agent, have: int, size: int, token: str) -> dict[str, Any]:
    """From ``have`` apps to ``size``, then measure; leaves ``size + PROPAGATION_SAMPLES``."""
    names = [f"s{i:05d}" for i in range(have, size)]
    fill, window = names[:-WINDOW], names[-WINDOW:]
    if fill:
        log(f"state: filling to {size - len(window)} apps")
        write_apps(first, fill)
    log(f"state: {len(window)} timed deploys up to {size} apps")
    t0 = time.monotonic()
    lat = write_apps(first, window)
    took = time.monotonic() - t0
    m: dict[str, Any] = {
        "apps": size, "writes_per_s": len(window) / took,
        "write_p50_ms": pct(lat, 0.5) * 1000, "write_p99_ms": pct(lat, 0.99) * 1000,
    }
    if app_count(first) != size:
        raise BenchError(f"agent counts {app_count(first)} apps, expected {size}")
    m["ls_cli_s"] = timed(lambda: first.cli("apps", "ls"))
    m["ls_api_s"] = timed(lambda: first.client.apps())
    log(f"state: {size} apps: {m['writes_per_s']:.0f} writes/s, p99 {m['write_p99_ms']:.0f} ms, "
        f"apps ls {m['ls_cli_s']:.2f} s")

    t0 = time.monotonic()
    with Agent(workdir, f"bench-state-join{size}", extra_args=[*AGENT_ARGS, "--join-token", token]) as joiner:
        wait_until(lambda: app_count(joiner) == size, 300, f"the joining node to hold {size} apps", interval=0.1)
        m["join_s"] = time.monotonic() - t0
        samples = []
        for i in range(PROPAGATION_SAMPLES):
            name = f"p{size}-{i}"
            t0 = time.monotonic()
            first.client.deploy(name, spec(name))

            def arrived(name: str = name) -> bool:
                try:
                    joiner.client.app(name)
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    return False
                return True

            wait_until(arrived, 30, f"{name} to reach the second node", interval=0.02)
            samples.append(time.monotonic() - t0)
        m["propagation_s"] = statistics.median(samples)
        m["propagation_samples_s"] = [round(s, 3) for s in samples]
        m["joiner_rss_mb"] = rss_kb(joiner.pid) / 1024
    m["rss_mb"] = rss_kb(first.pid) / 1024
    log(f"state: {size} apps: join {m['join_s']:.2f} s, one write reaches the other node in "
        f"{m['propagation_s']:.2f} s, RSS {m['rss_mb']:.1f} MB")
    return m


def rows(results: list[dict[str, Any]]) -> list[Row]:
    """Per size, one row per figure; at the larger sizes the smallest is the baseline (so
    the table shows the ratio), and the goals apply to the largest."""
    small, largest, out = results[0], results[-1], []
    metrics = [  # label, unit, key, goal, test of the largest size against the smallest
        ("writes", "writes/s", "writes_per_s", f">= {WRITES_GOAL:.2f}x {small['apps']} apps",
         lambda m: m["writes_per_s"] >= WRITES_GOAL * small["writes_per_s"]),
        ("write p99", "ms", "write_p99_ms", "", None),
        ("apps ls (CLI)", "s", "ls_cli_s", "", None),
        ("GET /v1/apps", "s", "ls_api_s", "", None),
        ("join", "s", "join_s", "", None),
        ("write to 2nd node", "s", "propagation_s", f"<= {PROPAGATION_GOAL_S} s",
         lambda m: m["propagation_s"] <= PROPAGATION_GOAL_S),
        ("RSS", "MB", "rss_mb", f"< {RSS_GOAL_MB:.0f} MB", lambda m: m["rss_mb"] < RSS_GOAL_MB),
    ]
    for m in results:
        details = {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
        goals = m is largest and m is not small
        for label, unit, key, goal, test in metrics:
            out.append(Row(
                benchmark=f"state {label}, {m['apps']} apps", unit=unit, pleaco=m[key],
                baseline=small[key] if m is not small else None,
                baseline_name=f"{small['apps']} apps" if m is not small else "",
                goal=goal if goals else "", met=test(m) if goals and test else None, details=details,
            ))
    return out


def run(opts: argparse.Namespace) -> list[Row]:
    sizes = sorted(set(opts.state_apps or [500, 5000]))
    if sizes[0] < WINDOW or any(b - a < WINDOW + PROPAGATION_SAMPLES for a, b in itertools.pairwise(sizes)):
        raise BenchError(f"--state-apps: sizes must be at least {WINDOW} and {WINDOW + PROPAGATION_SAMPLES} apart")
    workdir = Path(tempfile.mkdtemp(prefix="pleaco-bench-state-"))
    results: list[dict[str, Any]] = []
    try:
        with Agent(workdir, "bench-state", extra_args=AGENT_ARGS) as first:
            first.client.request("POST", "/v1/cluster/init")
            token = first.client.request("GET", "/v1/cluster/token")["token"]
            have = 0
            for size in sizes:
                results.append(measure_size(workdir, first, have, size, token))
                have = size + PROPAGATION_SAMPLES
    finally:
        finish_workdir(workdir, "bench-state.log", opts.results_dir, "state-agent.log")
    return rows(results)
