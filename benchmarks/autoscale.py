"""Autoscale (issue 11): how the autoscaler reacts to a load step, whether it flaps under a
noisy constant load, and how long a request to an app at zero replicas waits.

One agent with its proxy (pleaco/caddy) and activator on 127.0.0.1, the agent's defaults
([autoscale] interval 1 s, report_settle 0.2 s; [proxy] load_interval 2 s, autoscale_load_interval
1 s) and the policy's default windows (60 s stable, 6 s panic, panic at 2x, 10 % tolerance).
Load is open loop (a request starts every 1/rate s whatever the answers do) through the
proxy, from this process.

Rounds (``--autoscale-steps``, default 2), each:

- **flaps**: app ``autoscale-bench`` (a busybox httpd whose CGI ``/cgi-bin/slow`` answers
  after 1 s) at 2 replicas, policy concurrency, target 2 per replica, min 1, max 8. At
  4 requests/s of 1 s each, 4 are in flight: exactly 2 replicas' worth. The rate is redrawn
  every second uniformly within +-20 % (3.2..4.8/s) for ``ROUND_SECONDS``; the desired count
  is read every 0.5 s and every change of direction (up after down or down after up) is a
  flap, extrapolated to an hour over all rounds. Any change at all is reported too.
- **reaction to a 2x step**: straight after, the rate goes to 8/s (8 in flight: 4 replicas).
  Per step: the **decision latency**, from the step until the decision that writes 4 (its
  record's time); **start to healthy**, from that decision until the API reports 4 healthy
  replicas (polled every 0.2 s); and the **total**, step to 4 healthy. Then the load goes on
  for ``OVERSHOOT_SECONDS`` more and the highest count reached is the overshoot against
  the 4 needed. Baseline, measured at the start of each round: the container start, from
  ``docker run -d`` of the same image until its first answer on its bridge address (polled
  every 0.05 s), median of ``START_ROUNDS``. Goal, for every step (the rows show the max):
  decision within the panic window (6 s, Knative's), total within 6 s plus that round's
  container start.
- between rounds: autoscaling off (its decision record and the owner's samples go with it),
  2 replicas by hand, the steady load back in the figures, the policy on again.
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
from dataclasses import dataclass
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
OVERSHOOT_SECONDS = 15.0
START_ROUNDS = 3
COLD_ROUNDS = 5
IDLE_AFTER = 3.0
COLD_GOAL_S = 1.0
PANIC_WINDOW = 6.0  # the policy's default
# Seconds of noisy steady load in each round before its step: the stable window (60 s) full.
ROUND_SECONDS = 60.0
POLICY = {"min_replicas": 1, "max_replicas": 8, "metric": "concurrency", "target": TARGET}


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
        # By name: the slow image's label is on the app's replicas too (measured between rounds).
        docker_cli("rm", "-f", name, check=False)


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


@dataclass
class Step:
    """One 2x step's reaction, each time in seconds from the step."""

    start: float  # the container start measured just before this round (docker run to first answer)
    decided: float | None  # the decision that wrote the needed count (None: none did)
    healthy: float  # the API reports the needed count healthy
    figure: float | None  # the app's figure first shows 90 % of the new load
    highest: int  # the highest count in the OVERSHOOT_SECONDS after
    decisions: list[dict[str, Any]]  # the decision records written after the step

    @property
    def to_healthy(self) -> float | None:
        """From the decision to healthy: pleaco's start of the new replicas."""
        return None if self.decided is None else self.healthy - self.decided

    @property
    def met(self) -> bool:
        return self.decided is not None and self.decided <= PANIC_WINDOW and self.healthy <= PANIC_WINDOW + self.start

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)

        return {"container_start_s": r(self.start), "decision_s": r(self.decided), "to_healthy_s": r(self.to_healthy),
                "total_s": r(self.healthy), "figure_s": r(self.figure), "highest": self.highest, "met": self.met,
                "decisions": self.decisions}


def _reset(agent: Agent) -> None:
    """Back to the start of a round: autoscaling off (its decision record and the owner's
    sample window go with it: no state carries into the next round), 2 replicas by hand."""
    client = agent.client
    client.autoscale_off(APP)
    client.scale(APP, NEEDED)
    off = time.monotonic()
    wait_until(lambda: client.app(APP)["healthy"] == NEEDED and len(client.app(APP)["instances"]) == NEEDED, 90,
               f"{APP} back at {NEEDED} replicas")
    # The autoscaler drops an app's samples on its first tick without the policy ([autoscale]
    # interval, 1 s): two ticks, so the next round's windows start empty.
    wait_until(lambda: time.monotonic() - off >= 2.0, 5, "two autoscaler ticks")


