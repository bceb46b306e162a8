"""Load reports: their codec (round trip, size bound and split, fuzzing), the cluster-wide sum
with staleness, and their dissemination by the real membership code on the simulated network."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pleaco.cluster import messages, wire
from pleaco.cluster.config import GossipConfig
from pleaco.cluster.load import LoadView
from pleaco.cluster.membership import PACKET_BASE
from pleaco.cluster.messages import AppLoadEntry, LoadReport, MessageError, Packet, decode, encode, split_load
from pleaco.cluster.simnet import SimNetwork, VirtualTimeLoop, sim_cluster

POLL = 0.05  # seconds between looks while gossip spreads

N1 = "0123456789abcdef0123456789abcdef"
N2 = "fedcba9876543210fedcba9876543210"
N3 = "00000000000000000000000000000003"


def entry(app: str = "web", rps: float = 10.0, concurrency: float = 1.5, p50: float | None = 0.004,
          p99: float | None = 0.05, replicas: int = 2, cpu: float = 0.25, memory: int = 50 << 20) -> AppLoadEntry:
    return AppLoadEntry(app, rps, concurrency, p50, p99, replicas, cpu, memory)


def test_a_packet_with_load_reports_round_trips() -> None:
    report = LoadReport(N1, 1_800_000_000_123, 0, (entry(), entry("idle", 0.0, 0.0, None, None, 1, 0.0, 0)))
    packet = Packet("gossip", loads=(report, LoadReport(N2, 5, 3, ())))
    assert decode(encode(packet)) == packet


def test_a_report_of_many_apps_is_split_into_parts_that_each_fit_a_packet() -> None:
    """Past one packet the report is split (nothing is dropped): whole entries per part,
    the busiest apps first, each part within the budget and so within the packet bound."""
    cfg = GossipConfig()
    room = cfg.max_packet - wire.OVERHEAD - PACKET_BASE
    budget = room // 2
    apps = [entry(f"app-{i:03d}-" + "x" * 55, rps=float(i), p50=1.0 / 3, p99=9.87654321) for i in range(1000)]
    parts = split_load(N1, 1_800_000_000_123, apps, budget)
    assert len(parts) > 50
    assert [p.part for p in parts] == list(range(len(parts)))
    for p in parts:
        assert len(messages.dumps(p.to_json())) <= budget
        # A gossip packet with one part and nothing else stays far inside max_packet.
        assert len(encode(Packet("gossip", loads=(p,)))) + wire.OVERHEAD <= cfg.max_packet
    sent = [e.app for p in parts for e in p.entries]
    assert sorted(sent) == sorted(a.app for a in apps) and len(sent) == len(set(sent))
    assert parts[0].entries[0].app.startswith("app-999-")  # busiest first
    # The codec's own bound holds for every part.
    assert all(len(p.entries) <= messages.MAX_LOAD_ENTRIES for p in parts)


def test_a_report_without_apps_is_one_empty_part_and_bad_figures_are_made_sendable() -> None:
    assert split_load(N1, 1, [], 500) == [LoadReport(N1, 1, 0, ())]
    weird = [entry("Not_An_App"), entry("nan", rps=float("nan"), concurrency=float("inf"), cpu=-1.0, replicas=-3)]
    [part] = split_load(N1, 1, weird, 500)
    assert [e.app for e in part.entries] == ["nan"]
    e = part.entries[0]
    assert (e.rps, e.concurrency, e.cpu, e.replicas) == (0.0, messages.MAX_FIGURE, 0.0, 0)
    assert decode(encode(Packet("gossip", loads=(part,)))).loads == (part,)


@pytest.mark.parametrize("bad", [
    "x", [[N1, 1, 0, "x"]], [[N1, 1, 0]], [[N1, -1, 0, []]], [["nope", 1, 0, []]], [[N1, 1, 70000, []]],
    [[N1, 1, 0, [["web", 1, 1, None, None, 1, 0]]]],
    [[N1, 1, 0, [["Web", 1, 1, None, None, 1, 0, 0]]]],
    [[N1, 1, 0, [["web", -1, 1, None, None, 1, 0, 0]]]],
    [[N1, 1, 0, [["web", 1, 1, "5", None, 1, 0, 0]]]],
    [[N1, 1, 0, [["web", 1, 1, None, None, 1.5, 0, 0]]]],
    [[N1, 1, 0, [["web", 1, 1, None, None, True, 0, 0]]]],
    [[N1, 1, 0, [["web", 1e300, 1, None, None, 1, 0, 0]]]],
    [[N1, 1, 0, [["web", 1, 1, None, None, 1, 0, 0]] * 300]],
])
def test_malformed_load_reports_are_message_errors(bad: Any) -> None:
    with pytest.raises(MessageError):
        decode(json.dumps({"t": "gossip", "l": bad}).encode())


FUZZ = settings(max_examples=300, deadline=None, derandomize=True)
json_leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=70)
json_any = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=9) | st.dictionaries(st.text(max_size=3),
                                                                                                inner, max_size=4),
                        max_leaves=40)


@settings(FUZZ, max_examples=500)
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes_in_the_load_field_raise_only_message_errors(data: bytes) -> None:
    raw = b'{"t":"gossip","l":' + data + b"}"
    for candidate in (raw, data):
        with contextlib.suppress(MessageError):
            decode(candidate)


@settings(FUZZ)
@given(json_any)
def test_fuzz_any_json_as_load_reports_raises_only_message_errors(value: Any) -> None:
    for body in ({"t": "gossip", "l": value}, {"t": "gossip", "l": [value]},
                 {"t": "gossip", "l": [[N1, 1, 0, value]]}, {"t": "gossip", "l": [[N1, 1, 0, [value]]]}):
        try:
            packet = decode(json.dumps(body).encode())
        except MessageError:
            continue
        assert decode(encode(packet)) == packet  # whatever is accepted is well formed


@settings(FUZZ, max_examples=200)
@given(st.lists(st.tuples(st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z"),
                          st.floats(0, 1e6), st.floats(0, 1e4), st.none() | st.floats(0, 100),
                          st.integers(0, 1000), st.integers(0, 2**40)), max_size=40))
def test_fuzz_split_reports_decode_to_what_was_sent(
        rows: list[tuple[str, float, float, float | None, int, int]]) -> None:
    entries = [AppLoadEntry(a, r, c, q, q, n, r / 1000, m) for a, r, c, q, n, m in rows]
    for part in split_load(N1, 7, entries, 560):
        [back] = decode(encode(Packet("gossip", loads=(part,)))).loads
        assert [e.app for e in back.entries] == [e.app for e in part.entries]
        for got, sent in zip(back.entries, part.entries, strict=True):
            assert got.rps == pytest.approx(sent.rps, abs=0.01) and got.replicas == sent.replicas


# -- the cluster-wide sum ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_cluster_figure_sums_the_latest_report_of_every_node() -> None:
    clock = Clock()
    live = {N1, N2, N3}
    view = LoadView(N1, stale_after=10.0, live=lambda: live, clock=clock)
    view.set_local([LoadReport(N1, 1000, 0, (entry(rps=10, concurrency=1, p50=0.010, p99=0.1, replicas=1),))])
    assert view.received(LoadReport(N2, 2000, 0, (entry(rps=30, concurrency=3, p50=0.002, p99=0.5, replicas=2),
                                                  entry("other", rps=1),)))
    # An older report of N2 changes nothing; a newer one replaces its entry.
    assert not view.received(LoadReport(N2, 1500, 0, (entry(rps=999),)))
    clock.now += 1
    web = view.cluster("web")
    assert web is not None
    assert (web.rps, web.concurrency, web.replicas, web.nodes) == (40, 4, 3, 2)
    assert web.p50 == pytest.approx((0.010 * 10 + 0.002 * 30) / 40) and web.p99 == 0.5
    assert web.cpu == pytest.approx(0.5) and web.memory == 100 << 20
    assert web.sampled_at == 1.0 and web.age == pytest.approx(1.0)
    assert view.received(LoadReport(N2, 3000, 0, (entry(rps=5),)))
    assert view.cluster("web").rps == 15  # type: ignore[union-attr]
    assert set(view.all()) == {"web", "other"} and view.local["web"].rps == 10
    assert view.cluster("nothing") is None


def test_news_and_only_news_is_told() -> None:
    told: list[int] = []
    view = LoadView(N1, stale_after=10.0, clock=Clock())
    view.on_news = lambda: told.append(1)
    view.set_local([LoadReport(N1, 1000, 0, (entry(),))])
    assert view.received(LoadReport(N2, 2000, 0, (entry(),)))
    assert len(told) == 2
    assert not view.received(LoadReport(N2, 2000, 0, (entry(rps=5),)))  # not newer: nothing new
    view.set_local([LoadReport(N1, 900, 0, (entry(),))])
    assert len(told) == 2


def test_stale_entries_and_those_of_dead_nodes_are_dropped() -> None:
    clock = Clock()
    live = {N1, N2, N3}
    view = LoadView(N1, stale_after=10.0, live=lambda: live, clock=clock)
    view.received(LoadReport(N2, 1, 0, (entry(rps=30),)))
    view.received(LoadReport(N3, 1, 0, (entry(rps=5),)))
    clock.now += 6
    view.received(LoadReport(N3, 2, 0, (entry(rps=7),)))  # N3 keeps reporting, N2 went silent
    clock.now += 4.5
    web = view.cluster("web")
    assert web is not None and web.rps == 7 and web.nodes == 1 and web.age == pytest.approx(4.5)
    live.discard(N3)  # declared dead: its traffic is not counted, however fresh
    assert view.cluster("web") is None and view.all() == {}
    # A dropped entry does not come back with a report older than what was held.
    live.add(N3)
    assert view.received(LoadReport(N3, 2, 0, (entry(rps=7),)))


# -- dissemination -------------------------------------------------------------------------------


def test_a_nodes_load_reaches_every_node_and_does_not_delay_records() -> None:
    """The real membership code on the simulated network (sealed packets): each node's report
    reaches every other node by piggybacking, and a report that does not fit the room a
    packet has left waits (membership news and records go first)."""
    async def scenario() -> float:
        rng = random.Random(4)
        net = SimNetwork(rng)
        nodes = sim_cluster(10, GossipConfig(), net, rng)
        views = [LoadView(m.node_id, 10.0, clock=asyncio.get_running_loop().time) for m in nodes]
        for m, v in zip(nodes, views, strict=True):
            m.on_load = v.received
            await m.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        big = [entry(f"app-{i}", rps=float(i)) for i in range(40)]
        for i, m in enumerate(nodes):
            mine = [*big, entry(rps=0.0)] if i == 0 else [entry(rps=float(i))]
            reports = split_load(m.node_id, 1000 + i, mine, m.load_budget())
            views[i].set_local(reports)
            m.publish_load(reports)
        while not all((w := v.cluster("web")) is not None and w.nodes == 10 and v.cluster("app-39") is not None
                      for v in views):
            assert loop.time() - t0 < 10, "load reports did not reach every node"
            await asyncio.sleep(POLL)
        took = loop.time() - t0
        assert all(v.cluster("web").rps == sum(range(10)) for v in views)  # type: ignore[union-attr]
        for m in nodes:
            await m.stop(leave=False)
        return took

    loop = VirtualTimeLoop()
    try:
        took = loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert took < 3  # a few gossip rounds (virtual seconds)
