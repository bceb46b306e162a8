"""The activator with real parts: an agent with its proxy (a real Caddy container) and the
sample app (pleaco/hello) autoscaled with scale to zero. Once the app is at 0 replicas a
request through the proxy is held by the activator, wakes the app and is answered by its
first replica (200 with the app's body); the cold start (request sent to first byte) is
printed. Then N concurrent requests above [proxy] activator_max_held: the held ones are
answered by the app, the others get the activator's clear 503 at once. Short windows come
from the policy, the short load interval and tick from the agent's env config."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from agentproc import AgentProcess, alive_ids, free_port, wait_for
from conftest import HELLO
from test_autoscale import metrics
from test_cli import cli
from test_proxy import Proxied, routes, start_proxied

HOST = "hello.pleaco.internal"
MAX_HELD = 3
POLICY = {"min_replicas": 0, "max_replicas": 2, "metric": "concurrency", "target": 10, "stable_window": 4,
          "panic_window": 2, "scale_to_zero_after": 2}


@dataclass(frozen=True)
class Answer:
    status: int
    body: str
    headers: dict[str, str]
    first_byte: float  # seconds from sending the request to its status line


def timed_get(p: Proxied, path: str = "/", timeout: float = 60) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", p.http, timeout=timeout)
    try:
        start = time.monotonic()
        conn.request("GET", path, headers={"Host": HOST})
        resp = conn.getresponse()
        first = time.monotonic() - start
        return Answer(resp.status, resp.read().decode(), dict(resp.getheaders()), first)
    finally:
        conn.close()


def at_zero(p: Proxied) -> dict[str, Any]:
    """Wait for the scale to zero: count 0, no container left, the proxy routes none."""
    client = p.agent.client
    app: dict[str, Any] = wait_for(lambda: (a := client.app("hello"))["replicas"] == 0 and a, 60,
                                   "the scale to zero")
    # Gone, not only out of the count: the first request then waits for a new container.
    wait_for(lambda: client.app("hello")["instances"] == [], 60, "the replica removed")
    wait_for(lambda: routes(p).get(HOST) == [], 30, "the proxy to route no replica")
    return app


def test_a_request_to_an_app_at_zero_is_held_until_its_first_replica_answers_it(
        agent_factory: Callable[..., AgentProcess]) -> None:
    p = start_proxied(agent_factory, "act", env={
        "PLEACO_PROXY_LOAD_INTERVAL": "0.5", "PLEACO_AUTOSCALE_INTERVAL": "0.5",
        "PLEACO_PROXY_ACTIVATOR_MAX_HELD": str(MAX_HELD), "PLEACO_PROXY_ACTIVATOR_HOLD_TIMEOUT": "60"})
    client = p.agent.client
    client.deploy("hello", {"image": HELLO, "port": 8080, "health": "/healthz"})
    wait_for(lambda: p.get(HOST)[0] == 200, 60, "hello through the proxy")
    client.autoscale("hello", POLICY)
    zero = at_zero(p)
    last = zero["autoscaler"]["decisions"][-1]
    assert (last["from"], last["to"]) == (1, 0) and "scale to zero" in last["reason"]

    # One request: held while the first replica starts, then answered by it.
    first = timed_get(p)
    assert first.status == 200 and first.body.startswith("hello from "), first
    print(f"cold start of {HELLO} from zero replicas, request to first byte: {first.first_byte * 1000:.0f} ms")
    m = metrics(p.agent)
    assert m['pleaco_activator_wakes_total{app="hello"}'] >= 1
    assert m['pleaco_activator_requests_total{app="hello",result="proxied"}'] == 1
    # The wake is in the decision history apps show prints, after the autoscaler's 1 -> 0.
    moves = [(d["from"], d["to"], d["reason"]) for d in client.app("hello")["autoscaler"]["decisions"]]
    assert (1, 0, last["reason"]) in moves and (0, 1, "request while at zero") in moves, moves
    assert moves.index((0, 1, "request while at zero")) > moves.index((1, 0, last["reason"]))
    shown = cli(p.agent, "apps", "show", "hello").stdout
    assert "request while at zero" in shown, shown
    # Once it has a replica the proxy routes straight to it (within the DNS refresh of a
    # second, until which the activator forwards what still comes to it).
    proxied = 'pleaco_activator_requests_total{app="hello",result="proxied"}'
    wait_for(lambda: len(routes(p).get(HOST, [])) == 1, 30, "the proxy to route the new replica")

    def straight() -> bool:
        before = metrics(p.agent)[proxied]
        return timed_get(p).status == 200 and metrics(p.agent)[proxied] == before

    wait_for(straight, 30, "a request answered without the activator")

    # Idle again: back to zero. Then a burst above the bound: MAX_HELD held and answered,
    # the rest refused at once with the reason and a Retry-After.
    at_zero(p)
    before = metrics(p.agent)[proxied]
    n = MAX_HELD + 3
    barrier = threading.Barrier(n)

    def one() -> Answer:
        barrier.wait(30)
        return timed_get(p)

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda _: one(), range(n)))
    ok = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status == 503]
    assert len(ok) == MAX_HELD and len(refused) == n - MAX_HELD, answers
    assert all(a.body.startswith("hello from ") for a in ok), ok
    for a in refused:
        assert f"already holds {MAX_HELD} requests" in a.body and "activator_max_held" in a.body, a
        assert int(a.headers["Retry-After"]) >= 1
    print(f"burst of {n} at zero: first byte of the held ones "
          f"{min(a.first_byte for a in ok) * 1000:.0f}..{max(a.first_byte for a in ok) * 1000:.0f} ms, "
          f"refused ones {max(a.first_byte for a in refused) * 1000:.0f} ms at most")
    m = metrics(p.agent)
    assert m['pleaco_activator_requests_total{app="hello",result="full"}'] == n - MAX_HELD
    assert m[proxied] == before + MAX_HELD


def test_requests_through_every_nodes_proxy_are_held_and_answered_by_a_replica_on_any_node(
        agent_factory: Callable[..., AgentProcess]) -> None:
    """Two nodes, each with its proxy and activator; the app at zero. One request through
    each proxy at once: both are held, the app is woken (once: the count is 1), and both
    are answered by its one replica, which runs on one of the nodes: the other node's
    activator forwards to it across nodes, at the address its route record gives."""
    env = {"PLEACO_PROXY_LOAD_INTERVAL": "0.5", "PLEACO_AUTOSCALE_INTERVAL": "0.5"}

    def gossip(k: int) -> list[str]:
        return ["--gossip-listen", f"127.0.0.{k}:{free_port()}", "--discovery", "seeds"]

    first = start_proxied(agent_factory, "m0", gossip(2), env=env)
    first.agent.client.request("POST", "/v1/cluster/init")
    token = first.agent.client.request("GET", "/v1/cluster/token")["token"]
    second = start_proxied(agent_factory, "m1", [*gossip(3), "--join-token", token], env=env)
    nodes = [first, second]
    ids = {p.agent.node_id for p in nodes}
    wait_for(lambda: all(alive_ids(p.agent) == ids for p in nodes), 60, "2 nodes alive everywhere")
    client = first.agent.client
    client.deploy("hello", {"image": HELLO, "port": 8080, "health": "/healthz"})
    wait_for(lambda: all(p.get(HOST)[0] == 200 for p in nodes), 90, "hello through both proxies")
    client.autoscale("hello", {**POLICY, "max_replicas": 1})
    for p in nodes:
        at_zero(p)
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(timed_get, nodes))
    assert [a.status for a in answers] == [200, 200], answers
    assert all(a.body.startswith("hello from ") for a in answers), answers
    app = client.app("hello")
    assert app["replicas"] == 1
    (replica_node,) = {i["node"] for i in app["instances"]}
    other = next(p for p in nodes if p.agent.node_id != replica_node)
    # The node without the replica held its request and forwarded it across.
    assert metrics(other.agent)['pleaco_activator_requests_total{app="hello",result="proxied"}'] == 1
    print("cold start through two proxies (replica on one node), first byte: "
          + ", ".join(f"{a.first_byte * 1000:.0f} ms" for a in answers))