def _steady(client: Any) -> bool:
    """Whether the app's figure has shown the steady load (within the noise) for 3 s."""
    until = time.monotonic() + 3.0
    while time.monotonic() < until:
        if abs((client.app(APP).get("load") or {}).get("concurrency", 0) - STEADY_RATE) > NOISE * STEADY_RATE:
            return False
        time.sleep(0.5)
    return True


def _step(agent: Agent, rate: dict[str, float], start: float) -> Step:
    """The 2x step from the steady load, until the needed count is healthy and
    OVERSHOOT_SECONDS after."""
    client = agent.client
    needed = 2 * NEEDED
    before = client.app(APP)
    log(f"autoscale: step to {2 * STEADY_RATE:g} requests/s from {before['replicas']} replicas")
    rate["value"] = 2 * STEADY_RATE
    step, step_wall = time.monotonic(), time.time()
    seen_max = int(before["replicas"])
    figure_after: float | None = None

    def enough() -> bool:
        nonlocal seen_max, figure_after
        app = client.app(APP)
        seen_max = max(seen_max, int(app["replicas"]))
        shown = float((app.get("load") or {}).get("concurrency", 0))
        if figure_after is None and shown >= 0.9 * 2 * STEADY_RATE:
            figure_after = time.monotonic() - step
        return int(app["healthy"]) >= needed

    wait_until(enough, 150, f"{needed} healthy replicas after the step")
    healthy = time.monotonic() - step
    until = time.monotonic() + OVERSHOOT_SECONDS
    while time.monotonic() < until:
        seen_max = max(seen_max, int(client.app(APP)["replicas"]))
        time.sleep(0.5)
    history = client.app(APP)["autoscaler"]["decisions"]
    after = [{**d, "after_step_s": round(d["at_ms"] / 1000 - step_wall, 3)} for d in history
             if d["at_ms"] / 1000 >= step_wall]
    decided = next((d["after_step_s"] for d in after if d["to"] >= needed), None)
    result = Step(start, decided, healthy, figure_after, seen_max, after)
    log(f"autoscale: figure at +{figure_after} s, decided {needed} at +{decided} s, {needed} healthy at "
        f"+{healthy:.2f} s (container start {start:.2f} s), highest {seen_max}; "
        f"decisions {[(d['after_step_s'], d['from'], d['to']) for d in after]}")
    return result


def measure_scaling(agent: Agent, steps: int) -> tuple[list[Row], dict[str, Any]]:
    client = agent.client
    host = f"{APP}.pleaco.internal"
    client.deploy(APP, {"image": SLOW, "port": HELLO_PORT, "health": "/healthz"})
    client.scale(APP, NEEDED)
    wait_until(lambda: client.app(APP)["healthy"] == NEEDED, 90, f"{NEEDED} healthy replicas of {APP}")
    wait_until(lambda: _proxied_ok(agent.proxy_port, host), 60, f"{APP} through the proxy")

    rate = {"value": STEADY_RATE}
    rng = random.Random(11)
    url = f"http://{LOOPBACK}:{agent.proxy_port}/cgi-bin/slow"
    counts: list[list[int]] = []
    results: list[Step] = []
    total = steps * (ROUND_SECONDS + 150 + OVERSHOOT_SECONDS + 100)
    with Load(url, host, lambda: rate["value"], max_seconds=total) as load:
        for rnd in range(1, steps + 1):
            rate["value"] = STEADY_RATE
            if rnd > 1:
                _reset(agent)
            start = median([container_start(SLOW, "/healthz") for _ in range(START_ROUNDS)])
            assert start is not None
            # The policy only once the load shows: its first samples would otherwise be an
            # idle app's (or the last step's), and it would change the count before the
            # steady load is in its windows.
            wait_until(lambda: _steady(client), 90, "the steady load in the app's figures")
            client.autoscale(APP, POLICY)
            log(f"autoscale: round {rnd}/{steps}: {ROUND_SECONDS:.0f} s at {STEADY_RATE:g} requests/s "
                f"+-{NOISE:.0%} ({NEEDED} replicas' worth)")
            t0 = time.monotonic()
            next_draw = t0
            counts.append([])
            while (now := time.monotonic()) - t0 < ROUND_SECONDS:
                if now >= next_draw:
                    rate["value"] = STEADY_RATE * rng.uniform(1 - NOISE, 1 + NOISE)
                    next_draw += 1.0
                counts[-1].append(int(client.app(APP)["replicas"]))
                time.sleep(0.5)
            changes, reversals = flaps(counts[-1])
            log(f"autoscale: round {rnd}: flaps {reversals}, count changes {changes}, counts {sorted(set(counts[-1]))}")
            results.append(_step(agent, rate, start))
        load.stop()
    changes = sum(flaps(c)[0] for c in counts)
    reversals = sum(flaps(c)[1] for c in counts)
    observed = steps * ROUND_SECONDS
    details: dict[str, Any] = {"flap_counts": counts, "requests_ok": load.ok, "requests_failed": len(load.failures),
                               "failures": load.failures[:5]}
    if load.failures:
        details["errors"] = [f"{len(load.failures)} requests failed under the autoscaled load: {load.failures[:3]}"]
    agent.remove_app(APP)
    return [
        Row(benchmark=f"autoscale flaps, {observed:.0f} s at {NEEDED} replicas' load +-{NOISE:.0%}",
            unit="per hour", pleaco=reversals * 3600 / observed, goal="0", met=reversals == 0,
            details={"direction_changes": reversals, "count_changes": changes, "observed_s": observed}),
    ], {"steps": results, **details}


