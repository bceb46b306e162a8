"""Test hosts on one machine: network namespaces joined by veth pairs to a bridge.

The bridge gets the first address of the subnet in the root namespace, so the test can
reach the hosts' APIs; the hosts get the next ones. Docker's FORWARD policy drops bridged
traffic it does not know, so a rule lets the bridge talk to itself. Everything made here
is removed again, also when the test fails.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Host:
    ns: str
    ip: str
    veth: str

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.ns]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def hosts(count: int, tag: str, subnet: int) -> Iterator[list[Host]]:
    """``count`` hosts on bridge ``pl{tag}`` in 10.77.SUBNET.0/24 (a network of our own)."""
    bridge = f"pl{tag}"
    made: list[Host] = []
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
    try:
        _ip("link", "add", bridge, "type", "bridge")
        with open(f"/sys/class/net/{bridge}/bridge/multicast_snooping", "w") as f:
            f.write("0")  # mDNS must reach every port
        _ip("addr", "add", f"10.77.{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
        for i in range(count):
            host = Host(f"{bridge}h{i}", f"10.77.{subnet}.{i + 2}", f"{bridge}v{i}")
            _ip("netns", "add", host.ns)
            made.append(host)
            _ip("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
            _ip("link", "set", host.veth, "master", bridge)
            _ip("link", "set", host.veth, "up")
            _ip("-n", host.ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _ip("-n", host.ns, "link", "set", "eth0", "up")
            _ip("-n", host.ns, "link", "set", "lo", "up")
            _ip("-n", host.ns, "route", "add", "224.0.0.0/4", "dev", "eth0")
        yield made
    finally:
        for host in made:
            subprocess.run(["ip", "netns", "del", host.ns], capture_output=True)
        subprocess.run(["iptables", "-D", *rule], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


@contextlib.contextmanager
def partition(left: list[Host], right: list[Host]) -> Iterator[None]:
    """Drop every frame the bridge would forward between the two groups (a 2 | 3 split),
    while the root namespace still reaches every host; heal on exit."""
    rules = [["FORWARD", "-m", "physdev", "--physdev-in", a.veth, "--physdev-out", b.veth, "-j", "DROP"]
             for x, y in ((left, right), (right, left)) for a in x for b in y]
    try:
        for rule in rules:
            subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
        yield
    finally:
        for rule in rules:
            subprocess.run(["iptables", "-D", *rule], capture_output=True)
