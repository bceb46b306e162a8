"""Rollout under load: a new release of a 2-replica app while clients keep asking, pleaco
against ``docker service update`` on a one-node Swarm, with the same load and the same app.

The app is the keep-alive app (common.KEEPALIVE: Go's HTTP server via ``caddy respond``),
answering "hello from HOST (GREETING)"; a release changes only GREETING (v1, v2, ...).

- pleaco: the app deployed with ``--replicas 2 --health /healthz --env GREETING=v1``, reached
  through the agent's proxy (``Host: rollout-bench.pleaco.internal``, 127.0.0.1). A rollout is
  ``pleaco apps deploy`` of the same spec with the next GREETING.
- Swarm: ``docker service create --replicas 2 --init --env GREETING=v1`` with a health check
  as close to pleaco's as Swarm has (``GET /healthz`` every 1 s, 3 failures), rolled with
  ``docker service update --env-add GREETING=vN --update-order start-first`` (what pleaco
  does), and once per round also ``--update-order stop-first`` (Swarm's default), for the
  record.

How clients reach the Swarm service: through the routing mesh when it works. It does not on
this machine: the kernel has no IPVS (``modprobe ip_vs`` is missing; dockerd logs "Could not
get ipvs family information from the kernel ... Native loadbalancing will not work"), and
both the ingress mesh and service VIPs depend on it (a published port accepts nothing).
``--publish mode=host`` cannot serve two replicas on one node either (one port, two tasks).
So (``SWARM_FRONT = "caddy"``) the service runs with ``--endpoint-mode dnsrr`` on an attachable
overlay network, and a front container of the same Caddy binary as pleaco's proxy
(pleaco/caddy) sits on that network, published on 127.0.0.1 only, and proxies to Swarm's own
service discovery: DNS A records ``tasks.SERVICE`` from Docker's embedded DNS, refreshed every
1 s (pleaco's proxy refreshes its upstreams from the agent's DNS every 1 s too), with pleaco's
load-balancing settings (least_conn, retry a refused connection on another upstream for up to
5 s, passive health: skip an upstream for 2 s after one failure). What that measures is
Swarm's orchestration (which tasks run and when they stop) and discovery (when a task is in or
out of the DNS), behind the same proxy; with ``SWARM_FRONT = "mesh"`` the service publishes
its port through the mesh instead, for a machine where IPVS works.

The load: one client (aiohttp, keep-alive, in a thread of this process) sends GET / at a
constant 200 requests/s (open loop: a slow answer does not delay the next request), each
with a 5 s timeout, from 2 s before the rollout command until 2 s after it is done. Failed:
a connection error, a timeout or a status other than 2xx. The rollout time runs from the
command until the engine lists exactly 2 running containers of the app or service, both of
the new release (their GREETING), both healthy (pleaco: its API reports 2 healthy replicas;
Swarm: Docker's health status), and the system says it is done (pleaco: 2 healthy; Swarm:
UpdateStatus completed). The old release's containers stopping is part of it: pleaco drains
first (rollout.drain_grace, 5 s, plus the 1 s DNS refresh), Swarm stops them at once. Also
reported: the time from the command to the last answer the client got from the old release
(after it, every answer came from the new one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import re
import shutil
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import docker.errors

from benchmarks.common import (
    CADDY,
    HELLO_PORT,
    KEEPALIVE,
    LOOPBACK,
    Agent,
    BenchError,
    Row,
    docker_cli,
    engine,
    free_port,
    log,
    median,
    remove_containers,
    wait_until,
)
from benchmarks.swarm import SwarmMode, remove_service, service_label
from pleaco.api.errors import ApiError

APP = "rollout-bench"
HOST = f"{APP}.pleaco.internal"
REPLICAS = 2
SERVICE = "pleaco-bench-rollout"
NETWORK = "pleaco-bench-rollout"
FRONT = "pleaco-bench-rollout-front"
FRONT_LABEL = "pleaco.bench=rollout-front"
SWARM_FRONT = "caddy"  # "mesh" where the kernel has IPVS (see the module doc)
RATE = 200.0  # requests/s
REQUEST_TIMEOUT = 5.0
LEAD_S = 2.0  # load before the command ...
TAIL_S = 2.0  # ... and after the rollout is done
SETTLE_S = 2.0  # pause between rollouts, without load
ROLLOUT_TIMEOUT = 120.0
HEALTH_CMD = "printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' | nc -w 2 127.0.0.1 8080 | grep -q '^HTTP/1.[01] 200'"

_VERSION = re.compile(r"\((v\d+)\)")


# -- the load ---------------------------------------------------------------------------------------


@dataclass
class Sample:
    sent: float  # time.monotonic() when sent
    latency: float
    ok: bool
    version: str = ""  # the release that answered (its GREETING)
    error: str = ""


@dataclass
class Load:
    """GET / at a constant rate from a thread of its own, until stopped."""

    url: str
    host: str | None = None
    rate: float = RATE
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _error: BaseException | None = None

    def __enter__(self) -> Load:
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(REQUEST_TIMEOUT + 10)
        if self._error is not None and exc[0] is None:
            raise BenchError(f"the load generator failed: {self._error!r}")

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __exit__
            self._error = exc

    async def _main(self) -> None:
        headers = {"Host": self.host} if self.host else {}
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=200)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=headers) as session:
            tasks: set[asyncio.Task[None]] = set()
            t0 = time.monotonic()
            i = 0
            while not self._stop.is_set():
                delay = t0 + i / self.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(self._one(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if tasks:
                await asyncio.wait(tasks)

    async def _one(self, session: aiohttp.ClientSession) -> None:
        sent = time.monotonic()
        try:
            async with session.get(self.url) as resp:
                body = await resp.text()
                m = _VERSION.search(body)
                ok = 200 <= resp.status < 300
                self.samples.append(Sample(sent, time.monotonic() - sent, ok, m.group(1) if m else "",
                                           "" if ok else f"HTTP {resp.status}: {body.strip()[:80]}"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.samples.append(Sample(sent, time.monotonic() - sent, False, "", f"{type(exc).__name__}: {exc}"[:160]))


def summarise(samples: list[Sample], t_cmd: float, old: str, new: str) -> dict[str, Any]:
    failed = [s for s in samples if not s.ok]
    kinds: dict[str, int] = {}
    for s in failed:
        kind = re.sub(r"\d+\.\d+\.\d+\.\d+(:\d+)?", "ADDR", s.error)
        kinds[kind] = kinds.get(kind, 0) + 1
    old_seen = [s.sent - t_cmd for s in samples if s.version == old]
    new_seen = [s.sent - t_cmd for s in samples if s.version == new]
    lat = sorted(s.latency for s in samples if s.ok)
    return {
        "requests": len(samples),
        "failed": len(failed),
        "failures": kinds,
        "failed_at_s": [round(s.sent - t_cmd, 3) for s in failed][:50],
        "last_old_s": round(max(old_seen), 3) if old_seen else None,
        "first_new_s": round(min(new_seen), 3) if new_seen else None,
        "p50_ms": round(lat[len(lat) // 2] * 1000, 2) if lat else None,
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2) if lat else None,
        "max_ms": round(lat[-1] * 1000, 2) if lat else None,
    }


# -- the engine's view ------------------------------------------------------------------------------


def running_releases(labels: list[str], docker_health: bool) -> list[tuple[str, bool]]:
    """(GREETING, healthy) of every running container with these labels; healthy is
    Docker's health status when ``docker_health``, else True."""
    out = []
    for c in engine().containers(filters={"label": labels, "status": "running"}):
        try:
            info = engine().inspect_container(c["Id"])
        except docker.errors.NotFound:
            continue
        env = dict(e.split("=", 1) for e in info["Config"]["Env"] or [] if "=" in e)
        healthy = (info["State"].get("Health") or {}).get("Status") == "healthy" if docker_health else True
        out.append((env.get("GREETING", ""), healthy))
    return out


