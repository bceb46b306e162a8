"""Scale: how long from issuing "scale to 50" until 50 replicas run, and from "scale to 0"
until no container is left, for pleaco and for Docker Swarm on the same engine.

Both run the same image (pleaco/hello:latest, a busybox httpd on port 8080) with no health
check, both start each measurement from 1 running replica, and both are measured the same
way: the clock starts just before the user's command (``pleaco apps scale`` /
``docker service scale --detach``) and stops when the engine itself shows the goal reached,
polled every 0.2 s:

- pleaco: ``apps show`` (the API) reports ``running == 50`` *and* the engine lists 50
  running containers labelled with this app and agent's node id; for 50 -> 0, the API
  reports 0 running and the engine lists no container of the app at all (any state).
- Swarm: the engine lists 50 running containers of the service *and* the service has 50
  tasks in state running (what ``docker service ls`` shows as 50/50); for 50 -> 0, no
  container of the service is left (any state).

The systems run alternately (pleaco first in rounds 1, 3, ..., Swarm first in 2, 4, ...) so that
noise from other work on the machine hits both alike; the table shows the medians and the
ratio pleaco / Swarm.

Two differences remain and are stated in the README: pleaco publishes each replica's port
on 127.0.0.1 (a docker-proxy and NAT rules per container), Swarm publishes nothing (its only
port modes bind all interfaces, and these benchmarks stay on loopback); that is extra work
for pleaco. And pleaco runs every container with an init process (tini) that forwards
SIGTERM, so the Swarm service gets ``--init`` too (``--swarm-no-init`` to drop it), else
busybox httpd as PID 1 ignores SIGTERM and every Swarm stop waits out the 10 s grace period.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

from benchmarks.common import (
    HELLO,
    HELLO_PORT,
    Agent,
    BenchError,
    Row,
    count_containers,
    docker_cli,
    engine,
    finish_workdir,
    log,
    median,
    remove_containers,
    require_image,
    wait_until,
)
from benchmarks.idle import CLK_TCK, cpu_ticks
from benchmarks.swarm import SwarmMode, remove_service, service_label
from pleaco.api.errors import ApiError

TARGET = 50
APP = "bench"
SERVICE = "pleaco-bench"
SWARM_LABEL = service_label(SERVICE)
SETTLE_S = 2.0  # pause before each measurement, for the engine to finish the previous step's work
PHASE_TIMEOUT = 120.0  # one 1->50 or 50->0 on a busy 2-core machine takes ~10-20 s


class System(Protocol):
    name: str

    def prepare(self) -> None: ...

    def issue(self, n: int) -> None: ...

    def reached(self, n: int) -> bool: ...


# -- pleaco -------------------------------------------------------------------------------------


class Pleaco:
    name = "pleaco"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.deployed = False

    def __enter__(self) -> Pleaco:
        self.agent.cli("apps", "deploy", APP, "--image", HELLO, "--replicas", "1", "--port", str(HELLO_PORT))
        self.deployed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not (self.deployed and self.agent.alive()):
            return  # the agent's own cleanup force-removes whatever is left
        self.agent.remove_app(APP)

    def prepare(self) -> None:
        self.issue(1)
        wait_until(lambda: self.reached(1) and count_containers(self.agent.labels(APP), running_only=False) == 1,
                   PHASE_TIMEOUT, "pleaco to run exactly 1 replica")

    def issue(self, n: int) -> None:
        self.agent.cli("apps", "scale", APP, str(n))

    def reached(self, n: int) -> bool:
        if not self.agent.alive():
            raise BenchError(f"the agent died: {self.agent.log_tail(5)}")
        try:
            app = self.agent.client.app(APP)
        except ApiError:
            return False  # a slow answer under load; the deadline bounds the wait
        if app["running"] != n:
            return False
        labels = self.agent.labels(APP)
        if n == 0:
            return count_containers(labels, running_only=False) == 0
        return count_containers(labels, running_only=True) == n


# -- Docker Swarm ---------------------------------------------------------------------------------


class Swarm:
    """Swarm mode on this engine with one service; puts the engine back as it found it."""

    name = "swarm"

    def __init__(self, init_process: bool = True) -> None:
        self.init_process = init_process
        self.mode = SwarmMode()
        self.created = False

    def __enter__(self) -> Swarm:
        self.mode.__enter__()
        try:
            self.mode.remove_leftover(SERVICE)
            args = ["service", "create", "--detach", "--no-resolve-image", "--name", SERVICE, "--replicas", "1"]
            if self.init_process:
                args.append("--init")
            self.created = True  # before the call: a service half-created is still removed
            docker_cli(*args, HELLO)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.created:
                remove_service(SERVICE)
        finally:
            self.mode.__exit__()
            remove_containers([SWARM_LABEL])

    def prepare(self) -> None:
        self.issue(1)
        wait_until(lambda: self.reached(1) and count_containers([SWARM_LABEL], running_only=False) == 1,
                   PHASE_TIMEOUT, "swarm to run exactly 1 replica")

    def issue(self, n: int) -> None:
        docker_cli("service", "scale", "--detach", f"{SERVICE}={n}")

    def running_tasks(self) -> int:
        tasks = engine().tasks(filters={"service": SERVICE, "desired-state": "running"})
        return sum(1 for t in tasks if (t.get("Status") or {}).get("State") == "running")

    def reached(self, n: int) -> bool:
        if n == 0:
            return count_containers([SWARM_LABEL], running_only=False) == 0 and self.running_tasks() == 0
        return count_containers([SWARM_LABEL], running_only=True) == n and self.running_tasks() == n


# -- measurement ------------------------------------------------------------------------------------


def measure(system: System, n: int) -> dict[str, Any]:
    wall0 = time.time()
    t0 = time.monotonic()
    system.issue(n)
    issued = time.monotonic() - t0
    wait_until(lambda: system.reached(n), PHASE_TIMEOUT, f"{system.name} to reach {n} replicas")
    return {"seconds": time.monotonic() - t0, "issue_s": issued, "wall_start": wall0, "wall_end": time.time()}


def cpu_seconds(pid: int) -> float:
    try:
        return cpu_ticks(pid) / CLK_TCK
    except OSError:  # the process is gone; reached() reports that
        return 0.0


def pleaco_breakdown(
    agent: Agent, m: dict[str, Any], before: dict[str, float], after: dict[str, float]
) -> dict[str, Any]:
    """Where pleaco's time went, from its log lines and its metrics over one measurement."""
    start = m["wall_start"]
    events = agent.events(start, m["wall_end"])
    actions = [ts - start for ts, ev in events if ev in ("replica.started", "replica.removed")]
    passes = "pleaco_reconcile_duration_seconds_count{loop=\"apps\"}"
    pass_time = "pleaco_reconcile_duration_seconds_sum{loop=\"apps\"}"
    return {
        "seconds": round(m["seconds"], 3),
        "actions": len(actions),
        "first_action_s": round(min(actions), 3) if actions else None,
        "last_action_s": round(max(actions), 3) if actions else None,
        "reconcile_passes": int(after.get(passes, 0) - before.get(passes, 0)),
        "reconcile_seconds": round(after.get(pass_time, 0.0) - before.get(pass_time, 0.0), 3),
    }


