"""Test hosts that each have their own network stack AND their own Docker Engine.

Built on ``netns.hosts`` (network namespaces on one bridge, reachable from the test): each
host gets a dockerd of its own (data root, exec root and socket under a temporary
directory, its default bridge on 10.251.N.0/24), started with ``nsenter --net`` rather than
``ip netns exec`` (which mounts a fresh /sys, where the engine finds no cgroups). The
recipe and its pitfalls are measured in ../shared/HOSTS.md: three engines are up in under
a second. Everything is removed on exit, also when the test fails: the containers through
each engine, then the engine (SIGTERM and wait: shims outlive a killed dockerd), then the
namespaces (netns.hosts), then the cgroups the engines left.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker

from tests.integration import netns
from tests.integration.agentproc import wait_for

# Images every engine gets from the host's (built by scripts/images.sh): no registry here.
IMAGES = ("pleaco/busybox:latest", "pleaco/hello:latest")
POLL = 0.05


@dataclass(frozen=True)
class EngineHost:
    """A namespace host with its own Docker Engine."""

    host: netns.Host
    index: int
    run_dir: Path  # socket, pid file and exec root

    @property
    def ns(self) -> str:
        return self.host.ns

    @property
    def ip(self) -> str:
        return self.host.ip

    @property
    def docker_url(self) -> str:
        return f"unix://{self.run_dir}/docker.sock"

    @property
    def prefix(self) -> list[str]:
        """A command prefix that runs a process in this host's network namespace (an agent:
        ``agent_factory(prefix=h.prefix, host=h.ip, env=h.env)``)."""
        return ["nsenter", f"--net=/run/netns/{self.ns}"]

    @property
    def env(self) -> dict[str, str]:
        return {"PLEACO_DOCKER_URL": self.docker_url}

    def docker(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.docker_url, timeout=30)

    def sh(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command in this host's network namespace."""
        return subprocess.run([*self.prefix, *cmd], check=check, capture_output=True, text=True)


def _engine_ready(url: str) -> bool:
    try:
        client = docker.DockerClient(base_url=url, timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _mounts_under(root: Path) -> list[str]:
    """Mount points below ``root`` in this mount namespace, deepest first."""
    found = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return sorted((m for m in found if m.startswith(f"{root}/")), key=len, reverse=True)


@contextlib.contextmanager
def engine_hosts(count: int, tag: str, subnet: int, images: tuple[str, ...] = IMAGES) -> Iterator[list[EngineHost]]:
    """``count`` hosts on bridge ``pl{tag}`` in 10.77.SUBNET.0/24, each with its own engine
    holding ``images``. ``tag`` (2-3 letters) and ``subnet`` must be unique per test file."""
    work = Path(tempfile.mkdtemp(prefix=f"pl-{tag}-", dir="/tmp"))
    started: list[tuple[EngineHost, subprocess.Popen[bytes]]] = []
    cgroups: list[str] = []
    with netns.hosts(count, tag, subnet) as hosts:
        try:
            for i, host in enumerate(hosts):
                data = work / f"n{i}"
                run = Path(f"/run/pl-{host.ns}")
                data.mkdir(parents=True)
                run.mkdir(parents=True, exist_ok=True)
                # Its own key file, else every engine has the same ID.
                (data / "daemon.json").write_text(json.dumps({"deprecated-key-path": str(data / "key.json")}))
                cgroup = f"pl-{host.ns}"
                cgroups.append(cgroup)
                with open(data / "dockerd.log", "wb") as log:
                    proc = subprocess.Popen(
                        ["nsenter", f"--net=/run/netns/{host.ns}", "unshare", "--uts", "sh", "-c",
                         f"hostname {host.ns}; exec dockerd --config-file {data}/daemon.json"
                         f" --data-root {data}/data --exec-root {run}/exec --pidfile {run}/docker.pid"
                         f" -H unix://{run}/docker.sock --bip 10.251.{subnet % 200 + i}.1/24"
                         f" --cgroup-parent /{cgroup} --shutdown-timeout 2"],
                        stdout=log, stderr=subprocess.STDOUT)
                started.append((EngineHost(host, i, run), proc))
            for eh, proc in started:
                wait_for(lambda eh=eh, proc=proc: proc.poll() is not None or _engine_ready(eh.docker_url),  # type: ignore[misc]
                         30, f"the engine of {eh.ns}", interval=POLL)
                assert proc.poll() is None, (work / f"n{eh.index}" / "dockerd.log").read_text()[-2000:]
            if images:
                saved = subprocess.run(["docker", "save", *images], check=True, capture_output=True).stdout
                for eh, _ in started:
                    subprocess.run(["docker", "-H", eh.docker_url, "load", "-q"], input=saved, check=True,
                                   capture_output=True)
            yield [eh for eh, _ in started]
        finally:
            for eh, proc in started:
                if proc.poll() is None:
                    with contextlib.suppress(Exception):
                        client = eh.docker()
                        for c in client.containers.list(all=True):
                            with contextlib.suppress(Exception):
                                c.remove(force=True)
                        client.close()
                    proc.send_signal(signal.SIGTERM)
            for eh, proc in started:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
                # containerd and its shims, when the engine died before it stopped them.
                subprocess.run(["pkill", "-f", f"{eh.run_dir}/exec"], capture_output=True)
                # The engine leaves its namespace bind-mounted at exec/netns/default once a
                # host-network container (a proxy) ran there: that mount would keep the
                # host's namespace, and its veth on the bridge, alive after `ip netns del`.
                for mount in _mounts_under(eh.run_dir):
                    subprocess.run(["umount", "-l", mount], capture_output=True)
                shutil.rmtree(eh.run_dir, ignore_errors=True)
    # The namespaces are gone (netns.hosts); the engines' cgroups are empty now.
    for cgroup in cgroups:
        for root in Path("/sys/fs/cgroup").glob(f"**/{cgroup}"):
            for sub in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if sub.is_dir():
                    with contextlib.suppress(OSError):
                        sub.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()
    shutil.rmtree(work, ignore_errors=True)
