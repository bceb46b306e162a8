"""Nodes booted from the golden image: containers of ``pleaco/node`` (``make image``) with
systemd as PID 1 and a Docker Engine of their own inside, on a private Docker network, as
../shared/HOSTS.md measured (no ``--privileged``). Each node gets its configuration the way
cloud-init gives it on a VM: ``/etc/pleaco/pleaco.toml`` is in place before the first boot.

Everything is removed on exit, also when the test fails: the node containers (their inner
engines' containers go with them), their engine volumes, the network, and the cgroups the
inner engines left.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors

from pleaco import __version__
from pleaco.api.client import Client

IMAGE = f"pleaco/node:{__version__}"
# What a node container needs (HOSTS.md): SYS_ADMIN (mounts, the inner engine's layers),
# NET_ADMIN (its NAT chain, routes), no seccomp filter (runc's keyring), its own /run, the
# host's cgroup tree writable (the inner engine makes cgroups), /dev/net/tun (wireguard-go).
RUN_ARGS: dict[str, Any] = {
    "cap_add": ["SYS_ADMIN", "NET_ADMIN"],
    "security_opt": ["seccomp=unconfined"],
    "tmpfs": {"/run": "", "/run/lock": ""},
    "cgroupns": "host",
    "devices": ["/dev/net/tun:/dev/net/tun", "/dev/fuse:/dev/fuse"],
    "stop_signal": "SIGRTMIN+3",
}
POLL = 0.2


def image_present() -> bool:
    client = docker.from_env()
    try:
        client.images.get(IMAGE)
        return True
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()


@dataclass
class Node:
    name: str
    ip: str
    container: Any  # docker.models.containers.Container

    def sh(self, script: str, timeout: float = 60) -> tuple[int, str]:
        """Run a shell command in the node (as root); its exit code and output."""
        done = subprocess.run(["docker", "exec", self.container.id, "sh", "-c", script],
                              capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout + done.stderr

    @property
    def url(self) -> str:
        return f"http://{self.ip}:7400"

    def token(self) -> str:
        rc, out = self.sh("cat /var/lib/pleaco/admin.token")
        return out.strip() if rc == 0 else ""

    def client(self) -> Client:
        return Client(self.url, self.token(), timeout=30)

    def journal(self, lines: int = 80) -> str:
        return self.sh(f"journalctl -u pleaco -u pleaco-images -u docker --no-pager -n {lines}")[1]


def _put_file(container: Any, path: str, text: str, mode: int = 0o600) -> None:
    """Write a file into a created (not yet started) container; its directory exists in
    the image (/etc/pleaco: packer/provision.sh makes it)."""
    data = text.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(Path(path).name)
        info.size, info.mode, info.mtime = len(data), mode, int(time.time())
        tar.addfile(info, io.BytesIO(data))
    assert container.put_archive(str(Path(path).parent), buf.getvalue())


@contextlib.contextmanager
def image_nodes(count: int, tag: str, subnet: int, config: Callable[[int, str], str],
                image: str = IMAGE, start: int | None = None) -> Iterator[tuple[list[Node], str]]:
    """``count`` nodes pl-TAG-1.. on network pl-TAG (10.78.SUBNET.0/24; nodes from .11),
    each configured by ``config(index, ip)`` (the pleaco.toml cloud-init would write); the
    first ``start`` of them (default all) started, the others created only.
    Yields the nodes and the network's gateway address (the host, as the nodes see it)."""
    client = docker.from_env(timeout=120)
    name = f"pl-{tag}"
    gateway = f"10.78.{subnet}.1"
    ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=f"10.78.{subnet}.0/24",
                                                                       gateway=gateway)])
    nodes: list[Node] = []
    network = None
    try:
        network = client.networks.create(name, driver="bridge", ipam=ipam,
                                         options={"com.docker.network.bridge.name": f"br-{name}"})
        for i in range(count):
            ip = f"10.78.{subnet}.{11 + i}"
            node_name = f"{name}-{i + 1}"
            volume = client.volumes.create(f"{node_name}-docker")
            container = client.containers.create(
                image, name=node_name, hostname=node_name, detach=True, network=name,
                volumes={volume.name: {"bind": "/var/lib/docker", "mode": "rw"},
                         "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"}},
                **RUN_ARGS)
            # The static address on the network (containers.create takes no IP of its own).
            network.disconnect(container)
            network.connect(container, ipv4_address=ip)
            _put_file(container, "/etc/pleaco/pleaco.toml", config(i, ip))
            nodes.append(Node(node_name, ip, container))
        for node in nodes[:count if start is None else start]:
            node.container.start()
        yield nodes, gateway
    finally:
        for node in nodes:
            with contextlib.suppress(docker.errors.APIError):
                node.container.remove(force=True, v=True)
            with contextlib.suppress(docker.errors.APIError):
                client.volumes.get(f"{node.name}-docker").remove(force=True)
        if network is not None:
            with contextlib.suppress(docker.errors.APIError):
                network.remove()
        client.close()