def run(opts: argparse.Namespace) -> list[Row]:
    require_image(HELLO)
    rounds = max(1, int(opts.rounds))
    samples: dict[str, dict[int, list[float | None]]] = {"pleaco": {TARGET: [], 0: []}, "swarm": {TARGET: [], 0: []}}
    issue: dict[str, dict[int, list[float]]] = {"pleaco": {TARGET: [], 0: []}, "swarm": {TARGET: [], 0: []}}
    breakdowns: dict[int, list[dict[str, Any]]] = {TARGET: [], 0: []}
    errors: list[str] = []
    swarm_at_50 = ""
    workdir = Path(tempfile.mkdtemp(prefix="pleaco-bench-scale-"))
    try:
        with contextlib.ExitStack() as stack:
            # Swarm first, so that its start-up work in the engine is over before any
            # measurement.
            swarm = stack.enter_context(Swarm(init_process=not opts.swarm_no_init))
            agent = stack.enter_context(Agent(workdir, "bench-scale"))
            pleaco = stack.enter_context(Pleaco(agent))
            for r in range(rounds):
                order: list[System] = [pleaco, swarm] if r % 2 == 0 else [swarm, pleaco]
                for system in order:
                    try:
                        system.prepare()
                        for n in (TARGET, 0):
                            time.sleep(SETTLE_S)
                            before = agent.metrics() if system is pleaco else {}
                            cpu_before = cpu_seconds(agent.pid) if system is pleaco else 0.0
                            m = measure(system, n)
                            samples[system.name][n].append(m["seconds"])
                            issue[system.name][n].append(round(m["issue_s"], 3))
                            line = f"round {r + 1}/{rounds}: {system.name} -> {n}: {m['seconds']:.2f} s"
                            if system is pleaco:
                                b = pleaco_breakdown(agent, m, before, agent.metrics())
                                b["agent_cpu_s"] = round(cpu_seconds(agent.pid) - cpu_before, 2)
                                breakdowns[n].append(b)
                                line += (f" (actions {b['first_action_s']}..{b['last_action_s']} s, "
                                         f"{b['reconcile_passes']} passes)")
                            elif n == TARGET:
                                swarm_at_50 = docker_cli("service", "ls", "--filter", f"name={SERVICE}",
                                                         "--format", "{{.Replicas}}").strip()
                            log(line)
                    except BenchError as exc:
                        errors.append(f"round {r + 1} {system.name}: {exc}")
                        log(f"round {r + 1}/{rounds}: {system.name} FAILED: {exc}")
                        for n in (TARGET, 0):
                            if len(samples[system.name][n]) < r + 1:
                                samples[system.name][n].append(None)
    finally:
        finish_workdir(workdir, "bench-scale.log", opts.results_dir, "scale-agent.log")

    rows = []
    for n, label in ((TARGET, f"scale 1->{TARGET}"), (0, f"scale {TARGET}->0")):
        p, s = median(samples["pleaco"][n]), median(samples["swarm"][n])
        row = Row(
            benchmark=label, unit="s", pleaco=p, baseline=s, baseline_name="Swarm",
            goal="<= 1.00x Swarm",
            details={
                "pleaco_s": [None if v is None else round(v, 3) for v in samples["pleaco"][n]],
                "swarm_s": [None if v is None else round(v, 3) for v in samples["swarm"][n]],
                # How long the user's command itself took (included in the times above).
                "pleaco_cli_s": issue["pleaco"][n],
                "swarm_cli_s": issue["swarm"][n],
                "pleaco_breakdown": breakdowns[n],
                "swarm_init": not opts.swarm_no_init,
            },
        )
        row.met = None if row.ratio is None else row.ratio <= 1.0
        if n == TARGET and swarm_at_50:
            row.details["swarm_service_ls_at_50"] = swarm_at_50
        if errors:
            row.details["errors"] = errors
        rows.append(row)
    return rows
