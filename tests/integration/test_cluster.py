"""A cluster of real agent processes on 127.0.0.x: joining with a token, placement over
the nodes, failure detection after kill -9, rejoining and catching up, revocation, and
forged packets on the real gossip port."""

from __future__ import annotations

import collections
import functools
import json
import os
import random
import socket
import struct
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

from agentproc import (
    AgentProcess,
    alive_ids,
    form_cluster,
    metric,
    node_args,
    node_containers,
    side_by_side,
    states,
    wait_for,
)
from conftest import HELLO

from pleaco.api.errors import ApiError
from pleaco.cluster import messages, wire
from pleaco.cluster.trust import ClusterState, JoinToken
from pleaco.identity import Identity

Factory = Callable[..., AgentProcess]


# The returning victim's replicas move back to it once it has been alive placement_settle
# (10 s by default), each old one draining for drain_grace (5 s) before it is removed: the
# test waits for that to end, not for how long it takes.
SETTLES_SOON = {"PLEACO_GOSSIP_PLACEMENT_SETTLE": "2", "PLEACO_ROLLOUT_DRAIN_GRACE": "1"}


def test_five_nodes_spread_an_app_survive_kill_and_catch_up(agent_factory: Factory) -> None:
    agents = form_cluster(agent_factory, 5, env=SETTLES_SOON)
    agents[2].client.deploy("web", {"image": HELLO, "replicas": 6, "port": 8080, "health": "/healthz"})

    def everywhere_healthy(count: int, among: list[AgentProcess]) -> bool:
        views = [a.client.apps() for a in among]
        return all(len(v) == 1 and v[0]["healthy"] == count and v[0]["replicas"] == count for v in views)

    wait_for(lambda: everywhere_healthy(6, agents), 60, "6 healthy replicas seen by every node")
    per_node = {a.node_id: len(node_containers(a.node_id, "web", all_states=False)) for a in agents}
    assert sum(per_node.values()) == 6 and all(n >= 1 for n in per_node.values()), per_node
    # Every node answers the same `nodes` and `apps ls`.
    assert len({json.dumps(sorted(states(a).items())) for a in agents}) == 1
    # The instances too, once each node's latest route record (a replica turns "serving" a
    # proxy pass after it turns healthy) has reached every node.
    def same_instances() -> bool:
        views = [a.client.apps()[0]["instances"] for a in agents]
        return all(v == views[0] for v in views)

    wait_for(same_instances, 10, "every node showing the same instances")

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


# Push-pull's first round comes 60 to 180 s after a node starts (the interval, jittered by
# half either way): far past the deadline below, so what it checks can only come by gossip.
NO_PUSH_PULL_SOON = {"PLEACO_GOSSIP_PUSH_PULL_INTERVAL": "120"}


def test_nodes_joining_at_once_learn_of_each_other_and_their_records_by_gossip(agent_factory: Factory) -> None:
    """Four nodes join a first one at the same moment (a fleet booted from one image): the
    news that one is alive can reach another before the record admitting it does, and each
    writes records at once that may outrun it too. Every node sees every other alive, and
    every other's records, long before a push-pull would repair what gossip dropped."""
    first = agent_factory("n0", extra_args=node_args(2), env=NO_PUSH_PULL_SOON)
    first.client.request("POST", "/v1/cluster/init")
    token = first.client.request("GET", "/v1/cluster/token")["token"]
    joiners = side_by_side([
        functools.partial(agent_factory, f"n{i}", extra_args=[*node_args(i + 2), "--join-token", token],
                          env=NO_PUSH_PULL_SOON)
        for i in range(1, 5)])
    agents = [first, *joiners]
    # Each labels itself as soon as it answers (a record it writes, spread from it).
    side_by_side([functools.partial(a.client.request, "PUT", f"/v1/nodes/{a.node_id}/labels",
                                    {"labels": [f"seat={a.data_dir.name}"]}) for a in agents])
    expected = {a.node_id: {"state": "alive", "labels": {"seat": a.data_dir.name}} for a in agents}

    def view(agent: AgentProcess) -> dict[str, dict[str, object]]:
        return {n["id"]: {"state": n["state"], "labels": n["labels"]} for n in agent.client.nodes()}

    wait_for(lambda: all(view(a) == expected for a in agents), 30,
             "every node alive, with its label, on every node")


