"""What the benchmarks share: result rows, polling with deadlines, Docker Engine access and
real ``pleaco agent`` processes that are always stopped and whose containers are always
removed, whatever happens.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors

from pleaco.api.client import Client

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[1]
DOCKER_URL = "unix:///var/run/docker.sock"
HELLO = "pleaco/hello:latest"
HELLO_PORT = 8080
LOOPBACK = "127.0.0.1"
CADDY = "pleaco/caddy:latest"
# A keep-alive app: Caddy's `caddy respond` (Go's HTTP server) on :8080 answering every path
# with "hello from HOST (GREETING)", built by the benchmarks from pleaco/caddy (no registry).
KEEPALIVE = "pleaco-bench/keepalive:latest"
KEEPALIVE_DOCKERFILE = f"""FROM {CADDY}
EXPOSE 8080
CMD ["/bin/sh", "-c", "exec caddy respond --listen :8080 --body \\"hello from $(hostname) (${{GREETING:-pleaco}})\\""]
"""


class BenchError(RuntimeError):
    """A benchmark could not be carried out (timeout, engine error, agent died...)."""


def log(msg: str) -> None:
    """Progress goes to standard error, so standard output holds only the table."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- results --------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the results table."""

    benchmark: str
    unit: str
    pleaco: float | None
    baseline: float | None = None
    baseline_name: str = ""
    goal: str = ""  # human-readable, e.g. "<= 1.00x Swarm"
    met: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.pleaco is None or not self.baseline:
            return None
        return self.pleaco / self.baseline

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "unit": self.unit,
            "pleaco": _round(self.pleaco),
            "baseline": _round(self.baseline),
            "baseline_name": self.baseline_name,
            "ratio": _round(self.ratio, 3),
            "goal": self.goal,
            "met": self.met,
            "details": self.details,
        }


def _round(v: float | None, digits: int = 2) -> float | None:
    return None if v is None else round(v, digits)


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


# -- polling ----------------------------------------------------------------------------------


def finish_workdir(workdir: Path, agent_log: str, results_dir: str, keep_as: str) -> None:
    """Keep the agent's log (``agent_log`` in ``workdir``) as ``keep_as`` in the results
    dir, then remove the benchmark's work dir."""
    keep = Path(results_dir)
    with contextlib.suppress(OSError):
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(workdir / agent_log, keep / keep_as)
    shutil.rmtree(workdir, ignore_errors=True)


