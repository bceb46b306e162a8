"""Idle agent: what a pleaco agent costs the machine when nothing happens.

Two agents, one after the other, each a fresh process on its own data dir:

- "no apps": started, then left alone;
- "1 app x3": started, then given one app (pleaco/hello:latest, 3 replicas, port 8080,
  health check /healthz, so the idle loop also probes health as it does in real use), and
  measured once all 3 replicas are healthy.

After a settling time (5 s) the agent's process is sampled for ``--idle-seconds`` (default
20): resident memory (VmRSS in /proc/PID/status) every second, the highest reported, and CPU
as the growth of utime + stime (/proc/PID/stat, all threads) over the window divided by the
wall time: 100 % is one core busy. The containers' own cost is not counted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    HELLO,
    HELLO_PORT,
    Agent,
    BenchError,
    Row,
    count_containers,
    log,
    require_image,
    wait_until,
)

SETTLE_S = 5.0
APP = "idle"
REPLICAS = 3
RSS_GOAL_MB = 80.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    # Fields after the command name (which may hold spaces) in parentheses; utime and
    # stime are fields 14 and 15 of the whole line, so 12th and 13th after ")".
    rest = data[data.rindex(")") + 2:].split()
    return int(rest[11]) + int(rest[12])


def sample(agent: Agent, seconds: float) -> dict[str, Any]:
    pid = agent.pid
    rss: list[int] = []
    t0, c0 = time.monotonic(), cpu_ticks(pid)
    end = t0 + seconds
    while True:
        if not agent.alive():
            raise BenchError(f"agent {agent.name} died while idle: {agent.log_tail(5)}")
        rss.append(rss_kb(pid))
        now = time.monotonic()
        if now >= end:
            break
        time.sleep(min(1.0, end - now))
    t1, c1 = time.monotonic(), cpu_ticks(pid)
    return {
        "rss_mb_max": max(rss) / 1024,
        "rss_mb_min": min(rss) / 1024,
        "rss_mb_mean": sum(rss) / len(rss) / 1024,
        "cpu_pct": (c1 - c0) / CLK_TCK / (t1 - t0) * 100,
        "window_s": t1 - t0,
        "samples": len(rss),
    }


def measure(workdir: Path, name: str, with_app: bool, seconds: float) -> dict[str, Any]:
    with Agent(workdir, name) as agent:
        if with_app:
            agent.cli("apps", "deploy", APP, "--image", HELLO, "--replicas", str(REPLICAS),
                      "--port", str(HELLO_PORT), "--health", "/healthz")

            def healthy() -> bool:
                app = agent.client.app(APP)
                return bool(app["healthy"] == REPLICAS
                            and count_containers(agent.labels(APP), running_only=True) == REPLICAS)

            wait_until(healthy, 60, f"{REPLICAS} healthy replicas", interval=0.5)
        time.sleep(SETTLE_S)
        result = sample(agent, seconds)
        if with_app:
            app = agent.client.app(APP)
            if app["healthy"] != REPLICAS:
                raise BenchError(f"only {app['healthy']} of {REPLICAS} replicas healthy after the window")
            agent.remove_app(APP, timeout=30)
        return result


def run(opts: argparse.Namespace) -> list[Row]:
    seconds = float(opts.idle_seconds)
    workdir = Path(tempfile.mkdtemp(prefix="pleaco-bench-idle-"))
    rows: list[Row] = []
    try:
        scenarios = [("no apps", "bench-idle", False), (f"1 app x{REPLICAS}", "bench-idle-app", True)]
        for label, name, with_app in scenarios:
            if with_app:
                require_image(HELLO)
            log(f"idle ({label}): settling {SETTLE_S:.0f} s, then sampling {seconds:.0f} s")
            try:
                m = measure(workdir, name, with_app, seconds)
            except BenchError as exc:
                log(f"idle ({label}) FAILED: {exc}")
                rows.append(Row(benchmark=f"idle RSS, {label}", unit="MB", pleaco=None,
                                goal=f"< {RSS_GOAL_MB:.0f} MB", details={"error": str(exc)}))
                rows.append(Row(benchmark=f"idle CPU, {label}", unit="%", pleaco=None, details={"error": str(exc)}))
                continue
            log(f"idle ({label}): RSS {m['rss_mb_max']:.1f} MB, CPU {m['cpu_pct']:.2f} %")
            details = {k: round(v, 3) if isinstance(v, float) else v for k, v in m.items()}
            rows.append(Row(
                benchmark=f"idle RSS, {label}", unit="MB", pleaco=m["rss_mb_max"],
                goal=f"< {RSS_GOAL_MB:.0f} MB", met=m["rss_mb_max"] < RSS_GOAL_MB, details=details,
            ))
            rows.append(Row(benchmark=f"idle CPU, {label}", unit="%", pleaco=m["cpu_pct"], details=details))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows
