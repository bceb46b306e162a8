"""A cluster of real agent processes on 127.0.0.x: joining with a token, placement over
the nodes, failure detection after kill -9, rejoining and catching up, revocation, and
forged packets on the real gossip port."""

from __future__ import annotations

import collections
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

from agentproc import (
    AgentProcess,
    form_cluster,
    metric,
    node_args,
    node_containers,
    states,
    wait_for,
)
from conftest import HELLO

from pleaco.api.errors import ApiError
from pleaco.cluster import messages, wire
from pleaco.cluster.trust import ClusterState, JoinToken
from pleaco.identity import Identity

Factory = Callable[..., AgentProcess]


def test_five_nodes_spread_an_app_survive_kill_and_catch_up(agent_factory: Factory) -> None:
    agents = form_cluster(agent_factory, 5)
    agents[2].client.deploy("web", {"image": HELLO, "replicas": 6, "port": 8080, "health": "/healthz"})

    def everywhere_healthy(count: int, among: list[AgentProcess]) -> bool:
        views = [a.client.apps() for a in among]
        return all(len(v) == 1 and v[0]["healthy"] == count and v[0]["replicas"] == count for v in views)

    wait_for(lambda: everywhere_healthy(6, agents), 60, "6 healthy replicas seen by every node")
    per_node = {a.node_id: len(node_containers(a.node_id, "web", all_states=False)) for a in agents}
    assert sum(per_node.values()) == 6 and all(n >= 1 for n in per_node.values()), per_node
    # Every node answers the same `nodes` and `apps ls`.
    assert len({json.dumps(sorted(states(a).items())) for a in agents}) == 1
    views = [{k: v for k, v in a.client.apps()[0].items() if k != "message"} for a in agents]
    assert all(v["instances"] == views[0]["instances"] for v in views)

    victim = next(a for a in agents if per_node[a.node_id] >= 1 and a is not agents[0])
    victim.kill()
    survivors = [a for a in agents if a is not victim]
    wait_for(lambda: all(states(a)[victim.node_id] == "dead" for a in survivors), 30, "the victim declared dead")
    # Its replicas start elsewhere (its own containers are still there: it was killed).
    def moved() -> bool:
        app = survivors[0].client.app("web")
        return app["healthy"] == 6 and all(i["node"] != victim.node_id for i in app["instances"])

    wait_for(moved, 60, "the victim's replicas running on the other nodes")
    # A write while the victim is away, on another node than the one it will ask first.
    agents[3 if victim is not agents[3] else 4].client.scale("web", 7)

    victim.start()
    wait_for(lambda: all(states(a)[victim.node_id] == "alive" for a in agents), 40, "the victim alive again")
    wait_for(lambda: victim.client.app("web")["replicas"] == 7, 30, "the victim caught up with the scale")
    wait_for(lambda: everywhere_healthy(7, agents), 60, "7 healthy replicas seen by every node")

    def each_replica_once() -> bool:
        running = collections.Counter(
            c.attrs["Labels"]["pleaco.replica"] for a in agents
            for c in node_containers(a.node_id, "web", all_states=False)
        )
        return sorted(running, key=int) == [str(i) for i in range(7)] and set(running.values()) == {1}

    wait_for(each_replica_once, 60, "each of the 7 replicas running exactly once across the nodes")


