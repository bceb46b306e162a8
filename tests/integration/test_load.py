"""Cluster-wide load with real parts: two clustered agents, each with its own proxy (real
Caddy containers on their own ports), a real app, real HTTP on 127.0.0.1. Traffic through one
node's proxy shows in the other node's figure for the app, by gossip."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from typing import Any

from agentproc import AgentProcess, free_port, wait_for
from conftest import HELLO
from proxyload import Load
from test_proxy import Proxied, start_proxied


def load_of(p: Proxied, app: str) -> dict[str, Any] | None:
    load: dict[str, Any] | None = p.agent.client.request("GET", f"/v1/apps/{app}")["load"]
    return load


def metrics(p: Proxied) -> dict[str, float]:
    req = urllib.request.Request(p.agent.url + "/metrics", headers={"Authorization": f"Bearer {p.agent.token}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


def test_traffic_through_one_nodes_proxy_shows_in_the_other_nodes_cluster_figure(
        agent_factory: Callable[..., AgentProcess]) -> None:
    def gossip(k: int) -> list[str]:
        return ["--gossip-listen", f"127.0.0.{k}:{free_port()}", "--discovery", "seeds"]

    env = {"PLEACO_PROXY_LOAD_INTERVAL": "0.5"}  # short in tests: figures move sooner
    a = start_proxied(agent_factory, "load0", gossip(2), env=env)
    a.agent.client.request("POST", "/v1/cluster/init")
    token = a.agent.client.request("GET", "/v1/cluster/token")["token"]
    b = start_proxied(agent_factory, "load1", [*gossip(3), "--join-token", token], env=env)
    ids = {a.agent.node_id, b.agent.node_id}
    wait_for(lambda: all({n["id"] for n in p.agent.client.nodes() if n["state"] == "alive"} == ids for p in (a, b)),
             40, "2 nodes alive everywhere")
    a.agent.client.deploy("web", {"image": HELLO, "port": 8080, "health": "/healthz", "replicas": 2})
    wait_for(lambda: a.get("web.pleaco.internal")[0] == 200, 60, "web through A's proxy")
    # Before the load (a few requests made sure A routes): the replicas are counted.
    wait_for(lambda: (x := load_of(b, "web")) is not None and x["replicas"] == 2, 30, "B to see web's 2 replicas")

    with Load(f"http://127.0.0.1:{a.http}/", "web.pleaco.internal", rate=40, max_seconds=60) as load:
        seen = wait_for(lambda: (x := load_of(b, "web")) is not None and x["rps"] >= 20 and x, 30,
                        "A's traffic in B's cluster-wide figure")
        assert seen["p50_ms"] is not None and seen["p99_ms"] >= seen["p50_ms"] and seen["concurrency"] > 0
        assert seen["nodes"] == 2 and seen["age_s"] < 10 and seen["replicas"] == 2
        gauges = wait_for(lambda: (m := metrics(b)).get('pleaco_app_requests_per_second{app="web"}', 0) >= 20 and m,
                          30, "B's /metrics")
        assert gauges['pleaco_app_concurrency{app="web"}'] > 0
        result = load.stop()
    assert result.failures == [], result.failures[:5]
    # B's own proxy saw none of it: the figure is A's, by gossip.
    assert metrics(b).get('pleaco_app_requests_total{app="web",code="2xx"}', 0) == 0
    # The load stops: the figure goes back to 0 everywhere (a report of zeros, not a stale entry).
    wait_for(lambda: (x := load_of(b, "web")) is not None and x["rps"] == 0, 30, "B to see the traffic stop")
    # Replicas' CPU and memory come from their cgroups, per replica, on the node that runs them.
    m = metrics(a) | metrics(b)
    assert sum(v for k, v in m.items() if k.startswith('pleaco_replica_memory_bytes{app="web"')) > 0