def step_rows(steps: list[Step], load_interval: float | None, details: dict[str, Any]) -> list[Row]:
    """The reaction rows: per measure the max over the steps (the goal is for every step),
    with min and median in the details."""
    needed = 2 * NEEDED

    def spread(values: list[float | None]) -> dict[str, Any]:
        got = [v for v in values if v is not None]
        return {"min": round(min(got), 3), "median": round(statistics.median(got), 3), "max": round(max(got), 3),
                "samples": [None if v is None else round(v, 3) for v in values]} if got else {"samples": values}

    decided = [s.decided for s in steps]
    worst_decision = None if None in decided else max(d for d in decided if d is not None)
    total = [s.healthy for s in steps]
    starts = [s.start for s in steps]
    n = len(steps)
    return [
        Row(benchmark=f"autoscale 2x step, decision latency (step -> {needed} written), max of {n}", unit="s",
            pleaco=worst_decision, goal=f"<= {PANIC_WINDOW:g} s (panic window)",
            met=worst_decision is not None and worst_decision <= PANIC_WINDOW,
            details={**spread(decided), "autoscale_load_interval_s": load_interval,
                     "figure_s": spread([s.figure for s in steps])}),
        Row(benchmark=f"autoscale 2x step, decision to {needed} healthy, max of {n}", unit="s",
            pleaco=max((s.to_healthy for s in steps if s.to_healthy is not None), default=None),
            baseline=max(starts), baseline_name="docker run to first answer (max)",
            details={**spread([s.to_healthy for s in steps]), "container_start_s": spread(list(starts))}),
        Row(benchmark=f"autoscale 2x step, total (step -> {needed} healthy), max of {n}", unit="s",
            pleaco=max(total), baseline=statistics.median(starts), baseline_name="docker run to first answer",
            goal=f"each <= {PANIC_WINDOW:g} s + that run's start", met=all(s.met for s in steps),
            details={**spread(list(total)), "met_steps": sum(s.met for s in steps),
                     "steps": [s.to_json() for s in steps], **details}),
        Row(benchmark=f"autoscale overshoot after the step ({needed} needed, {OVERSHOOT_SECONDS:.0f} s more), "
                      f"max of {n}", unit="replicas", pleaco=float(max(s.highest for s in steps)),
            baseline=float(needed), baseline_name="needed",
            details={"highest": [s.highest for s in steps]}),
    ]


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
        config += f"autoscale_load_interval = {load_interval}\n"
    try:
        with slow_image(), Agent(workdir, "bench-autoscale", config_text=config) as agent:
            hello_start = [container_start(HELLO, "/healthz") for _ in range(START_ROUNDS)]
            rows, step = measure_scaling(agent, getattr(opts, "autoscale_steps", 2))
            cold = measure_cold(agent)
    finally:
        remove_containers([SLOW_LABEL])
        finish_workdir(workdir, "bench-autoscale.log", opts.results_dir, "autoscale-agent.log")
    steps: list[Step] = step.pop("steps")
    rows = step_rows(steps, load_interval, step) + rows
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