def gossip_addr(agent: AgentProcess) -> tuple[str, int]:
    gossip = next(n["gossip"] for n in agent.client.nodes() if n["id"] == agent.node_id)
    host, _, port = gossip.rpartition(":")
    return host, int(port)


def healthy(agent: AgentProcess) -> bool:
    with urllib.request.urlopen(agent.url + "/healthz", timeout=5) as resp:
        return bool(resp.status == 200)


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the other end closed (EOF or reset); False while it still waits for bytes."""
    try:
        return sock.recv(65536) == b""
    except (TimeoutError, BlockingIOError):
        return False
    except OSError:
        return True


def accusations(observer: AgentProcess, member: AgentProcess) -> list[str]:
    """The observer's log lines suspecting the member or declaring it dead."""
    return [line for line in observer.log_path.read_text().splitlines()
            if ("event=member.suspect" in line or "event=member.dead" in line) and f"member={member.node_id}" in line]


# A long stream timeout: a node that waits for the body of an oversized frame (instead of
# refusing it on its header) then holds the connection far past the deadlines below.
PATIENT = {"PLEACO_GOSSIP_STREAM_TIMEOUT": "120"}


def test_oversized_unauthenticated_frames_are_refused_unread(agent_factory: Factory) -> None:
    a, b = form_cluster(agent_factory, 2, env=PATIENT)
    addr = gossip_addr(a)
    too_large = metric(a, 'pleaco_gossip_dropped_total{reason="too_large"}')
    # 40 join requests at once, each announcing a 60 MB frame and sending its first 64 KiB.
    socks = []
    for _ in range(40):
        s = socket.create_connection(addr, timeout=5)
        s.sendall(b"J" + struct.pack(">I", 60 << 20) + os.urandom(64 << 10))
        s.settimeout(0.05)
        socks.append(s)
    try:
        # Each is closed on its header (or at once, past the cap on unauthenticated
        # connections), not held open waiting for 60 MB.
        wait_for(lambda: all(closed_by_peer(s) for s in socks), 15, "every oversized join frame refused")
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: metric(a, 'pleaco_gossip_dropped_total{reason="too_large"}') > too_large, 10,
             "oversized frames counted as too_large")

    # Fifteen senders pushing whole 60 MB frames, on the join and the stream channel, while
    # the node's API and its membership are watched.
    sent = [0] * 15

    def flood(i: int) -> None:
        body = bytes(1 << 20)
        with socket.create_connection(addr, timeout=10) as s:
            try:
                s.sendall(b"JS"[i % 2:i % 2 + 1] + struct.pack(">I", 60 << 20))
                for _ in range(60):
                    s.sendall(body)
                    sent[i] += len(body)
            except OSError:
                pass  # refused: what should happen

    threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(15)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        assert healthy(a), "the node's API stopped answering"
        assert states(b)[a.node_id] == "alive"
        for t in threads:
            t.join(0.2)
    # The kernel's socket buffers take a few MB before the refusal reaches a sender; no
    # sender got anywhere near a whole frame in.
    assert max(sent) < 20 << 20, sent
    assert healthy(a) and states(b)[a.node_id] == "alive" and states(a)[b.node_id] == "alive"
    assert not accusations(b, a)