def test_tokens_admission_and_revocation(agent_factory: Factory, tmp_path: Path) -> None:
    a, b = form_cluster(agent_factory, 2)
    token = a.client.request("GET", "/v1/cluster/token")["token"]
    # A token whose secret was altered does not admit.
    parsed = JoinToken.decode(token)
    forged = JoinToken(parsed.cluster_id, bytes(32), parsed.seeds).encode()
    outsider = agent_factory("outsider", extra_args=[*node_args(9), "--join-token", forged])
    wait_for(lambda: "event=cluster.join_failed" in outsider.log_path.read_text(), 20, "the forged join refused")
    assert outsider.node_id not in states(a)
    assert not (outsider.data_dir / "cluster.json").exists()
    outsider.kill()

    # Removing b revokes its key everywhere; its old token no longer admits anyone.
    a.client.request("DELETE", f"/v1/nodes/{b.node_id}")
    wait_for(lambda: states(a)[b.node_id] == "revoked", 10, "b revoked")
    new_token = a.client.request("GET", "/v1/cluster/token")["token"]
    assert new_token != token
    late = agent_factory("late", extra_args=[*node_args(10), "--join-token", token])
    wait_for(lambda: "does not prove the current join token" in late.log_path.read_text(), 20, "old token refused")
    late.kill()
    # b's packets are now dropped as from an unknown sender.
    before = metric(a, 'pleaco_gossip_dropped_total{reason="unknown_sender"}')
    wait_for(lambda: metric(a, 'pleaco_gossip_dropped_total{reason="unknown_sender"}') > before, 20,
             "b's packets dropped")
    newcomer = agent_factory("newcomer", extra_args=[*node_args(11), "--join-token", new_token])
    wait_for(lambda: states(a).get(newcomer.node_id) == "alive", 30, "a node with the new token admitted")
    try:
        a.client.request("DELETE", f"/v1/nodes/{a.node_id}")
        raise AssertionError("a node removed itself")
    except ApiError as exc:
        assert exc.status == 400 and "cannot remove itself" in exc.message


def _sealed_as(agent: AgentProcess, payload: bytes, secret: bytes | None = None, cluster_id: str | None = None,
               identity: Identity | None = None) -> bytes:
    state = ClusterState.load(agent.data_dir)
    assert state is not None
    ident = identity or Identity.load_or_create(agent.data_dir)
    codec = wire.Codec(ident, cluster_id or state.cluster_id, secret or state.secret, lambda _: None)
    return codec.seal(payload)


def test_forged_and_broken_packets_are_dropped_and_counted(agent_factory: Factory) -> None:
    a, b = form_cluster(agent_factory, 2)
    gossip = next(n["gossip"] for n in a.client.nodes() if n["id"] == a.node_id)
    host, _, port = gossip.rpartition(":")
    before = {n["id"]: n["state"] for n in a.client.nodes()}
    ping = messages.encode(messages.Packet("ping", 1, target=a.node_id))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    valid_from_b = _sealed_as(b, ping)
    tampered = bytearray(valid_from_b)
    tampered[-1] ^= 1
    cases = {
        "too_short": b"PLC1",
        "bad_magic": b"XXXX" + os.urandom(200),
        "wrong_cluster": _sealed_as(b, ping, cluster_id="f" * 32),
        "decrypt_failed": _sealed_as(b, ping, secret=bytes(32)),
        "unknown_sender": _sealed_as(b, ping, identity=Identity.generate()),
        "malformed": _sealed_as(b, b'{"t":"ping","g":"nothex"}'),
    }
    counts = {reason: metric(a, f'pleaco_gossip_dropped_total{{reason="{reason}"}}') for reason in cases}
    for data in cases.values():
        sock.sendto(data, (host, int(port)))
    sock.sendto(bytes(tampered), (host, int(port)))  # fails authentication
    for reason in cases:
        wait_for(lambda r=reason: metric(a, f'pleaco_gossip_dropped_total{{reason="{r}"}}') > counts[r], 10,
                 f"a drop counted as {reason}")
    # A valid packet once is fine; the same bytes again are a replay.
    replays = metric(a, 'pleaco_gossip_dropped_total{reason="replayed"}')
    sock.sendto(valid_from_b, (host, int(port)))
    sock.sendto(valid_from_b, (host, int(port)))
    wait_for(lambda: metric(a, 'pleaco_gossip_dropped_total{reason="replayed"}') > replays, 10, "replay dropped")
    sock.close()
    assert {n["id"]: n["state"] for n in a.client.nodes()} == before


def test_a_write_on_any_node_is_visible_on_every_node(agent_factory: Factory) -> None:
    agents = form_cluster(agent_factory, 3)
    for i, agent in enumerate(agents):
        agent.client.deploy(f"app{i}", {"image": HELLO, "replicas": 0})
    expected = {f"app{i}" for i in range(3)}
    wait_for(lambda: all({x["name"] for x in a.client.apps()} == expected for a in agents), 20,
             "every app on every node")
    assert all(isinstance(a.client.request("GET", "/v1/cluster/token")["token"], str) for a in agents)
