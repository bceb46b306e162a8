"""Proxy: what pleaco's reverse proxy costs, measured with wrk against the same replica
straight on its published port and through the proxy, in the same run.

One agent with the proxy (pleaco/caddy:latest, Debian's Caddy 2.6) on 127.0.0.1, one app
(pleaco/hello:latest, 1 replica, health check /healthz). Then ``wrk`` alternates between the
two targets, ``--rounds`` times each (direct first in odd rounds, proxy first in even ones,
so other load on the machine hits both alike):

- direct: ``wrk http://<container address>:8080/`` (the container's own port on the Docker
  bridge, which is also what the proxy dials: no docker-proxy on either path)
- proxy:  ``wrk -H "Host: proxy-bench.pleaco.internal" http://127.0.0.1:<proxy port>/``

Each run is ``wrk -t2 -c16 -d8s --latency`` (2 threads for 2 cores, 16 connections: enough to
keep one busybox httpd busy without queueing most of the time). The table shows the median
requests/s of each and the ratio (goal: the proxy at 80 % of direct or better), and p50 and
p99 latency (goal: at most 1 ms added at p50). The proxy runs as configured by default,
access-log metrics included, so their cost is part of the figure.

busybox httpd closes the connection after every response: direct, wrk opens a TCP
connection per request; through the proxy, wrk keeps its connections to Caddy and Caddy
opens one to the replica per request. Every load stays on this host (loopback and the
Docker bridge).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from benchmarks.common import (
    HELLO,
    HELLO_PORT,
    LOOPBACK,
    Agent,
    BenchError,
    Row,
    engine,
    free_port,
    log,
    median,
    require_image,
    wait_until,
)

CADDY = "pleaco/caddy:latest"
APP = "proxy-bench"
HOST = f"{APP}.pleaco.internal"
WRK_ARGS = ["-t2", "-c16", "-d8s", "--latency"]
THROUGHPUT_GOAL = 0.80
P50_GOAL_MS = 1.0

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(out: str) -> dict[str, float]:
    """Requests/s, p50 and p99 (ms) and errors from wrk's --latency output."""
    result: dict[str, float] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise BenchError(f"wrk printed no Requests/sec: {out[-300:]}")
    result["rps"] = float(m.group(1))
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            raise BenchError(f"wrk printed no {pct}% latency: {out[-300:]}")
        result[f"p{pct}_ms"] = float(m.group(1)) * _UNITS[m.group(2)]
    m = re.search(r"(\d+) requests in", out)
    result["requests"] = float(m.group(1)) if m else 0.0
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
    result["errors"] = float(errors)
    return result


def wrk(url: str, host: str | None = None) -> dict[str, float]:
    cmd = ["wrk", *WRK_ARGS, *(["-H", f"Host: {host}"] if host else []), url]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise BenchError("wrk did not finish within 60 s") from None
    if proc.returncode != 0:
        raise BenchError(f"wrk failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return parse_wrk(proc.stdout)


def get(url: str, host: str) -> str:
    req = urllib.request.Request(url, headers={"Host": host})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return str(resp.read().decode())


def run(opts: argparse.Namespace) -> list[Row]:
    if shutil.which("wrk") is None:
        raise BenchError("wrk is not installed (apt-get install wrk; make bench does it)")
    require_image(HELLO)
    require_image(CADDY)
    workdir = Path(tempfile.mkdtemp(prefix="pleaco-bench-proxy-"))
    config = (f'proxy_image = "{CADDY}"\n[proxy]\nadmin_listen = "{LOOPBACK}:{free_port()}"\n'
              f'https_listen = "{LOOPBACK}:{free_port()}"\n')
    runs: dict[str, list[dict[str, float]]] = {"direct": [], "proxy": []}
    try:
        with Agent(workdir, "bench-proxy", config_text=config) as agent:
            agent.cli("apps", "deploy", APP, "--image", HELLO, "--port", str(HELLO_PORT), "--health", "/healthz")
            app = wait_until(lambda: (a := agent.client.app(APP))["healthy"] == 1 and a, 60, "a healthy replica")
            info = engine().inspect_container(app["instances"][0]["container"])
            ip = next(n["IPAddress"] for n in info["NetworkSettings"]["Networks"].values() if n["IPAddress"])
            # Straight to the container's port, as the proxy dials it (not through docker-proxy).
            direct = f"http://{ip}:{HELLO_PORT}/"
            proxied = f"http://{LOOPBACK}:{agent.proxy_port}/"

            def routed() -> bool:
                try:
                    return get(proxied, HOST).startswith("hello from ")
                except OSError:
                    return False

            wait_until(routed, 60, "the app through the proxy")
            for rnd in range(1, opts.rounds + 1):
                order = ["direct", "proxy"] if rnd % 2 else ["proxy", "direct"]
                for target in order:
                    r = wrk(direct) if target == "direct" else wrk(proxied, HOST)
                    log(f"proxy round {rnd} {target}: {r['rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
                        f"p99 {r['p99_ms']:.2f} ms, {r['errors']:.0f} errors")
                    runs[target].append(r)
            agent.cli("apps", "rm", APP)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def med(target: str, key: str) -> float:
        value = median(r[key] for r in runs[target])
        assert value is not None
        return value

    details: dict[str, Any] = {"runs": runs, "wrk": WRK_ARGS}
    errors = sum(r["errors"] for rs in runs.values() for r in rs)
    if errors:
        details["errors"] = [f"wrk saw {errors:.0f} failed requests"]
    rps_ratio = med("proxy", "rps") / med("direct", "rps")
    added_p50 = med("proxy", "p50_ms") - med("direct", "p50_ms")
    return [
        Row(benchmark="proxy throughput", unit="req/s", pleaco=med("proxy", "rps"), baseline=med("direct", "rps"),
            baseline_name="direct", goal=f">= {THROUGHPUT_GOAL:.2f}x direct", met=rps_ratio >= THROUGHPUT_GOAL,
            details=details),
        Row(benchmark="proxy p50 latency", unit="ms", pleaco=med("proxy", "p50_ms"),
            baseline=med("direct", "p50_ms"), baseline_name="direct", goal=f"<= +{P50_GOAL_MS:g} ms",
            met=added_p50 <= P50_GOAL_MS, details={"added_ms": round(added_p50, 3)}),
        Row(benchmark="proxy p99 latency", unit="ms", pleaco=med("proxy", "p99_ms"),
            baseline=med("direct", "p99_ms"), baseline_name="direct"),
    ]