def wait_answers(url: str, host: str | None, version: str) -> None:
    def answers() -> bool:
        req = urllib.request.Request(url, headers={"Host": host} if host else {})
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                return f"({version})".encode() in resp.read()
        except OSError:
            return False

    wait_until(answers, 30, f"{version} to answer on {url}")


# -- pleaco -------------------------------------------------------------------------------------------


class Pleaco:
    name = "pleaco"

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.url = f"http://{LOOPBACK}:{agent.proxy_port}/"
        self.host: str | None = HOST
        self.deployed = False

    def deploy(self, version: str) -> None:
        self.agent.cli("apps", "deploy", APP, "--image", KEEPALIVE, "--replicas", str(REPLICAS),
                       "--port", str(HELLO_PORT), "--health", "/healthz", "--env", f"GREETING={version}")
        self.deployed = True

    def __enter__(self) -> Pleaco:
        self.deploy("v1")
        wait_until(lambda: self.done("v1"), ROLLOUT_TIMEOUT, "pleaco to run v1")
        wait_answers(self.url, self.host, "v1")
        return self

    def __exit__(self, *exc: object) -> None:
        if not (self.deployed and self.agent.alive()):
            return  # the agent's own cleanup force-removes whatever is left
        self.agent.remove_app(APP)

    def roll(self, version: str, order: str) -> None:
        self.deploy(version)

    def done(self, version: str) -> bool:
        if not self.agent.alive():
            raise BenchError(f"the agent died: {self.agent.log_tail(5)}")
        try:
            app = self.agent.client.app(APP)
        except ApiError:
            return False
        if app["healthy"] != REPLICAS:
            return False
        running = running_releases(self.agent.labels(APP), docker_health=False)
        return len(running) == REPLICAS and all(v == version for v, _ in running)

    def log_lines(self, since: float, until: float) -> list[str]:
        """The agent's log lines about the app (and the proxy) within [since, until]."""
        out: list[str] = []
        try:
            lines = self.agent.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return out
        for line in lines:
            m = re.match(r"^ts=(\S+) ", line)
            if not m:
                continue
            with contextlib.suppress(ValueError):
                ts = dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()
                if since - 1 <= ts <= until + 1 and (APP in line or "proxy" in line):
                    out.append(line)
        return out


