"""Node labels and placement constraints on a real two-node cluster: an app constrained to
a label no node has says so; once a node is labelled its replicas run there and nowhere
else; when the label goes they stop and the app says why again."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

from agentproc import REPO, AgentProcess, form_cluster, node_containers, wait_for
from conftest import HELLO

Factory = Callable[..., AgentProcess]


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pleaco", "--api", agent.url, "--token", agent.token, *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def running_on(agents: list[AgentProcess], app: str) -> dict[str, int]:
    return {a.node_id: len(node_containers(a.node_id, app, all_states=False)) for a in agents}


def test_replicas_land_only_on_the_labelled_node(agent_factory: Factory) -> None:
    a, b = form_cluster(agent_factory, 2)
    done = cli(a, "apps", "deploy", "db", "--image", HELLO, "--replicas", "3", "--port", "8080",
               "--constraint", "node.labels.disk==ssd")
    assert done.returncode == 0, done.stderr
    app = wait_for(lambda: (x := a.client.app("db"))["state"] == "unschedulable" and x, 30, "db unschedulable")
    assert "no live node meets node.labels.disk==ssd" in app["message"]
    assert running_on([a, b], "db") == {a.node_id: 0, b.node_id: 0}

    done = cli(a, "nodes", "label", b.data_dir.name, "disk=ssd", "zone=eu")
    assert done.returncode == 0 and "disk=ssd,zone=eu" in done.stdout, done.stderr
    # Every node places alike: b runs all three, a none (asked on b too, to see a's label write arrived).
    wait_for(lambda: running_on([a, b], "db") == {a.node_id: 0, b.node_id: 3}, 90, "3 replicas of db on b only")
    wait_for(lambda: b.client.app("db")["state"] == "running", 60, "db running")
    nodes = json.loads(cli(b, "nodes", "--json").stdout)
    assert {n["name"]: n["labels"] for n in nodes} == {a.data_dir.name: {},
                                                      b.data_dir.name: {"disk": "ssd", "zone": "eu"}}
    assert "disk=ssd,zone=eu" in cli(a, "nodes").stdout

    # An unconstrained app still spreads over both.
    a.client.deploy("web", {"image": HELLO, "replicas": 4, "port": 8080})
    wait_for(lambda: running_on([a, b], "web") == {a.node_id: 2, b.node_id: 2}, 90, "web on both nodes")

    # The label removed: db's replicas go, and the app says why.
    assert cli(b, "nodes", "label", b.node_id[:8], "disk-").returncode == 0
    wait_for(lambda: running_on([a, b], "db") == {a.node_id: 0, b.node_id: 0}, 90, "db's replicas removed")
    wait_for(lambda: a.client.app("db")["state"] == "unschedulable", 30, "db unschedulable again")


def test_bad_labels_and_constraints_change_nothing(agent: AgentProcess) -> None:
    done = cli(agent, "apps", "deploy", "db", "--image", HELLO, "--constraint", "disk==ssd")
    assert done.returncode == 1 and "constraint 'disk==ssd'" in done.stderr
    assert agent.client.apps() == []
    for args, named in [(["disk"], "KEY=VALUE"), (["Disk=ssd"], "'Disk'"), (["disk=s/d"], "'s/d'")]:
        done = cli(agent, "nodes", "label", agent.node_id, *args)
        assert done.returncode == 1 and named in done.stderr, done.stderr
    done = cli(agent, "nodes", "label", "no-such-node", "disk=ssd")
    assert done.returncode == 1 and "no node 'no-such-node'" in done.stderr
    assert [n["labels"] for n in agent.client.nodes()] == [{}]