def test_fuzzed_packets_and_frames_do_not_disturb_the_cluster(agent_factory: Factory) -> None:
    """Random and truncated packets and frames, on UDP and TCP with every channel byte, at a
    member of a 2-node cluster: its peer never suspects it, and the drops are counted."""
    a, b = form_cluster(agent_factory, 2)
    host, port = gossip_addr(a)
    rng = random.Random(20261126)
    ping = messages.encode(messages.Packet("ping", 1, target=a.node_id))
    valid = [_sealed_as(b, ping) for _ in range(8)]
    drops_before = metric(a, "pleaco_gossip_dropped_total")
    too_large = metric(a, 'pleaco_gossip_dropped_total{reason="too_large"}')

    def noise(max_len: int) -> bytes:
        kind = rng.randrange(4)
        if kind == 0:
            return rng.randbytes(rng.randrange(max_len))
        if kind == 1:  # a valid packet cut short
            v = rng.choice(valid)
            return v[: rng.randrange(len(v))]
        if kind == 2:  # a valid packet with bytes flipped
            v = bytearray(rng.choice(valid))
            for _ in range(rng.randrange(1, 8)):
                v[rng.randrange(len(v))] ^= 1 << rng.randrange(8)
            return bytes(v)
        return b"PLC1" + rng.randbytes(rng.randrange(max_len))

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(600):
        udp.sendto(noise(1400), (host, port))
    udp.close()
    wait_for(lambda: metric(a, "pleaco_gossip_dropped_total") > drops_before, 10, "UDP drops counted")

    for i in range(768):
        channel = bytes([i % 256])
        shape = rng.randrange(4)
        if shape == 0:  # a frame header cut short
            data = channel + rng.randbytes(rng.randrange(4))
        elif shape == 1:  # a length beyond any limit
            data = channel + struct.pack(">I", rng.randrange(1 << 20, 1 << 32)) + rng.randbytes(64)
        elif shape == 2:  # a frame shorter than it says
            body = noise(4096)
            data = channel + struct.pack(">I", len(body) + rng.randrange(1, 1000)) + body
        else:  # a whole frame of noise
            body = noise(4096)
            data = channel + struct.pack(">I", len(body)) + body
        with socket.create_connection((host, port), timeout=5) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                while s.recv(4096):
                    pass
            except OSError:
                pass
        if i % 64 == 0:
            assert states(b)[a.node_id] == "alive" and healthy(a)
    wait_for(lambda: metric(a, 'pleaco_gossip_dropped_total{reason="too_large"}') > too_large, 10,
             "oversized TCP frames counted")

    # 200 well-framed join requests that do not check out: refused and counted each, but
    # logged as one line per burst, not one line each.
    refused = metric(a, 'pleaco_gossip_dropped_total{reason="join_refused"}')
    for _ in range(200):
        body = json.dumps({"cluster": "x", "nonce": rng.randbytes(8).hex()}).encode()
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"J" + struct.pack(">I", len(body)) + body)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
    wait_for(lambda: metric(a, 'pleaco_gossip_dropped_total{reason="join_refused"}') >= refused + 200, 10,
             "every refused join counted")
    lines = [x for x in a.log_path.read_text().splitlines() if "event=cluster.join_refused" in x]
    assert len(lines) < 20, f"{len(lines)} log lines for 200 refused joins"
    assert states(b)[a.node_id] == "alive" and states(a)[b.node_id] == "alive"
    assert not accusations(b, a)


def test_bootstrap_first_founds_a_cluster_at_the_first_start_and_keeps_it(agent_factory: Factory) -> None:
    """The first node's user data (cloud-init/first-node.yaml) says `bootstrap = "first"`:
    it founds a cluster with no `cluster init`, keeps it across a restart, and others join
    it with its token."""
    first = agent_factory("n0", extra_args=[*node_args(2), "--bootstrap", "first"])

    def cluster_of(agent: AgentProcess) -> str:
        try:
            return JoinToken.decode(agent.client.request("GET", "/v1/cluster/token")["token"]).cluster_id
        except ApiError:  # 409: not in a cluster (yet)
            return ""

    cluster_id = wait_for(lambda: cluster_of(first), 20, "the first node's cluster")
    token = first.client.request("GET", "/v1/cluster/token")["token"]
    first.stop()
    first.start()
    assert cluster_of(first) == cluster_id
    second = agent_factory("n1", extra_args=[*node_args(3), "--join-token", token])
    ids = {first.node_id, second.node_id}
    wait_for(lambda: alive_ids(first) == ids == alive_ids(second), 40, "both nodes alive in one cluster")
    assert cluster_of(second) == cluster_id