# -- Docker Swarm -------------------------------------------------------------------------------------


def front_config(service: str) -> dict[str, Any]:
    """Caddy in front of the service: its tasks from Docker's DNS, pleaco's LB settings."""
    return {
        "admin": {"disabled": True},
        "logging": {"logs": {"default": {"level": "ERROR"}}},
        "apps": {"http": {"servers": {"front": {
            "listen": [f":{HELLO_PORT}"],
            "automatic_https": {"disable": True},
            "routes": [{"handle": [{
                "handler": "reverse_proxy",
                "dynamic_upstreams": {
                    "source": "a", "name": f"tasks.{service}", "port": str(HELLO_PORT), "refresh": "1s",
                    "resolver": {"addresses": ["udp/127.0.0.11:53"]}, "dial_timeout": "1s",
                },
                "load_balancing": {"selection_policy": {"policy": "least_conn"}, "try_duration": "5s",
                                   "try_interval": "100ms"},
                "health_checks": {"passive": {"fail_duration": "2s", "max_fails": 1}},
            }]}],
        }}}},
    }


class Swarm:
    name = "swarm"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.mode = SwarmMode()
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}/"
        self.host: str | None = None
        self.created = self.network = self.front = False

    def __enter__(self) -> Swarm:
        self.mode.__enter__()
        try:
            self._setup()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _setup(self) -> None:
        self.mode.remove_leftover(SERVICE)
        remove_containers([FRONT_LABEL])
        args = ["service", "create", "--detach", "--no-resolve-image", "--init", "--name", SERVICE,
                "--replicas", str(REPLICAS), "--env", "GREETING=v1", "--label", "pleaco.bench=rollout",
                "--health-cmd", HEALTH_CMD, "--health-interval", "1s", "--health-timeout", "2s",
                "--health-retries", "3", "--update-order", "start-first"]
        if SWARM_FRONT == "mesh":
            args += ["--publish", f"published={self.port},target={HELLO_PORT}"]
        else:
            self.network = True
            docker_cli("network", "create", "--driver", "overlay", "--attachable", "--label", "pleaco.bench=rollout",
                       NETWORK)
            args += ["--endpoint-mode", "dnsrr", "--network", NETWORK]
        self.created = True
        docker_cli(*args, KEEPALIVE)
        if SWARM_FRONT != "mesh":
            conf = self.workdir / "front"
            conf.mkdir(parents=True, exist_ok=True)
            (conf / "caddy.json").write_text(json.dumps(front_config(SERVICE), indent=1))
            self.front = True
            docker_cli("run", "-d", "--name", FRONT, "--label", FRONT_LABEL, "--network", NETWORK,
                       "-p", f"{LOOPBACK}:{self.port}:{HELLO_PORT}", "-v", f"{conf}:/etc/front:ro",
                       CADDY, "caddy", "run", "--config", "/etc/front/caddy.json")
        wait_until(lambda: self.done("v1"), ROLLOUT_TIMEOUT, "swarm to run v1")
        wait_answers(self.url, self.host, "v1")

    def __exit__(self, *exc: object) -> None:
        try:
            if self.front:
                remove_containers([FRONT_LABEL])
            if self.created:
                remove_service(SERVICE)
            if self.network:
                # The service's tasks leave the network asynchronously: retry for a while.
                def gone() -> bool:
                    docker_cli("network", "rm", NETWORK, check=False)
                    return not docker_cli("network", "ls", "-q", "--filter", f"name=^{NETWORK}$").strip()

                try:
                    wait_until(gone, 30, f"network {NETWORK} to be removed", interval=1.0)
                except BenchError as exc:
                    log(f"swarm: {exc}")
        finally:
            self.mode.__exit__()
            remove_containers([service_label(SERVICE)])

    def roll(self, version: str, order: str) -> None:
        docker_cli("service", "update", "--detach", "--env-add", f"GREETING={version}",
                   "--update-order", order, SERVICE)

    def done(self, version: str) -> bool:
        running = running_releases([service_label(SERVICE)], docker_health=True)
        if not (len(running) == REPLICAS and all(v == version and h for v, h in running)):
            return False
        svc = engine().inspect_service(SERVICE)
        state = (svc.get("UpdateStatus") or {}).get("State")
        return state in (None, "completed")


