"""Stack deploy: how long from ``pleaco stack deploy`` of a three-service compose file until
every replica runs and is healthy, against ``docker stack deploy`` of the same file on a
one-node Swarm on the same engine (the issue's "three-service stack to all healthy").

The file (COMPOSE below) is one both take: plain Compose keys, and ``x-pleaco`` for the
one thing pleaco reads that Compose has no key for (the app's host name; Swarm ignores
``x-`` keys). Its services, on the offline images:

- ``web``: pleaco/hello, 2 replicas, a health check (``wget`` of /healthz on its port);
- ``api``: pleaco/hello, 1 replica, no health check;
- ``store``: pleaco/busybox's httpd serving a named volume (``data``), 1 replica.

No ``depends_on``: Swarm ignores it, and pleaco would deploy in waves (each waits for the
one before to be healthy), so the two would not do the same work.

Swarm is given one more file on top (SWARM_TIMING), with only the health check's interval
(1 s): without timings pleaco maps the ``wget`` check onto its own HTTP probe (on the app
loop's passes, [reconcile]; with timings it would be a command the engine runs, as
Swarm's is), and without it Docker 20.10's default interval of 30 s would put
Swarm's first probe 30 s after each start, which would measure a default, not the work.

Measured alike: the clock starts just before the user's command and stops when the
engine shows the stack's 4 containers running and the system says every replica is up:

- pleaco: ``GET /v1/stacks/NAME``: every service ``running == healthy == replicas``
  (web's replicas passed their probe), and 4 running containers of the stack's apps;
- Swarm: every service has as many tasks in state ``running`` as replicas (a task of a
  service with a health check is ``starting`` until its container is healthy), and 4
  running containers of the stack.

Rounds alternate (pleaco first in rounds 1, 3, ..., Swarm first in 2, 4, ...); each round
deploys a stack of a new name onto nothing and removes it afterwards (with its volume),
so no round finds the previous one's containers, networks or volumes. Differences that
remain: pleaco (the network off, as for every benchmark agent) publishes each replica's
port on 127.0.0.1, and Swarm creates the stack's overlay network (``STACK_default``) as
part of its deploy; both are what each system's command does.
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
from benchmarks.swarm import SwarmMode
from pleaco.api.errors import ApiError

BUSYBOX = "pleaco/busybox:latest"
STACK = "sbench"  # a round's stack is STACK + its round number: pleaco apps sbench1-web, ...
REPLICAS = {"web": 2, "api": 1, "store": 1}
CONTAINERS = sum(REPLICAS.values())
SETTLE_S = 2.0  # pause before each measurement, for the engine to finish the previous step's work
PHASE_TIMEOUT = 180.0  # one deploy on a busy 2-core machine takes seconds; a stuck one fails the round
SWARM_STACK_LABEL = "com.docker.stack.namespace"

COMPOSE = f"""\
version: "3.8"
services:
  web:
    image: {HELLO}
    expose: [8080]
    healthcheck:
      test: ["CMD", "wget", "-q", "-O-", "http://localhost:8080/healthz"]
    deploy:
      replicas: {REPLICAS["web"]}
    x-pleaco: {{host: web.bench.test}}
  api:
    image: {HELLO}
    expose: [8080]
    environment: {{GREETING: api}}
    deploy:
      replicas: {REPLICAS["api"]}
  store:
    image: {BUSYBOX}
    command: ["httpd", "-f", "-p", "7000", "-h", "/data"]
    expose: [7000]
    volumes: ["data:/data"]
    deploy:
      replicas: {REPLICAS["store"]}
volumes:
  data:
"""

# Swarm only, on top of COMPOSE (see the module doc): the health check's interval (docker
# stack deploy merges it into COMPOSE's check; a test given again would be appended to it).
SWARM_TIMING = """\
version: "3.8"
services:
  web:
    healthcheck:
      interval: 1s
