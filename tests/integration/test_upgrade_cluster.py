"""Cluster upgrades with real agents run from their own slots: three nodes rolled from
0.2.0 to 0.3.0 one at a time with the API answering throughout and no app container
restarted; a 0.4.0 whose agent fails its health check rolled back by itself on the first
node, which stops the rollout; a single agent upgraded the same way (a plan of one); and
bad bundles refused by POST /v1/upgrade, changing nothing.

The bundles are this tree at those versions (0.4.0 patched so /healthz answers 503), built
once for the session (slotagents.ReleaseKit); the start versions are installed once and
linked into each node's slot root, the upgrades install into each node's own root for real."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentproc import REPO, node_containers, wait_for
from conftest import HELLO
from slotagents import Availability, ReleaseKit, Releases, SlotAgent, form_slot_cluster

from pleaco.host.slots import Slots

pytestmark = pytest.mark.docker

# (name, start version, extra agent flags[, health deadline]) -> a started agent
MakeAgent = Callable[..., SlotAgent]


@pytest.fixture(scope="module")
def releases(release_kit: ReleaseKit) -> Releases:
    bundles = release_kit.bundles(["0.2.0", "0.3.0", "0.4.0-healthz503"])
    return Releases(release_kit, {"0.2.0": bundles["0.2.0"], "0.3.0": bundles["0.3.0"],
                                  "0.4.0": bundles["0.4.0-healthz503"]})


@pytest.fixture
def slot_agents(tmp_path: Path, releases: Releases) -> Iterator[MakeAgent]:
    agents: list[SlotAgent] = []

    def make(name: str, version: str, extra: list[str], health_deadline: float = 20.0) -> SlotAgent:
        root = releases.root_at(tmp_path / f"{name}-root", version)
        agent = SlotAgent(root, tmp_path / name, releases.public_key, extra, health_deadline)
        agents.append(agent)
        return agent.start()

    yield make
    for agent in agents:
        print(f"==== {agent.data_dir.name} ====\n{agent.log_tail()}")
        agent.cleanup()


def cli(agent: SlotAgent, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The pleaco CLI of this tree against ``agent``, as a user runs it."""
    # --token=T: a token may start with "-", which argparse takes for an option otherwise.
    return subprocess.run([sys.executable, "-m", "pleaco", "--api", agent.url, f"--token={agent.client.token}",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def app_containers(agents: list[SlotAgent]) -> dict[str, str]:
    """Every app container of the nodes: id -> StartedAt."""
    out = {}
    for a in agents:
        for c in node_containers(a.node_id, "web"):
            c.reload()  # listed sparse: its state comes with the full inspect
            out[c.id] = c.attrs["State"]["StartedAt"]
    return out


def test_three_nodes_upgrade_one_at_a_time_and_nothing_of_the_apps_restarts(
        slot_agents: MakeAgent, releases: Releases) -> None:
    agents = form_slot_cluster(lambda name, extra: slot_agents(name, "0.2.0", extra), 3)
    origin = agents[0]
    origin.client.deploy("web", {"image": HELLO, "replicas": 3, "port": 8080, "health": "/healthz"})
    wait_for(lambda: origin.client.app("web")["healthy"] == 3, 90, "3 healthy replicas")
    before = app_containers(agents)
    assert len(before) == 3

    with Availability(agents) as api:
        done = cli(origin, "upgrade", "--bundle", str(releases.bundles["0.3.0"]))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done: every node runs 0.3.0" in done.stdout

    # One node at a time, the origin (the node asked) last: the others restarted before it.
    status = json.loads(cli(origin, "upgrade", "status", "--json").stdout)
    assert status["status"] == "done" and status["plan"]["order"][-1] == origin.node_id
    assert status["plan"]["order"][:2] == sorted(a.node_id for a in agents[1:])
    # The cluster's API answered throughout: in every round of polls some node did.
    assert api.rounds and api.rounds_with_none() == 0, [up for _, up in api.rounds if not any(up)]
    nodes = json.loads(cli(origin, "nodes", "--json").stdout)
    assert {n["version"] for n in nodes} == {"0.3.0"} and len(nodes) == 3
    assert {(n["upgrade"] or {}).get("phase") for n in nodes} == {"confirmed"}
    for a in agents:
        assert Slots(a.root).current() == "0.3.0" and a.version() == "0.3.0"
    # Adopted, not restarted: the same containers, started at the same time.
    assert app_containers(agents) == before
    table = cli(origin, "nodes").stdout
    assert "UPGRADE" in table and "confirmed 0.3.0" in table


def test_a_release_that_fails_its_health_check_rolls_back_and_stops_the_rollout(
        slot_agents: MakeAgent, releases: Releases) -> None:
    # A short health deadline: the broken release never passes, the test waits it out.
    agents = form_slot_cluster(lambda name, extra: slot_agents(name, "0.3.0", extra, 8.0), 3)
    origin = agents[0]
    first = min(agents[1:], key=lambda a: a.node_id)
    failed = cli(origin, "upgrade", "--bundle", str(releases.bundles["0.4.0"]))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"failed on node {first.node_id[:12]}" in failed.stderr

    status = origin.client.request("GET", "/v1/upgrade")
    assert status["status"] == "failed" and status["failed_node"] == first.node_id
    assert "not healthy" in status["reason"] and "0.4.0" in status["reason"]
    states = {n["id"]: n["state"] for n in status["nodes"]}
    assert states[first.node_id] == "failed"
    assert [states[a.node_id] for a in agents if a is not first] == ["waiting", "waiting"]
    # The first node is back on 0.3.0 by itself; the others never left it.
    wait_for(lambda: first.version() == "0.3.0", 60, "the first node answering on 0.3.0 again")
    assert Slots(first.root).current() == "0.3.0"
    for a in agents:
        assert a.version() == "0.3.0" and Slots(a.root).current() == "0.3.0"
    nodes = {n["id"]: n for n in origin.client.nodes()}
    assert nodes[first.node_id]["upgrade"]["phase"] == "rolled_back"
    assert all(nodes[a.node_id]["upgrade"] is None for a in agents if a is not first)


def _rewrite(src: Path, dst: Path, change: Callable[[str, bytes], bytes]) -> Path:
    """A copy of the bundle ``src`` with each member's bytes passed through ``change``."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for member in tin.getmembers():
            f = tin.extractfile(member)
            assert f is not None
            data = change(member.name, f.read())
            member.size = len(data)
            tout.addfile(member, io.BytesIO(data))
    return dst


def test_bad_bundles_are_refused_and_change_nothing(
        slot_agents: MakeAgent, releases: Releases, tmp_path: Path) -> None:
    agent = slot_agents("solo", "0.3.0", ["--proxy-image=", "--discovery", "none"])
    good = releases.bundles["0.4.0"]

    def flip_last_byte(data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1])

    raw = good.read_bytes()
    (tmp_path / "truncated.bundle").write_bytes(raw[: len(raw) // 2])
    bad = {
        "signature": _rewrite(good, tmp_path / "badsig.bundle",
                              lambda n, d: flip_last_byte(d) if n == "manifest.sig" else d),
        "digest": _rewrite(good, tmp_path / "baddigest.bundle",
                           lambda n, d: flip_last_byte(d) if n.startswith("wheels/pleaco-") else d),
        "older": releases.bundles["0.2.0"],
        "truncated": tmp_path / "truncated.bundle",
    }
    before = (agent.client.request("GET", "/v1/nodes"), sorted(p.name for p in (agent.data_dir).iterdir()))
    for what, path in bad.items():
        out = cli(agent, "upgrade", "--bundle", str(path), "--no-wait")
        assert out.returncode == 1, (what, out.stdout, out.stderr)
        assert out.stderr.startswith("error: bundle refused: "), (what, out.stderr)
        # The status code itself, through the API.
        req = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                              "--data-binary", f"@{path}", "-H", f"Authorization: Bearer {agent.client.token}",
                              f"{agent.url}/v1/upgrade"], capture_output=True, text=True, timeout=60)
        assert req.stdout == "400", (what, req.stdout)
    assert agent.client.request("GET", "/v1/upgrade")["plan"] is None  # no plan record
    assert agent.version() == "0.3.0" and Slots(agent.root).current() == "0.3.0"
    assert Slots(agent.root).versions() == ["0.3.0"]
    after = (agent.client.request("GET", "/v1/nodes"), sorted(p.name for p in (agent.data_dir).iterdir()))
    assert [n["upgrade"] for n in after[0]] == [n["upgrade"] for n in before[0]] == [None]
    assert after[1] == before[1]  # no plan mark or upgrade state left in the data dir
    assert not any((agent.data_dir / "upgrades").iterdir())  # and no bundle, whole or partial


def test_a_single_agent_upgrades_the_same_way(slot_agents: MakeAgent, releases: Releases) -> None:
    agent = slot_agents("single", "0.2.0", ["--proxy-image=", "--discovery", "none"])
    agent.client.deploy("web", {"image": HELLO, "replicas": 1, "port": 8080, "health": "/healthz"})
    wait_for(lambda: agent.client.app("web")["healthy"] == 1, 60, "1 healthy replica")
    before = app_containers([agent])
    done = cli(agent, "upgrade", "--bundle", str(releases.bundles["0.3.0"]))
    assert done.returncode == 0, done.stdout + done.stderr
    # A plan of one: the node asked, which keeps the bundle, follows its own restart.
    assert "1 node(s)" in done.stdout and "done: every node runs 0.3.0" in done.stdout
    status = agent.client.request("GET", "/v1/upgrade")
    assert status["plan"]["order"] == [agent.node_id] and status["status"] == "done"
    assert agent.version() == "0.3.0" and Slots(agent.root).current() == "0.3.0"
    assert app_containers([agent]) == before
