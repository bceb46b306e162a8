"""A three-node cluster upgrade, 0.2.0 -> 0.3.0, with an app behind every node's proxy:
total time, API unavailability per node and for the cluster, app requests failed.

Three agents run from their own slot roots (``ROOT/current/bin/pleaco``, the way
systemd runs them), each with its own proxy (a Caddy container on its own port). The
bundles are this tree at 0.2.0 and 0.3.0 (``pleaco.host.bundle.build_bundle``); 0.2.0 is
installed once and linked into each root, 0.3.0 is installed by each node as its turn
comes. The app is the keep-alive app (common.KEEPALIVE) with 3 replicas and a health check.

- **Total time**: from ``pleaco upgrade --bundle`` (the CLI, against the first node, which
  is the plan's origin and so upgrades last) until it returns with every node confirmed on
  0.3.0: uploads, verifies, three installs (a venv and ``pip install --no-index`` each),
  three restarts and three health confirmations, one after the other.
- **API unavailability**: a thread asks every node's ``GET /v1/status`` every 0.1 s (2 s
  timeout); per node, the longest run of failed asks (and their total), and for the cluster
  the time during which no node answered (goal: 0; each node at most a few seconds).
- **App containers churned**: the app's containers before and after, by id and start time:
  any started, stopped or restarted during the upgrade counts (goal: 0).
- **App requests failed**: ``GET /`` at 20 requests/s through each node's proxy (60/s in
  all) from before the upgrade until after it; failed: a connection error, a timeout (5 s)
  or a status other than 2xx (goal: 0). The proxies are containers: they keep serving while
  their agent restarts.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import (
    CADDY,
    HELLO_PORT,
    LOOPBACK,
    REPO,
    BenchError,
    Row,
    clean_env,
    engine,
    free_port,
    keepalive_image,
    log,
    pleaco_command,
    remove_containers,
    wait_until,
)
from benchmarks.rollout import Load
from pleaco.api.client import Client
from pleaco.api.errors import ApiError
from pleaco.host import bundle
from pleaco.host.slots import Slots
from pleaco.host.trial import agent_pid

APP = "upgrade-bench"
RATE_PER_PROXY = 20.0
POLL = 0.1  # seconds between asks of every node's API


@dataclass
class SlotAgent:
    """An agent run from its slot root, with a proxy on its own ports."""

    workdir: Path
    name: str
    public_key: str
    extra_args: list[str] = field(default_factory=list)
    port: int = field(default_factory=free_port)
    proxy_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    token: str = ""

    @property
    def root(self) -> Path:
        return self.workdir / f"{self.name}-root"

    @property
    def data_dir(self) -> Path:
        return self.workdir / self.name

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def client(self) -> Client:
        return Client(self.url, self.token, timeout=10)

    def start(self) -> None:
        self.data_dir.mkdir(parents=True)
        config = self.workdir / f"{self.name}.toml"
        config.write_text(f'proxy_image = "{CADDY}"\n'
                          f'[proxy]\nadmin_listen = "{LOOPBACK}:{free_port()}"\n'
                          f'https_listen = "{LOOPBACK}:{free_port()}"\n'
                          f'activator_listen = "{LOOPBACK}:{free_port()}"\n'
                          f'[upgrade]\ntrusted_keys = ["{self.public_key}"]\nroot = "{self.root}"\n')
        cmd = [str(self.root / "current" / "bin" / "pleaco"), "agent", "--config", str(config),
               "--data-dir", str(self.data_dir), "--name", self.name, "--api-listen", f"{LOOPBACK}:{self.port}",
               "--gossip-listen", f"{LOOPBACK}:{free_port()}", "--proxy-listen", f"{LOOPBACK}:{self.proxy_port}",
               "--discovery", "seeds", *self.extra_args]
        env = {k: v for k, v in clean_env().items() if k != "PYTHONPATH"}  # the slot's own code
        with open(self.workdir / f"{self.name}.log", "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=env)
        token = self.data_dir / "admin.token"

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"agent {self.name} exited with {self.proc.returncode}")
            if not token.exists():
                return False
            self.token = token.read_text().strip()
            try:
                self.node_id = self.client.status()["node_id"]
            except ApiError:
                return False
            return True

        wait_until(ready, 60, f"agent {self.name} to answer")

    def pids(self) -> set[int]:
        """The agent (also after it exec'd into another slot), its upgrade guard, and any
        process the guard started: found by the data dir lock and their command lines."""
        found = {p for p in [agent_pid(self.data_dir)] if p is not None}
        if self.proc is not None and self.proc.poll() is None:
            found.add(self.proc.pid)
        needle = str(self.data_dir).encode()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if needle in (entry / "cmdline").read_bytes():
                        found.add(int(entry.name))
        return found - {os.getpid()}

    def close(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(BenchError):
            wait_until(lambda: not self.pids(), 15, f"agent {self.name} to stop", interval=0.2)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.node_id:
            remove_containers([f"pleaco.node={self.node_id}"])


class ApiWatch:
    """Asks every node's API every POLL seconds from a thread: which answered, when."""

    def __init__(self, agents: list[SlotAgent]) -> None:
        self.agents = agents
        self.rounds: list[tuple[float, list[bool]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-watch", daemon=True)

    def __enter__(self) -> ApiWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _up(self, a: SlotAgent) -> bool:
        try:
            Client(a.url, a.token, timeout=2).status()
            return True
        except ApiError:
            return False

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            self.rounds.append((t, [self._up(a) for a in self.agents]))
            self._stop.wait(max(0.0, t + POLL - time.monotonic()))

    def down(self, ok: list[bool]) -> tuple[float, float]:
        """(longest, total) seconds during which the rounds' ``ok`` was False."""
        longest = total = 0.0
        since: float | None = None
        for (t, _), up in zip(self.rounds, ok, strict=True):
            if not up and since is None:
                since = t
            elif up and since is not None:
                longest, total, since = max(longest, t - since), total + t - since, None
        if since is not None and self.rounds:
            gap = self.rounds[-1][0] - since
            longest, total = max(longest, gap), total + gap
        return longest, total


def app_containers() -> dict[str, str]:
    """The app's containers on the engine, running or not: id -> StartedAt."""
    found = engine().containers(all=True, filters={"label": f"pleaco.app={APP}"})
    return {c["Id"]: engine().inspect_container(c["Id"])["State"]["StartedAt"] for c in found}


def prepare(workdir: Path) -> tuple[str, dict[str, Path], Slots]:
    log("upgrade: building the 0.2.0 and 0.3.0 bundles of this tree")
    private, public = bundle.keygen(workdir / "keys")
    bundles = {v: workdir / f"pleaco-{v}.bundle" for v in ("0.2.0", "0.3.0")}
    for version, path in bundles.items():
        bundle.build_bundle(REPO, private, path, version=version)
    key = public.read_text().strip()
    shared = Slots(workdir / "shared")
    shared.install(bundles["0.2.0"], bundle.verify_bundle(bundles["0.2.0"], [key], "0.0.1"))
    return key, bundles, shared


def measure(workdir: Path, key: str, bundles: dict[str, Path], shared: Slots) -> list[Row]:
    agents = [SlotAgent(workdir, f"n{i}", key) for i in range(3)]
    try:
        for a in agents:
            (a.root / "releases").mkdir(parents=True)
            os.symlink(shared.path("0.2.0"), a.root / "releases" / "0.2.0")
            Slots(a.root).flip("0.2.0")
        first = agents[0]
        first.start()
        first.client.request("POST", "/v1/cluster/init")
        token = first.client.request("GET", "/v1/cluster/token")["token"]
        for a in agents[1:]:
            a.extra_args = ["--join-token", token]
            a.start()
        ids = {a.node_id for a in agents}
        wait_until(lambda: all({n["id"] for n in a.client.nodes() if n["state"] == "alive"} == ids for a in agents),
                   60, "3 nodes alive everywhere")
        first.client.deploy(APP, {"image": "pleaco-bench/keepalive:latest", "replicas": 3, "port": HELLO_PORT,
                                  "health": "/healthz"})
        host = f"{APP}.pleaco.internal"

        def served_everywhere() -> bool:
            for a in agents:
                req = urllib.request.Request(f"http://{LOOPBACK}:{a.proxy_port}/", headers={"Host": host})
                try:
                    with urllib.request.urlopen(req, timeout=2) as resp:
                        if resp.status != 200:
                            return False
                except OSError:
                    return False
            return True

        wait_until(served_everywhere, 120, "the app served through every node's proxy", interval=0.5)
        before = app_containers()
        loads = [Load(f"http://{LOOPBACK}:{a.proxy_port}/", host, RATE_PER_PROXY) for a in agents]
        log("upgrade: 3 nodes from 0.2.0 to 0.3.0 under load")
        with contextlib.ExitStack() as stack:
            for load in loads:
                stack.enter_context(load)
            watch = stack.enter_context(ApiWatch(agents))
            time.sleep(2)  # 2 s of load before the command: the steady state, for comparison
            started = time.monotonic()
            proc = subprocess.run([*pleaco_command(), "--api", first.url, f"--token={first.token}", "upgrade",
                                   "--bundle", str(bundles["0.3.0"])], capture_output=True, text=True, timeout=900,
                                  env=clean_env())
            total = time.monotonic() - started
            time.sleep(2)  # and 2 s after it
        if proc.returncode != 0:
            raise BenchError(f"pleaco upgrade failed: {proc.stdout.strip()} {proc.stderr.strip()}")
        versions = {a.name: a.client.status()["version"] for a in agents}
        if set(versions.values()) != {"0.3.0"}:
            raise BenchError(f"not every node runs 0.3.0 after the upgrade: {versions}")
        after = app_containers()
        churned = len(set(before) ^ set(after)) + sum(1 for c in set(before) & set(after) if before[c] != after[c])
        per_node = {a.name: watch.down([up[i] for _, up in watch.rounds]) for i, a in enumerate(agents)}
        cluster_longest, cluster_total = watch.down([any(up) for _, up in watch.rounds])
        samples = [s for load in loads for s in load.samples]
        failed = [s for s in samples if not s.ok]
        worst = max(longest for longest, _ in per_node.values())
        details = {"per_node_longest_s": {k: round(v[0], 2) for k, v in per_node.items()},
                   "per_node_total_s": {k: round(v[1], 2) for k, v in per_node.items()},
                   "cluster_longest_s": round(cluster_longest, 2), "requests": len(samples),
                   "failed": len(failed), "errors": sorted({s.error for s in failed})[:5],
                   "app_containers_before": len(before), "app_containers_after": len(after),
                   "cli_output": proc.stdout.strip().splitlines()}
        log(f"upgrade: {total:.1f} s; API down per node {details['per_node_longest_s']}, cluster "
            f"{cluster_total:.2f} s; {len(failed)} of {len(samples)} app requests failed")
        return [
            Row("cluster upgrade, 3 nodes, 0.2.0 -> 0.3.0: total time", "s", total, details=details),
            Row("cluster upgrade: API unavailable, worst node", "s", worst, goal="a few seconds", met=worst <= 5.0),
            Row("cluster upgrade: API unavailable, whole cluster", "s", cluster_total, goal="0",
                met=cluster_total == 0.0),
            Row("cluster upgrade: app requests failed (60 req/s through the 3 proxies)", "requests",
                float(len(failed)), goal="0", met=not failed),
            Row("cluster upgrade: app containers started, stopped or restarted", "containers", float(churned),
                goal="0", met=churned == 0),
        ]
    finally:
        for a in agents:
            a.close()


def run(opts: argparse.Namespace) -> list[Row]:
    workdir = Path(tempfile.mkdtemp(prefix="pleaco-bench-upgrade-"))
    try:
        key, bundles, shared = prepare(workdir)
        with keepalive_image():
            return measure(workdir, key, bundles, shared)
    finally:
        keep = Path(opts.results_dir)
        with contextlib.suppress(OSError):
            keep.mkdir(parents=True, exist_ok=True)
            for i in range(3):
                shutil.copy(workdir / f"n{i}.log", keep / f"upgrade-n{i}-agent.log")
        shutil.rmtree(workdir, ignore_errors=True)