# -- measurement ----------------------------------------------------------------------------------------


def measure(system: Pleaco | Swarm, old: str, new: str, order: str) -> dict[str, Any]:
    time.sleep(SETTLE_S)
    with Load(system.url, system.host) as load:
        time.sleep(LEAD_S)
        wall0 = time.time()
        t_cmd = time.monotonic()
        system.roll(new, order)
        cli_s = time.monotonic() - t_cmd
        wait_until(lambda: system.done(new), ROLLOUT_TIMEOUT, f"{system.name} to roll out {new}")
        seconds = time.monotonic() - t_cmd
        time.sleep(TAIL_S)
    result = {"seconds": round(seconds, 3), "cli_s": round(cli_s, 3), "order": order,
              **summarise(load.samples, t_cmd, old, new)}
    if isinstance(system, Pleaco):
        # Where pleaco's time went: when each kind of event was first and last logged.
        timeline: dict[str, list[float]] = {}
        for ts, event in system.agent.events(wall0, wall0 + seconds):
            timeline.setdefault(event, []).append(round(ts - wall0, 2))
        result["agent_events_s"] = {ev: [min(t), max(t)] for ev, t in timeline.items()}
        if result["failed"]:
            result["agent_log"] = system.log_lines(wall0 - LEAD_S, time.time())
    return result


def run(opts: argparse.Namespace, agent: Agent) -> list[Row]:
    rounds = max(1, int(opts.rounds))
    runs: dict[str, list[dict[str, Any]]] = {"pleaco": [], "swarm start-first": [], "swarm stop-first": []}
    errors: list[str] = []
    workdir = Path(tempfile.mkdtemp(prefix="pleaco-bench-rollout-"))
    version = {"pleaco": 1, "swarm": 1}
    try:
        with contextlib.ExitStack() as stack:
            swarm = stack.enter_context(Swarm(workdir))
            pleaco = stack.enter_context(Pleaco(agent))
            for r in range(rounds):
                plan: list[tuple[Pleaco | Swarm, str, str]] = [(pleaco, "start-first", "pleaco"),
                                                               (swarm, "start-first", "swarm start-first")]
                if r % 2:
                    plan.reverse()
                plan.append((swarm, "stop-first", "swarm stop-first"))
                for system, order, key in plan:
                    old = f"v{version[system.name]}"
                    new = f"v{version[system.name] + 1}"
                    try:
                        m = measure(system, old, new, order)
                    except BenchError as exc:
                        errors.append(f"round {r + 1} {key}: {exc}")
                        log(f"rollout round {r + 1}/{rounds} {key} FAILED: {exc}")
                        runs[key].append({"error": str(exc)})
                        # Where it stands now is unknown: wait for the new release or fail.
                        settled = functools.partial(system.done, new)
                        wait_until(settled, ROLLOUT_TIMEOUT, f"{key} to settle")
                    else:
                        runs[key].append(m)
                        log(f"rollout round {r + 1}/{rounds} {key} {old}->{new}: {m['seconds']:.2f} s, "
                            f"{m['failed']} of {m['requests']} requests failed {m['failures'] or ''}, "
                            f"last {old} at {m['last_old_s']} s, p99 {m['p99_ms']} ms")
                    version[system.name] += 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def med(key: str, field: str) -> float | None:
        return median(m.get(field) for m in runs[key] if "error" not in m)

    details: dict[str, Any] = {"runs": runs, "rate_per_s": RATE, "swarm_front": SWARM_FRONT}
    if errors:
        details["errors"] = errors
    what = f"rollout, 2 replicas, {RATE:.0f} req/s"
    rows = []
    for key, name in (("swarm start-first", "Swarm start-first"), ("swarm stop-first", "Swarm stop-first")):
        rows += [
            Row(benchmark=f"{what}: failed", unit="requests", pleaco=med("pleaco", "failed"),
                baseline=med(key, "failed"), baseline_name=name),
            Row(benchmark=f"{what}: command to last v1 answer", unit="s", pleaco=med("pleaco", "last_old_s"),
                baseline=med(key, "last_old_s"), baseline_name=name),
            Row(benchmark=f"{what}: command to only v2 running, healthy", unit="s", pleaco=med("pleaco", "seconds"),
                baseline=med(key, "seconds"), baseline_name=name),
        ]
    rows[0].details = details
    return rows