"""


class System(Protocol):
    name: str

    def deploy(self, stack: str) -> None: ...

    def ready(self, stack: str) -> bool: ...

    def remove(self, stack: str) -> None: ...


# -- pleaco -----------------------------------------------------------------------------------------


class Pleaco:
    name = "pleaco"

    def __init__(self, agent: Agent, compose: Path) -> None:
        self.agent = agent
        self.compose = compose

    def deploy(self, stack: str) -> None:
        self.agent.cli("stack", "deploy", stack, "-f", str(self.compose))

    def ready(self, stack: str) -> bool:
        if not self.agent.alive():
            raise BenchError(f"the agent died: {self.agent.log_tail(5)}")
        try:
            shown = self.agent.client.request("GET", f"/v1/stacks/{stack}")
        except ApiError:
            return False  # a slow answer under load; the deadline bounds the wait
        services = {s["service"]: s for s in shown["services"]}
        if set(services) != set(REPLICAS):
            return False
        if not all(int(s["running"]) == int(s["healthy"]) == REPLICAS[name] for name, s in services.items()):
            return False
        labels = [f"pleaco.node={self.agent.node_id}", "pleaco.app"]
        running = engine().containers(filters={"label": labels, "status": "running"})
        return sum(1 for c in running if c["Labels"].get("pleaco.app", "").startswith(f"{stack}-")) == CONTAINERS

    def remove(self, stack: str) -> None:
        """``stack rm``, wait for its containers to go, then its volume (no app mounts it
        any more: ``volumes rm``)."""
        self.agent.cli("stack", "rm", stack)
        apps = [f"{stack}-{service}" for service in REPLICAS]
        wait_until(lambda: all(count_containers(self.agent.labels(a), running_only=False) == 0 for a in apps),
                   PHASE_TIMEOUT, f"pleaco to remove stack {stack}'s containers", interval=0.5)
        self.agent.cli("volumes", "rm", f"{stack}-store", "data")
        wait_until(lambda: not docker_cli("volume", "ls", "-q", "--filter", f"label=pleaco.app={stack}-store"),
                   PHASE_TIMEOUT, f"pleaco to remove stack {stack}'s volume", interval=0.5)


# -- Docker Swarm -------------------------------------------------------------------------------------


class Swarm:
    name = "swarm"

    def __init__(self, compose: Path, timing: Path) -> None:
        self.compose = compose
        self.timing = timing

    def deploy(self, stack: str) -> None:
        docker_cli("stack", "deploy", "--detach=true", "-c", str(self.compose), "-c", str(self.timing), stack)

    def ready(self, stack: str) -> bool:
        for service, replicas in REPLICAS.items():
            tasks = engine().tasks(filters={"service": f"{stack}_{service}", "desired-state": "running"})
            if sum(1 for t in tasks if (t.get("Status") or {}).get("State") == "running") != replicas:
                return False
        return count_containers([f"{SWARM_STACK_LABEL}={stack}"], running_only=True) == CONTAINERS

    def remove(self, stack: str) -> None:
        """``docker stack rm``, wait for its containers (busybox httpd, PID 1 without an
        init, ignores SIGTERM: each waits out Swarm's 10 s grace), its network, then its
        volume."""
        docker_cli("stack", "rm", stack, check=False)
        label = f"{SWARM_STACK_LABEL}={stack}"
        wait_until(lambda: count_containers([label], running_only=False) == 0,
                   PHASE_TIMEOUT, f"swarm to remove stack {stack}'s containers", interval=0.5)
        wait_until(lambda: not docker_cli("network", "ls", "-q", "--filter", f"label={label}").strip(),
                   PHASE_TIMEOUT, f"swarm to remove stack {stack}'s network", interval=0.5)
        docker_cli("volume", "rm", f"{stack}_data", check=False)


def cleanup_swarm(stack: str) -> None:
    """What a failed round may leave of a Swarm stack, forced."""
    with contextlib.suppress(BenchError):
        Swarm(Path(), Path()).remove(stack)
    remove_containers([f"{SWARM_STACK_LABEL}={stack}"])
    docker_cli("volume", "rm", "-f", f"{stack}_data", check=False)


# -- measurement ---------------------------------------------------------------------------------------


def measure(system: System, stack: str) -> dict[str, Any]:
    t0 = time.monotonic()
    system.deploy(stack)
    issued = time.monotonic() - t0
    wait_until(lambda: system.ready(stack), PHASE_TIMEOUT, f"{system.name} to run stack {stack}, all healthy")
    return {"seconds": time.monotonic() - t0, "issue_s": issued}


def run(opts: argparse.Namespace) -> list[Row]:
    for image in (HELLO, BUSYBOX):
        require_image(image)
    rounds = max(1, int(opts.rounds))
    samples: dict[str, list[float | None]] = {"pleaco": [], "swarm": []}
    issue: dict[str, list[float]] = {"pleaco": [], "swarm": []}
    errors: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="pleaco-bench-stack-"))
    compose, timing = workdir / "compose.yaml", workdir / "swarm-timing.yaml"
    compose.write_text(COMPOSE)
    timing.write_text(SWARM_TIMING)
    try:
        with contextlib.ExitStack() as stack:
            # Swarm first, so that its start-up work in the engine is over before any
            # measurement.
            stack.enter_context(SwarmMode())
            agent = stack.enter_context(Agent(workdir, "bench-stack"))
            systems: dict[str, System] = {"pleaco": Pleaco(agent, compose), "swarm": Swarm(compose, timing)}
            for r in range(rounds):
                name = f"{STACK}{r + 1}"
                order = ["pleaco", "swarm"] if r % 2 == 0 else ["swarm", "pleaco"]
                for which in order:
                    system = systems[which]
                    time.sleep(SETTLE_S)
                    try:
                        m = measure(system, name)
                        samples[which].append(m["seconds"])
                        issue[which].append(round(m["issue_s"], 3))
                        log(f"round {r + 1}/{rounds}: {which}: {m['seconds']:.2f} s "
                            f"(the command itself {m['issue_s']:.2f} s)")
                    except BenchError as exc:
                        samples[which].append(None)
                        errors.append(f"round {r + 1} {which}: {exc}")
                        log(f"round {r + 1}/{rounds}: {which} FAILED: {exc}")
                    finally:
                        try:
                            system.remove(name)
                        except BenchError as exc:
                            log(f"round {r + 1}/{rounds}: {which}: clean removal failed ({exc}); forcing")
                            if which == "swarm":
                                cleanup_swarm(name)
                            # pleaco's: the agent's own cleanup force-removes its containers
    finally:
        finish_workdir(workdir, "bench-stack.log", opts.results_dir, "stack-agent.log")
        # The pleaco store volumes of stacks a failed round left (the agent is gone now).
        for r in range(rounds):
            docker_cli("volume", "rm", "-f", *docker_cli(
                "volume", "ls", "-q", "--filter", f"label=pleaco.app={STACK}{r + 1}-store").split(), check=False)

    p, s = median(samples["pleaco"]), median(samples["swarm"])
    details: dict[str, Any] = {
        "pleaco_s": [None if v is None else round(v, 3) for v in samples["pleaco"]],
        "swarm_s": [None if v is None else round(v, 3) for v in samples["swarm"]],
        # How long the user's command itself took (included in the times above).
        "pleaco_cli_s": issue["pleaco"],
        "swarm_cli_s": issue["swarm"],
        "services": REPLICAS,
        "swarm_health_interval_s": 1,
    }
    if errors:
        details["errors"] = errors
    return [Row(benchmark=f"stack deploy, {len(REPLICAS)} services to all healthy", unit="s", pleaco=p,
                baseline=s, baseline_name="Swarm", goal="<= 1.00x Swarm",
                met=None if p is None or s is None else p <= s, details=details)]
