"""The autoscaler with real parts: an agent with its proxy (a real Caddy container), an app
whose every request takes a second (a busybox httpd CGI that sleeps), and an open-loop load
generator through the proxy. Concurrency is the metric: at 7 requests/s of 1 s each, 7
requests are in flight whatever the replica count, so at a target of 2 per replica the app
needs 4 replicas, deterministically. Short windows (6 s stable, 2 s panic) come from the
policy, the short load interval and tick from the agent's env config."""

from __future__ import annotations

import itertools
import json
import subprocess
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from agentproc import REPO, AgentProcess, alive_ids, free_port, states, wait_for
from proxyload import Load
from test_cli import cli
from test_proxy import start_proxied

from pleaco.placement import app_owner

SLOW = "pleaco-test/slow:latest"
HOST = "slow.pleaco.internal"
POLICY = {"min_replicas": 1, "max_replicas": 6, "metric": "concurrency", "target": 2, "stable_window": 6,
          "panic_window": 2}


@pytest.fixture(scope="module", autouse=True)
def slow_image() -> None:
    # examples/slow: /cgi-bin/slow answers after a second (the benchmark builds the same).
    subprocess.run(["docker", "build", "-q", "-t", SLOW, str(REPO / "examples" / "slow")], check=True,
                   capture_output=True,
                   env={"DOCKER_BUILDKIT": "0", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"})


def metrics(agent: AgentProcess) -> dict[str, float]:
    req = urllib.request.Request(agent.url + "/metrics", headers={"Authorization": f"Bearer {agent.token}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_replicas_follow_a_load_step_up_and_back_down_with_no_failed_request(
        agent_factory: Callable[..., AgentProcess]) -> None:
    p = start_proxied(agent_factory, "as", env={"PLEACO_PROXY_LOAD_INTERVAL": "0.5",
                                                "PLEACO_AUTOSCALE_INTERVAL": "0.5"})
    client = p.agent.client
    client.deploy("slow", {"image": SLOW, "port": 8080, "health": "/healthz"})
    wait_for(lambda: p.get(HOST, "/cgi-bin/slow")[0] == 200, 60, "slow through the proxy")
    shown = client.autoscale("slow", POLICY)
    assert shown["autoscaler"] == {"panic": False, "decided_by": None, "decisions": []}
    # Idle: nothing to decide, one replica.
    idle = wait_for(lambda: (a := client.app("slow"))["autoscaler"]["figures"]["samples"] >= 4 and a, 30,
                    "the autoscaler to sample the idle app")
    assert idle["replicas"] == 1 and idle["autoscaler"]["decisions"] == []

    # 8 requests/s of 1 s each: 8 in flight, 4 replicas at 2 each. (7, 3.5 replicas' worth,
    # was measured at 6.5-6.6 on a loaded machine: within the 10 % band of 3 replicas, which
    # then took the 4th only through the stable window.)
    with Load(f"http://127.0.0.1:{p.http}/cgi-bin/slow", HOST, rate=8, max_seconds=120) as load:
        up = wait_for(lambda: (a := client.app("slow"))["replicas"] >= 4 and a["healthy"] >= 4 and a, 90,
                      "4 healthy replicas under the load")
        # The load goes on: the panic ends (a stable window without a surge) and the count
        # stays, 8 in flight being what 4 replicas serve at 2 each.
        calm = wait_for(lambda: (a := client.app("slow"))["autoscaler"]["panic"] is False and a, 60,
                        "the panic to end under the steady load")
        assert calm["replicas"] >= 4 and calm["autoscaler"]["decisions"][-1]["to"] >= 4
        result = load.stop()
    assert result.failures == [], result.failures[:5]
    assert result.ok > 0
    # Up in panic (entered at 2x what the current replicas serve), possibly in steps while
    # the 2 s panic average climbs with the load; never down while it lasts.
    ups = up["autoscaler"]["decisions"]
    first = ups[0]
    assert first["from"] == 1 and first["to"] > 1 and first["reason"].startswith("panic"), ups
    assert all(d["panic"] and d["to"] > d["from"] for d in ups), ups
    assert ups[-1]["to"] == up["replicas"] and all(d["node"] == p.agent.node_id[:12] for d in ups)
    m = metrics(p.agent)
    assert m['pleaco_autoscale_decisions_total{app="slow",direction="up"}'] >= 1
    assert m['pleaco_autoscale_desired_replicas{app="slow"}'] >= 4
    assert m['pleaco_autoscale_metric{app="slow",metric="concurrency"}'] > 0

    # The load stops: after the panic ends (a stable window without a surge) the count goes
    # down, at most halving per stable window, to the minimum.
    down = wait_for(lambda: (a := client.app("slow"))["replicas"] == 1 and a, 120, "the scale-down to 1")
    decisions: list[dict[str, Any]] = down["autoscaler"]["decisions"]
    assert decisions[-1]["to"] == 1 and decisions[-1]["from"] > 1
    assert all(d["reason"] for d in decisions)
    assert any("average" in d["reason"] for d in decisions if d["to"] < d["from"])
    assert down["autoscaler"]["panic"] is False
    wait_for(lambda: client.app("slow")["running"] == 1, 60, "the extra replicas stopped")
    # apps show prints the metric, the windows and the decisions with their reasons.
    out = cli(p.agent, "apps", "show", "slow")
    assert out.returncode == 0, out.stderr
    assert "concurrency target 2 per replica, windows 6s stable / 2s panic" in out.stdout
    assert "metric     concurrency" in out.stdout
    for d in decisions:  # the last few (the record keeps at most 5), newest first
        assert f"{d['from']} -> {d['to']} on {d['node']}: {d['reason']}" in out.stdout
    as_json = json.loads(cli(p.agent, "apps", "show", "slow", "--json").stdout)
    assert as_json["autoscaler"]["decisions"][-1] == decisions[-1]


def test_scale_to_zero_when_idle_a_request_then_gets_a_503_and_wakes_the_app(
        agent_factory: Callable[..., AgentProcess]) -> None:
    """An idle app with min 0 goes to 0 replicas after its idle window, and stays there (the
    traffic from before the idle window does not bring it back). Without an activator
    ([proxy] activator_listen empty; with one, see test_activator.py) the proxy answers a
    request for an app at zero at once with a 503 naming it; that request is traffic the
    proxy reports, so the autoscaler starts a replica, and requests succeed once it is
    healthy."""
    p = start_proxied(agent_factory, "zero", env={"PLEACO_PROXY_LOAD_INTERVAL": "0.5",
                                                  "PLEACO_AUTOSCALE_INTERVAL": "0.5",
                                                  "PLEACO_PROXY_ACTIVATOR_LISTEN": ""})
    client = p.agent.client
    client.deploy("slow", {"image": SLOW, "port": 8080, "health": "/healthz"})
    # The polls below are the app's traffic: at most 2 requests a second (a poll every
    # 0.5 s), under the target of 5 per replica, so 1 replica serves it (polled every
    # 0.1 s they were up to 10/s, 2 replicas' worth, and the app went 1 -> 2 first).
    wait_for(lambda: p.get(HOST, "/healthz")[0] == 200, 60, "slow through the proxy", interval=0.5)
    # Requests per second: a 503 takes no time, so it shows as a request, not as concurrency.
    client.autoscale("slow", {**POLICY, "metric": "rps", "target": 5, "min_replicas": 0, "scale_to_zero_after": 3})
    # Some traffic the autoscaler sees, then none: the idle window (3 s) is shorter than the
    # stable window (6 s), which still holds this traffic when the app goes to zero.
    wait_for(lambda: p.get(HOST, "/healthz")[0] == 200 and client.app("slow")["autoscaler"]["figures"]["value"],
             30, "the autoscaler to see the traffic", interval=0.5)
    zero = wait_for(lambda: (a := client.app("slow"))["replicas"] == 0 and a, 60, "the scale to zero")
    last = zero["autoscaler"]["decisions"][-1]
    assert (last["from"], last["to"]) == (1, 0) and "scale to zero" in last["reason"]
    assert zero["state"] == "stopped"
    wait_for(lambda: client.app("slow")["running"] == 0, 60, "the replica stopped")
    # Idle at zero: it stays there, over more than a stable window of the autoscaler's ticks.
    ticks = 'pleaco_reconcile_runs_total{loop="autoscale",result="ok"}'
    start = metrics(p.agent)[ticks]
    wait_for(lambda: metrics(p.agent)[ticks] >= start + 16, 30, "8 s of autoscaler ticks")
    still = client.app("slow")
    assert still["replicas"] == 0 and still["autoscaler"]["decisions"][-1] == last, still["autoscaler"]
    status, body, _ = p.get(HOST, "/healthz")
    assert (status, body) == (503, "no healthy replica of slow\n")
    woken = wait_for(lambda: (a := client.app("slow"))["replicas"] == 1 and a, 30, "the 503's traffic to wake the app")
    assert (woken["autoscaler"]["decisions"][-1]["from"], woken["autoscaler"]["decisions"][-1]["to"]) == (0, 1)
    assert "at zero replicas" in woken["autoscaler"]["decisions"][-1]["reason"]
    wait_for(lambda: p.get(HOST, "/cgi-bin/slow")[0] == 200, 60, "a request answered by the new replica")


def test_the_next_owner_continues_deciding_when_the_owner_dies_under_load(
        agent_factory: Callable[..., AgentProcess]) -> None:
    """Three agents, each with its proxy; the load goes through a node that does not own the
    app. The owner scales the app up and is killed; the next owner (which sampled all along)
    continues: it takes the app down when the load stops. The decisions form one chain
    (each starts from the count the one before left), by the two owners only."""
    env = {"PLEACO_PROXY_LOAD_INTERVAL": "0.5", "PLEACO_AUTOSCALE_INTERVAL": "0.5"}

    def gossip(k: int) -> list[str]:
        return ["--gossip-listen", f"127.0.0.{k}:{free_port()}", "--discovery", "seeds"]

    first = start_proxied(agent_factory, "fo0", gossip(2), env=env)
    first.agent.client.request("POST", "/v1/cluster/init")
    token = first.agent.client.request("GET", "/v1/cluster/token")["token"]
    nodes = [first] + [start_proxied(agent_factory, f"fo{i}", [*gossip(i + 2), "--join-token", token], env=env)
                       for i in (1, 2)]
    ids = {p.agent.node_id for p in nodes}
    wait_for(lambda: all(alive_ids(p.agent) == ids for p in nodes), 60, "3 nodes alive everywhere")
    by_id = {p.agent.node_id: p for p in nodes}
    owner = by_id[app_owner("slow", sorted(ids))]
    survivors = [p for p in nodes if p is not owner]
    next_owner = by_id[app_owner("slow", sorted(p.agent.node_id for p in survivors))]
    entry = next(p for p in survivors if p is not next_owner)  # the load comes in through neither owner
    client = entry.agent.client
    client.deploy("slow", {"image": SLOW, "port": 8080, "health": "/healthz"})
    wait_for(lambda: entry.get(HOST, "/healthz")[0] == 200, 90, "slow through the entry node's proxy")
    client.autoscale("slow", POLICY)

    with Load(f"http://127.0.0.1:{entry.http}/cgi-bin/slow", HOST, rate=8, max_seconds=150) as load:
        up = wait_for(lambda: (a := client.app("slow"))["replicas"] >= 4 and a["autoscaler"]["decisions"]
                      and a["autoscaler"]["decisions"][-1]["to"] == a["replicas"] and a, 90, "the owner's scale-up")
        assert up["autoscaler"]["decided_by"] == owner.agent.node_id
        # The next owner sampled the app all along.
        assert next_owner.agent.client.app("slow")["autoscaler"]["figures"]["samples"] > 4
        owner.agent.kill()
        wait_for(lambda: all(states(p.agent)[owner.agent.node_id] == "dead" for p in survivors), 60,
                 "the owner declared dead")
        load.stop()
    # The count and the decision record are written in one transaction but replicate as two
    # records: wait for both.
    down = wait_for(lambda: (a := client.app("slow"))["replicas"] == 1
                    and a["autoscaler"]["decisions"][-1]["to"] == 1 and a, 120, "the next owner's scale-down")
    assert down["autoscaler"]["decided_by"] == next_owner.agent.node_id
    decisions = down["autoscaler"]["decisions"]
    assert decisions[-1]["node"] == next_owner.agent.node_id[:12] and decisions[-1]["to"] == 1
    assert {d["node"] for d in decisions} <= {owner.agent.node_id[:12], next_owner.agent.node_id[:12]}
    assert all(b["from"] == a["to"] for a, b in itertools.pairwise(decisions)), decisions
    # The next owner wrote its decisions; the third node none.
    assert metrics(entry.agent).get('pleaco_autoscale_decisions_total{app="slow",direction="down"}', 0) == 0
    assert metrics(next_owner.agent)['pleaco_autoscale_decisions_total{app="slow",direction="down"}'] >= 1
