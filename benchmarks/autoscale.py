"""Autoscale (issue 11): how the autoscaler reacts to a load step, whether it flaps under a
noisy constant load, and how long a request to an app at zero replicas waits.

One agent with its proxy (pleaco/caddy) and activator on 127.0.0.1, the agent's defaults
([autoscale] interval 1 s, [proxy] load_interval 2 s) and the policy's default windows
(60 s stable, 6 s panic, panic at 2x, 10 % tolerance). Load is open loop (a request starts
every 1/rate s whatever the answers do) through the proxy, from this process.

- **flaps**: app ``autoscale-bench`` (a busybox httpd whose CGI ``/cgi-bin/slow`` answers
  after 1 s) at 2 replicas, policy concurrency, target 2 per replica, min 1, max 8. At
  4 requests/s of 1 s each, 4 are in flight: exactly 2 replicas' worth. The rate is redrawn
  every second uniformly within +-20 % (3.2..4.8/s) for ``FLAP_SECONDS``; the desired count
  is read every 0.5 s and every change of direction (up after down or down after up) is a
  flap, extrapolated to an hour. Any change at all is reported too.
- **reaction to a 2x step**: straight after, the rate goes to 8/s (8 in flight: 4 replicas);
  the clock runs from the step until the API reports 4 healthy replicas (polled every
  0.2 s). Then the load goes on for ``OVERSHOOT_SECONDS`` more and the highest count
  reached is the overshoot against the 4 needed. Baseline: the container start, from
  ``docker run -d`` of the same image until its first answer on its bridge address (polled
  every 0.05 s), median of ``START_ROUNDS``. Goal: reaction within the panic window (6 s)
  plus that start.
- **cold start**: app ``autoscale-bench-zero`` (pleaco/hello, the sample app), policy
  concurrency target 10, min 0, max 1, ``scale_to_zero_after`` ``IDLE_AFTER`` s (no default
  exists: it is opt-in). ``COLD_ROUNDS`` times: wait until the app is at 0 (no instance,
  no container, the proxy routing none), then one request through the proxy; the time from
  sending it to the status line (first byte). Baselines: ``docker run -d`` of pleaco/hello
  until its first answer, and one request straight to its running replica. Goal: under 1 s.

Cleanup, also on failure, Ctrl-C or SIGTERM: the load stops, the apps are removed, the agent
is stopped and every container with its node id or the benchmark's label is force-removed,
and the slow image is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import random
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import (
    CADDY,
    HELLO,
    HELLO_PORT,
    LOOPBACK,
    REPO,
    Agent,
    BenchError,
    Row,
    docker_cli,
    engine,
    finish_workdir,
    free_port,
    log,
    median,
    remove_containers,
    require_image,
    wait_until,
)

APP = "autoscale-bench"
ZERO_APP = "autoscale-bench-zero"
SLOW = "pleaco-bench/slow:latest"
SLOW_LABEL = "pleaco.bench=autoscale"
# examples/slow: /cgi-bin/slow answers after a second, /healthz at once (the test's app too).
SLOW_APP = REPO / "examples" / "slow"
TARGET = 2.0  # in-flight requests per replica
STEADY_RATE = 4.0  # requests/s of 1 s each: 4 in flight, 2 replicas
NEEDED = 2
NOISE = 0.2
FLAP_SECONDS = 120.0
OVERSHOOT_SECONDS = 15.0
START_ROUNDS = 3
COLD_ROUNDS = 5
IDLE_AFTER = 3.0
COLD_GOAL_S = 1.0
PANIC_WINDOW = 6.0  # the policy's default


class Load:
    """Open-loop GETs through the proxy at ``rate()`` requests/s (read before every
    request), from a thread of its own; counts answers and failures. Bounded by
    ``max_seconds``; ``stop()`` waits for the requests under way."""

    def __init__(self, url: str, host: str, rate: Callable[[], float], max_seconds: float) -> None:
        self.url, self.host, self.rate, self.max_seconds = url, host, rate, max_seconds
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _one(self, session: aiohttp.ClientSession) -> None:
        try:
            async with session.get(self.url, headers={"Host": self.host}) as resp:
                body = await resp.text()
                with self._lock:
                    if resp.status == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{resp.status} {body.strip()[:80]}")
        except Exception as exc:  # every failure is counted, none may escape
            with self._lock:
                self.failures.append(f"{type(exc).__name__}: {exc}")

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=64)) as session:
            started = due = time.monotonic()
            tasks: set[asyncio.Task[None]] = set()
            while not self._stop.is_set() and time.monotonic() - started < self.max_seconds:
                task = asyncio.create_task(self._one(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                # Open loop: the next request is due 1/rate after this one was, however
                # long starting it took.
                due += 1.0 / self.rate()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            if tasks:
                await asyncio.gather(*tasks)


@contextlib.contextmanager
def slow_image() -> Iterator[str]:
    require_image("pleaco/busybox:latest")
    proc = subprocess.run(["docker", "build", "-q", "--label", SLOW_LABEL, "-t", SLOW, str(SLOW_APP)],
                          capture_output=True, text=True, timeout=120,
                          env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})
    if proc.returncode != 0:
        raise BenchError(f"docker build {SLOW}: {proc.stderr.strip()}")
    try:
        yield SLOW
    finally:
        docker_cli("image", "rm", SLOW, check=False)


def answers(host: str, port: int, path: str, timeout: float = 5.0) -> bool:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def first_byte(port: int, host: str | None, path: str = "/", address: str = LOOPBACK) -> float:
    """Seconds from sending one GET to its status line; BenchError unless it is a 200."""
    conn = http.client.HTTPConnection(address, port, timeout=60)
    try:
        start = time.monotonic()
        conn.request("GET", path, headers={"Host": host} if host else {})
        resp = conn.getresponse()
        took = time.monotonic() - start
        body = resp.read().decode(errors="replace")
        if resp.status != 200:
            raise BenchError(f"GET {path} answered {resp.status}: {body.strip()[:120]}")
        return took
    finally:
        conn.close()


def container_start(image: str, path: str) -> float:
    """Seconds from ``docker run -d`` of ``image`` until it answers ``path`` on its bridge
    address (what the proxy dials); the container is removed afterwards."""
    name = f"pleaco-bench-start-{random.randrange(1 << 30):x}"
    try:
        t0 = time.monotonic()
        docker_cli("run", "-d", "--init", "--name", name, "--label", SLOW_LABEL, image)
        info = engine().inspect_container(name)
        ip = next(n["IPAddress"] for n in info["NetworkSettings"]["Networks"].values() if n["IPAddress"])
        wait_until(lambda: answers(ip, HELLO_PORT, path, timeout=1), 30, f"{image} to answer", interval=0.05)
        return time.monotonic() - t0
    finally:
        remove_containers([SLOW_LABEL])


def replica_ip(agent: Agent, app_name: str) -> str:
    app = agent.client.app(app_name)
    info = engine().inspect_container(app["instances"][0]["container"])
    return str(next(n["IPAddress"] for n in info["NetworkSettings"]["Networks"].values() if n["IPAddress"]))


def flaps(counts: list[int]) -> tuple[int, int]:
    """(changes of the count, changes of its direction) in a series of counts."""
    changes, reversals, last_dir = 0, 0, 0
    for a, b in itertools.pairwise(counts):
        if a == b:
            continue
        changes += 1
        direction = 1 if b > a else -1
        if last_dir and direction != last_dir:
            reversals += 1
        last_dir = direction
    return changes, reversals


def measure_scaling(agent: Agent) -> tuple[list[Row], dict[str, Any]]:
    client = agent.client
    host = f"{APP}.pleaco.internal"
    client.deploy(APP, {"image": SLOW, "port": HELLO_PORT, "health": "/healthz"})
    client.scale(APP, NEEDED)
    wait_until(lambda: client.app(APP)["healthy"] == NEEDED, 90, f"{NEEDED} healthy replicas of {APP}")
    wait_until(lambda: _proxied_ok(agent.proxy_port, host), 60, f"{APP} through the proxy")

    rate = {"value": STEADY_RATE}
    rng = random.Random(11)
    url = f"http://{LOOPBACK}:{agent.proxy_port}/cgi-bin/slow"
    counts: list[int] = []
    total = FLAP_SECONDS + 150 + OVERSHOOT_SECONDS
    with Load(url, host, lambda: rate["value"], max_seconds=total) as load:
        # The policy only once the load shows: its first samples would otherwise be an idle
        # app's, and it would take the count down to 1 before the load brings it back.
        wait_until(lambda: (client.app(APP).get("load") or {}).get("concurrency", 0) >= STEADY_RATE / 2, 30,
                   "the steady load in the app's figures")
        client.autoscale(APP, {"min_replicas": 1, "max_replicas": 8, "metric": "concurrency", "target": TARGET})
        log(f"autoscale: {FLAP_SECONDS:.0f} s at {STEADY_RATE:g} requests/s +-{NOISE:.0%} ({NEEDED} replicas' worth)")
        t0 = time.monotonic()
        next_draw = t0
        while (now := time.monotonic()) - t0 < FLAP_SECONDS:
            if now >= next_draw:
                rate["value"] = STEADY_RATE * rng.uniform(1 - NOISE, 1 + NOISE)
                next_draw += 1.0
            counts.append(int(client.app(APP)["replicas"]))
            time.sleep(0.5)
        changes, reversals = flaps(counts)
        log(f"autoscale: flaps {reversals}, count changes {changes}, counts {sorted(set(counts))}")
        before = client.app(APP)
        log(f"autoscale: step to {2 * STEADY_RATE:g} requests/s from {before['replicas']} replicas")
        rate["value"] = 2 * STEADY_RATE
        step, step_wall = time.monotonic(), time.time()
        seen_max = int(before["replicas"])
        # When the app's figure (the cluster-wide concurrency the autoscaler samples) first
        # shows 90 % of the new load: the metric pipeline's share of the reaction.
        figure_after: float | None = None

        def enough() -> bool:
            nonlocal seen_max, figure_after
            app = client.app(APP)
            seen_max = max(seen_max, int(app["replicas"]))
            shown = float((app.get("load") or {}).get("concurrency", 0))
            if figure_after is None and shown >= 0.9 * 2 * STEADY_RATE:
                figure_after = time.monotonic() - step
            return int(app["healthy"]) >= 2 * NEEDED

        wait_until(enough, 150, f"{2 * NEEDED} healthy replicas after the step")
        reaction = time.monotonic() - step
        log(f"autoscale: {2 * NEEDED} healthy after {reaction:.2f} s; watching {OVERSHOOT_SECONDS:.0f} s more")
        until = time.monotonic() + OVERSHOOT_SECONDS
        while time.monotonic() < until:
            seen_max = max(seen_max, int(client.app(APP)["replicas"]))
            time.sleep(0.5)
        decisions = client.app(APP)["autoscaler"]["decisions"]
        load.stop()
    # When each decision after the step was taken: the reaction is deciding plus starting.
    decided_after = [round(d["at_ms"] / 1000 - step_wall, 2) for d in decisions if d["at_ms"] / 1000 >= step_wall]
    log(f"autoscale: the figure showed the step after {figure_after} s, decided after {decided_after} s")
    details = {"flap_counts": counts, "decisions": decisions, "decided_after_step_s": decided_after,
               "figure_after_step_s": None if figure_after is None else round(figure_after, 2),
               "requests_ok": load.ok, "requests_failed": len(load.failures), "failures": load.failures[:5]}
    if load.failures:
        details["errors"] = [f"{len(load.failures)} requests failed under the autoscaled load: {load.failures[:3]}"]
    agent.remove_app(APP)
    return [
        Row(benchmark=f"autoscale flaps, {FLAP_SECONDS:.0f} s at {NEEDED} replicas' load +-{NOISE:.0%}",
            unit="per hour", pleaco=reversals * 3600 / FLAP_SECONDS, goal="0", met=reversals == 0,
            details={"direction_changes": reversals, "count_changes": changes, "observed_s": FLAP_SECONDS}),
    ], {"reaction": reaction, "max": seen_max, **details}


def _proxied_ok(port: int, host: str) -> bool:
    try:
        first_byte(port, host, "/healthz")
        return True
    except (OSError, BenchError):
        return False


def at_zero(agent: Agent) -> None:
    client = agent.client
    wait_until(lambda: client.app(ZERO_APP)["replicas"] == 0, 90, f"{ZERO_APP} at zero replicas")
    wait_until(lambda: client.app(ZERO_APP)["instances"] == [], 60, f"{ZERO_APP}'s replica removed")
    host = f"{ZERO_APP}.pleaco.internal"

    def routes_none() -> bool:
        routes = {r["host"]: r["upstreams"] for r in client.request("GET", "/v1/proxy")["routes"]}
        return routes.get(host) == []

    wait_until(routes_none, 30, "the proxy to route no replica")


def measure_cold(agent: Agent) -> dict[str, list[float]]:
    client = agent.client
    host = f"{ZERO_APP}.pleaco.internal"
    client.deploy(ZERO_APP, {"image": HELLO, "port": HELLO_PORT, "health": "/healthz"})
    wait_until(lambda: _proxied_ok(agent.proxy_port, host), 90, f"{ZERO_APP} through the proxy")
    ip = replica_ip(agent, ZERO_APP)
    direct = [first_byte(HELLO_PORT, None, "/", address=ip) for _ in range(COLD_ROUNDS)]
    client.autoscale(ZERO_APP, {"min_replicas": 0, "max_replicas": 1, "metric": "concurrency", "target": 10,
                                "scale_to_zero_after": IDLE_AFTER})
    cold = []
    for rnd in range(1, COLD_ROUNDS + 1):
        at_zero(agent)
        cold.append(first_byte(agent.proxy_port, host))
        log(f"autoscale: cold start round {rnd}: first byte after {cold[-1] * 1000:.0f} ms")
    agent.remove_app(ZERO_APP)
    return {"cold": cold, "direct": direct}


def run(opts: argparse.Namespace) -> list[Row]:
    require_image(HELLO)
    require_image(CADDY)
    workdir = Path(tempfile.mkdtemp(prefix="pleaco-bench-autoscale-"))
    config = (f'proxy_image = "{CADDY}"\n[proxy]\nadmin_listen = "{LOOPBACK}:{free_port()}"\n'
              f'https_listen = "{LOOPBACK}:{free_port()}"\nactivator_listen = "{LOOPBACK}:{free_port()}"\n')
    load_interval = getattr(opts, "autoscale_load_interval", None)
    if load_interval is not None:
        config += f"load_interval = {load_interval}\n"
    try:
        with slow_image(), Agent(workdir, "bench-autoscale", config_text=config) as agent:
            slow_start = [container_start(SLOW, "/healthz") for _ in range(START_ROUNDS)]
            hello_start = [container_start(HELLO, "/healthz") for _ in range(START_ROUNDS)]
            log(f"autoscale: docker run to first answer: slow {slow_start}, hello {hello_start}")
            rows, step = measure_scaling(agent)
            cold = measure_cold(agent)
    finally:
        remove_containers([SLOW_LABEL])
        finish_workdir(workdir, "bench-autoscale.log", opts.results_dir, "autoscale-agent.log")
    start = median(slow_start)
    assert start is not None
    reaction: float = step.pop("reaction")
    rows.insert(0, Row(
        benchmark=f"autoscale reaction to a 2x step, {NEEDED} -> {2 * NEEDED} healthy replicas", unit="s",
        pleaco=reaction, baseline=start, baseline_name="docker run to first answer",
        goal=f"<= {PANIC_WINDOW:g} s + start", met=reaction <= PANIC_WINDOW + start,
        details={"minus_start_s": round(reaction - start, 3), "start_samples": [round(x, 3) for x in slow_start],
                 "load_interval_s": load_interval, **step}))
    rows.insert(1, Row(
        benchmark="autoscale reaction to a 2x step, minus the container start", unit="s", pleaco=reaction - start,
        goal=f"<= {PANIC_WINDOW:g} s (panic window)", met=reaction - start <= PANIC_WINDOW))
    rows.insert(2, Row(
        benchmark=f"autoscale overshoot after the step ({2 * NEEDED} needed, {OVERSHOOT_SECONDS:.0f} s more)",
        unit="replicas", pleaco=float(step["max"]), baseline=float(2 * NEEDED), baseline_name="needed"))
    cold_med = median(cold["cold"])
    hello_med = median(hello_start)
    spread = {"min": min(cold["cold"]), "max": max(cold["cold"]),
              "stdev": statistics.pstdev(cold["cold"]), "samples": [round(x, 3) for x in cold["cold"]]}
    rows += [
        Row(benchmark=f"autoscale cold start from zero, {HELLO}, first byte ({COLD_ROUNDS} rounds)", unit="s",
            pleaco=cold_med, baseline=hello_med, baseline_name="docker run to first answer",
            goal=f"< {COLD_GOAL_S:g} s", met=cold_med is not None and cold_med < COLD_GOAL_S,
            details={**spread, "start_samples": [round(x, 3) for x in hello_start]}),
        Row(benchmark="autoscale cold start against a request to a running replica", unit="ms",
            pleaco=None if cold_med is None else cold_med * 1000, baseline=1000 * (median(cold["direct"]) or 0),
            baseline_name="direct, running",
            details={"direct_samples": [round(x, 4) for x in cold["direct"]]}),
    ]
    return rows
