"""Hosts in network namespaces on a bridge find each other over mDNS and form one cluster
with no seeds; a partition between them heals into one cluster again."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import netns
import pytest
from agentproc import AgentProcess, side_by_side, wait_for

Factory = Callable[..., AgentProcess]
SECRET = "integration-bootstrap-secret"


# Push-pull is how the two sides of a healed partition find each other again (each round
# also tries one dead member) and catch up on each other's writes: every 30 s by default,
# 15 to 45 s with its jitter, which the partition test would only wait out.
HEALS_SOON = {"PLEACO_GOSSIP_PUSH_PULL_INTERVAL": "3"}


def start_hosts(agent_factory: Factory, hosts: list[netns.Host], secret: str = SECRET,
                env: dict[str, str] | None = None) -> list[AgentProcess]:
    return side_by_side([
        functools.partial(
            agent_factory, h.ns, host=h.ip, prefix=h.prefix, env=env,
            extra_args=["--gossip-listen", f"{h.ip}:7401", "--discovery", "mdns", "--bootstrap", "auto",
                        "--bootstrap-secret", secret, "--proxy-image="],
        )
        for h in hosts
    ])


def alive_everywhere(agents: list[AgentProcess], among: list[AgentProcess] | None = None) -> bool:
    ids = {a.node_id for a in (among or agents)}
    return all({n["id"] for n in a.client.nodes() if n["state"] == "alive"} == ids for a in agents)


def cluster_ids(agents: list[AgentProcess]) -> set[str]:
    out = set()
    for a in agents:
        path = a.data_dir / "cluster.json"
        out.add(json.loads(path.read_text())["cluster_id"] if path.exists() else "")
    return out


def test_three_hosts_bootstrap_one_cluster_over_mdns(agent_factory: Factory) -> None:
    with netns.hosts(4, "md", 61) as hosts:
        agents = start_hosts(agent_factory, hosts[:3])
        wait_for(lambda: alive_everywhere(agents), 60, "3 hosts alive in every host's view")
        ids = cluster_ids(agents)
        assert len(ids) == 1 and "" not in ids, ids
        # The lowest node id founded it; the others joined.
        founder = min(agents, key=lambda a: a.node_id)
        assert "event=cluster.bootstrap_found" in founder.log_path.read_text()
        for a in agents:
            if a is not founder:
                assert "event=cluster.joined" in a.log_path.read_text()
        # A real mDNS client on a fourth host lists all three.
        with avahi_daemon(hosts[3], agents[0].data_dir.parent) as env:
            def listed() -> bool:
                out = avahi_browse(hosts[3], env)
                return all(a.node_id in out for a in agents)

            wait_for(listed, 30, "avahi-browse listing the three nodes")
        # A write on one host is everywhere.
        agents[1].client.deploy("hello", {"image": "pleaco/hello:latest", "replicas": 0})
        wait_for(lambda: all(a.client.apps() for a in agents), 20, "the app on every host")
        for a in agents:
            a.kill()


def test_a_node_without_the_secret_founds_nothing_and_joins_nothing(agent_factory: Factory) -> None:
    with netns.hosts(3, "mx", 62) as hosts:
        agents = start_hosts(agent_factory, hosts[:2])
        wait_for(lambda: alive_everywhere(agents), 60, "2 hosts in one cluster")
        stranger = start_hosts(agent_factory, hosts[2:], secret="some-other-secret")[0]
        wait_for(lambda: "event=cluster.join_failed" in stranger.log_path.read_text(), 30, "the stranger refused")
        assert all(stranger.node_id not in {n["id"] for n in a.client.nodes()} for a in agents)
        for a in [*agents, stranger]:
            a.kill()


def test_partition_keeps_both_sides_writable_and_heals(agent_factory: Factory) -> None:
    with netns.hosts(5, "mp", 63) as hosts:
        agents = start_hosts(agent_factory, hosts, env=HEALS_SOON)
        wait_for(lambda: alive_everywhere(agents), 90, "5 hosts in one cluster")
        left, right = agents[:2], agents[2:]

        def sees_dead(side: list[AgentProcess], other: list[AgentProcess]) -> bool:
            return all({n["id"]: n["state"] for n in a.client.nodes()}.get(o.node_id) == "dead"
                       for a in side for o in other)

        with netns.partition(hosts[:2], hosts[2:]):
            wait_for(lambda: sees_dead(left, right) and sees_dead(right, left), 120, "each side sees the other dead")
            # Both sides keep accepting writes.
            left[0].client.deploy("left", {"image": "pleaco/hello:latest", "replicas": 0})
            right[1].client.deploy("right", {"image": "pleaco/hello:latest", "replicas": 0})
            wait_for(lambda: all({x["name"] for x in a.client.apps()} == {"left"} for a in left), 60, "left write")
            wait_for(lambda: all({x["name"] for x in a.client.apps()} == {"right"} for a in right), 60, "right write")
        wait_for(lambda: alive_everywhere(agents), 180, "the partition healed into one cluster")
        wait_for(lambda: all({x["name"] for x in a.client.apps()} == {"left", "right"} for a in agents), 90,
                 "both sides' writes on every host, none lost")
        for a in agents:
            a.kill()


@contextlib.contextmanager
def avahi_daemon(host: netns.Host, workdir: Path) -> Iterator[dict[str, str]]:
    """A real avahi-daemon on one test host (its own namespace, IPv4, eth0 only) on a D-Bus
    of its own; yields the environment avahi-browse needs to reach it.

    Nothing is shared with the machine's own dbus or avahi-daemon, which may or may not run
    (installing the packages starts them on some machines): a private bus, and a tmpfs over
    /run/avahi-daemon in the namespace's mount namespace for the daemon's pid file."""
    for tool in ("avahi-daemon", "avahi-browse", "dbus-daemon"):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: `make test` installs avahi-daemon, avahi-utils and dbus")
    bus = workdir / "dbus.sock"
    bus_conf = workdir / "dbus.conf"
    bus_conf.write_text(f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={bus}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/><allow own="*"/><allow send_destination="*"/><allow receive_sender="*"/>
  </policy>
</busconfig>
""")
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={bus}"}
    conf = workdir / "avahi-daemon.conf"
    conf.write_text("[server]\nuse-ipv4=yes\nuse-ipv6=no\nallow-interfaces=eth0\n[publish]\npublish-workstation=no\n")
    log = workdir / "avahi-daemon.log"
    with contextlib.ExitStack() as stack:
        dbus = subprocess.Popen(["dbus-daemon", f"--config-file={bus_conf}", "--nofork", "--nopidfile"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(_stop, dbus)
        wait_for(bus.exists, 10, "the test's dbus-daemon listens")
        script = ("mkdir -p /run/avahi-daemon && mount -t tmpfs tmpfs /run/avahi-daemon && "
                  f"exec avahi-daemon -f {conf} --no-drop-root --no-chroot --no-rlimits")
        with log.open("wb") as out:
            daemon = subprocess.Popen([*host.prefix, "sh", "-c", script], env=env, stdout=out, stderr=out)
        stack.callback(_stop, daemon)
        wait_for(lambda: daemon.poll() is not None or b"Server startup complete" in log.read_bytes(), 20,
                 "avahi-daemon starts")
        assert daemon.poll() is None, f"avahi-daemon exited: {log.read_text()}"
        yield env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def avahi_browse(host: netns.Host, env: dict[str, str]) -> str:
    """List _pleaco._tcp with avahi-browse, a real mDNS client, from one of the hosts."""
    out = subprocess.run([*host.prefix, "avahi-browse", "-rpt", "_pleaco._tcp"], capture_output=True, text=True,
                         timeout=30, env=env)
    return out.stdout