def wait_until(cond: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Call ``cond`` every ``interval`` s until it returns something truthy; BenchError after
    ``timeout`` s. The interval is coarse on purpose: on a 2-core machine a tight polling
    loop would steal CPU from the system being measured."""
    deadline = time.monotonic() + timeout
    while True:
        result = cond()
        if result:
            return result
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- Docker Engine ------------------------------------------------------------------------------


_api: docker.APIClient | None = None


def engine() -> docker.APIClient:
    """A low-level Docker API client (in-process: far cheaper to poll with than the CLI)."""
    global _api
    if _api is None:
        _api = docker.APIClient(base_url=DOCKER_URL, version="1.41", timeout=60)
    return _api


def docker_cli(*args: str, timeout: float = 60.0, check: bool = True) -> str:
    """Run the ``docker`` CLI; returns its standard output."""
    try:
        proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"docker {' '.join(args)}: no answer within {timeout:.0f}s") from None
    if check and proc.returncode != 0:
        raise BenchError(f"docker {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def count_containers(labels: list[str], running_only: bool) -> int:
    filters: dict[str, Any] = {"label": labels}
    if running_only:
        filters["status"] = "running"
    return len(engine().containers(all=not running_only, quiet=True, filters=filters))


def remove_containers(labels: list[str]) -> int:
    """Force-remove every container (any state) carrying all of ``labels``."""
    ids = [c["Id"] for c in engine().containers(all=True, quiet=True, filters={"label": labels})]

    def rm(cid: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            engine().remove_container(cid, force=True)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(rm, ids))
    return len(ids)


def require_image(image: str) -> None:
    try:
        engine().inspect_image(image)
    except docker.errors.ImageNotFound:
        raise BenchError(f"image {image} is missing; build it with scripts/images.sh (make images)") from None


@contextlib.contextmanager
def keepalive_image() -> Iterator[str]:
    """Build KEEPALIVE from the local pleaco/caddy image (classic builder, offline) for the
    ``with`` block; the image is removed afterwards."""
    require_image(CADDY)
    with tempfile.TemporaryDirectory(prefix="pleaco-bench-keepalive-") as ctx:
        (Path(ctx) / "Dockerfile").write_text(KEEPALIVE_DOCKERFILE)
        env = {**os.environ, "DOCKER_BUILDKIT": "0"}
        proc = subprocess.run(["docker", "build", "-q", "--label", "pleaco.bench=keepalive", "-t", KEEPALIVE, ctx],
                              capture_output=True, text=True, timeout=120, env=env)
        if proc.returncode != 0:
            raise BenchError(f"docker build {KEEPALIVE}: {proc.stderr.strip()}")
    try:
        yield KEEPALIVE
    finally:
        docker_cli("image", "rm", KEEPALIVE, check=False)


# -- pleaco agents --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def pleaco_command() -> list[str]:
    script = Path(sys.executable).with_name("pleaco")
    if script.exists():
        return [str(script)]
    found = shutil.which("pleaco")
    return [found] if found else [sys.executable, "-m", "pleaco"]


def clean_env() -> dict[str, str]:
    """The environment without PLEACO_* settings, which would override the agent's config or
    the CLI's API address and token; but with the network off, as in the tests' harness:
    the benchmarks' agents share one engine and one network namespace, where each would
    claim the one `pleaco` network (an environment variable, not the config file, so an
    older release that has no [network] table starts too)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLEACO_")}
    env["PLEACO_NETWORK_ENABLED"] = "false"
    return env


_LOG_LINE = re.compile(r"^ts=(\S+) level=\S+ event=(\S+)")


class Agent:
    """A real ``pleaco agent`` process on loopback only, with its own data dir and node id.

    Use as a context manager: on exit the process is stopped (SIGTERM, then SIGKILL) and
    every container labelled with its node id is force-removed, since an agent leaves its
    containers running when it stops.
    """

    def __init__(self, workdir: Path, name: str, config_text: str = "", extra_args: Iterable[str] = ()) -> None:
        self.data_dir = workdir / name
        self.name = name
        self.port = free_port()
        self.proxy_port = free_port()
        self.config_text = config_text  # TOML for the agent's own config file
        self.extra_args = list(extra_args)  # more ``pleaco agent`` flags (a join token, ...)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.node_id = ""
        self.token = ""

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> Agent:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # An empty config file of our own: the defaults plus the flags below, never the
        # machine's /etc/pleaco/pleaco.toml.
        config = self.data_dir.with_suffix(".toml")
        config.write_text(self.config_text)
        cmd = [
            *pleaco_command(), "agent",
            "--config", str(config),
            "--data-dir", str(self.data_dir),
            "--name", self.name,
            "--api-listen", f"{LOOPBACK}:{self.port}",
            "--gossip-listen", f"{LOOPBACK}:{free_port()}",
            "--proxy-listen", f"{LOOPBACK}:{self.proxy_port}",
            "--discovery", "none",
            "--docker-url", DOCKER_URL,
            *self.extra_args,
        ]
        with open(self.log_path, "ab") as out:
            # A session of its own: a Ctrl-C at the terminal reaches the benchmark (which
            # then cleans up) rather than killing the agent behind its back.
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env=clean_env(),
            )
        token_path = self.data_dir / "admin.token"

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise BenchError(f"agent {self.name} exited with {self.proc.returncode}: {self.log_tail(5)}")
            if not token_path.exists():
                return False
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:
                    self.node_id = json.loads(resp.read())["node_id"]
            except OSError:
                return False
            return True

        wait_until(ready, timeout, f"agent {self.name} to answer on {self.url}", interval=0.1)
        self.token = token_path.read_text().strip()

    @property
    def client(self) -> Client:
        return Client(self.url, self.token, timeout=30.0)

    def cli(self, *args: str, timeout: float = 60.0) -> str:
        """Run the ``pleaco`` CLI against this agent, as a user would."""
        cmd = [*pleaco_command(), "--api", self.url, "--token", self.token, *args]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=clean_env())
        except subprocess.TimeoutExpired:
            raise BenchError(f"pleaco {' '.join(args)}: no answer within {timeout:.0f}s") from None
        if proc.returncode != 0:
            raise BenchError(f"pleaco {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def metrics(self) -> dict[str, float]:
        """The agent's /metrics, as {series: value}; empty when it does not answer."""
        req = urllib.request.Request(self.url + "/metrics", headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                text = resp.read().decode()
        except OSError:
            return {}  # diagnostics only: never fail a measurement over them
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    continue
        return out

    def labels(self, app: str | None = None) -> list[str]:
        return [f"pleaco.node={self.node_id}", *([f"pleaco.app={app}"] if app else ["pleaco.app"])]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def remove_app(self, app: str, timeout: float = 60.0) -> None:
        """``apps rm`` and wait until the engine has none of its containers. A failure is
        logged, not raised: the agent's own cleanup force-removes what is left."""
        try:
            self.cli("apps", "rm", app)
            wait_until(lambda: count_containers(self.labels(app), running_only=False) == 0,
                       timeout, f"pleaco to remove {app}'s containers", interval=0.5)
        except BenchError as exc:
            log(f"pleaco: clean removal of {app} failed ({exc}); the agent's cleanup forces it")

    def events(self, since: float, until: float) -> list[tuple[float, str]]:
        """(epoch seconds, event) of the agent's log lines within [since, until]."""
        out: list[tuple[float, str]] = []
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return out
        for line in lines:
            m = _LOG_LINE.match(line)
            if not m:
                continue
            try:
                ts = dt.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()
            except ValueError:
                continue
            if since <= ts <= until:
                out.append((ts, m.group(2)))
        return out

    def log_tail(self, n: int) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self.node_id:
                removed = remove_containers([f"pleaco.node={self.node_id}"])
                if removed:
                    log(f"removed {removed} leftover container(s) of agent {self.name}")


# -- the machine ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        if head:
            info["commit"] = head
    try:
        info["kernel"] = os.uname().release
        with open("/proc/meminfo") as f:
            info["mem_total_mb"] = int(f.readline().split()[1]) // 1024
    except OSError:
        pass
    try:
        info["docker"] = engine().version().get("Version", "unknown")
    except Exception as exc:  # the table still prints; the benchmarks will report the error
        info["docker"] = f"unreachable: {exc}"
    return info
