"""The host-wide registry of agents' addresses: overlaps, dead entries, namespaces, races."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pleaco.host.addresses import AddressInUse, AddressRegistry, AgentEntry, Listener


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("127.0.0.1:80", "127.0.0.1:80", True),
        ("0.0.0.0:80", "127.0.0.1:80", True),  # the wildcard takes every address's port
        ("127.0.0.1:80", "[::]:80", True),
        ("localhost:2019", "127.0.0.1:2019", True),
        ("127.0.0.2:80", "127.0.0.3:80", False),  # two loopback addresses, one port each
        ("0.0.0.0:80", "0.0.0.0:81", False),
        ("[::1]:80", "[0:0::1]:80", True),
        ("nonsense", "0.0.0.0:80", False),
    ],
)
def test_listeners_overlap_when_one_bind_would_take_the_others_port(a: str, b: str, overlap: bool) -> None:
    assert Listener("x", a).overlaps(Listener("y", b)) is overlap
    assert Listener("y", b).overlaps(Listener("x", a)) is overlap


def other_agent_entry(directory: Path, pid: int, started: str, listeners: list[Listener], data_dir: str) -> None:
    entry = AgentEntry(pid, started, os.readlink("/proc/self/ns/net"), data_dir, tuple(listeners))
    (directory / f"{pid}.json").write_text(entry.to_json())


def start_time(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def test_a_live_agent_on_an_overlapping_address_is_named(tmp_path: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            other_agent_entry(tmp_path, other.pid, start_time(other.pid),
                              [Listener("proxy admin", "127.0.0.1:2019")], "/var/lib/first")
            registry = AddressRegistry(tmp_path)
            with pytest.raises(AddressInUse) as err:
                registry.claim([Listener("api", "127.0.0.1:7400"), Listener("proxy admin", "localhost:2019")],
                               tmp_path / "mine")
            assert str(err.value) == (
                f"proxy admin address localhost:2019 is in use by another agent on this host (pid {other.pid}, "
                "data dir /var/lib/first, its proxy admin on 127.0.0.1:2019); stop it first, or give this agent "
                "its own address")
            assert not (tmp_path / f"{os.getpid()}.json").exists()  # refused: nothing recorded
            # Elsewhere, no clash: the claim is recorded, and released.
            registry.claim([Listener("proxy admin", "127.0.0.1:2020")], tmp_path / "mine")
            mine = json.loads((tmp_path / f"{os.getpid()}.json").read_text())
            assert mine["data_dir"] == str(tmp_path / "mine")
            registry.release()
            assert not (tmp_path / f"{os.getpid()}.json").exists()
        finally:
            other.kill()


def test_dead_agents_and_reused_pids_and_other_namespaces_do_not_block(tmp_path: Path) -> None:
    taken = [Listener("gossip", "0.0.0.0:7401")]
    with subprocess.Popen([sys.executable, "-c", "pass"]) as dead:
        dead.wait()
    other_agent_entry(tmp_path, dead.pid, "1", taken, "/dead")  # killed -9: its file was left
    other_agent_entry(tmp_path, 1, "not-init's-start-time", taken, "/reused")  # pid 1 lives, but is not that agent
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        try:
            entry = AgentEntry(live.pid, start_time(live.pid), "net:[1]", "/elsewhere", tuple(taken))
            (tmp_path / f"{live.pid}.json").write_text(entry.to_json())  # another network namespace
            AddressRegistry(tmp_path).claim(taken, tmp_path / "mine")
        finally:
            live.kill()
    assert not (tmp_path / f"{dead.pid}.json").exists() and not (tmp_path / "1.json").exists()  # swept
    assert (tmp_path / f"{os.getpid()}.json").exists()
