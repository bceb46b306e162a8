"""Placement with memory: no node is given more replicas than its memory holds."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_reconcile_twin import IMG, World, running

from pleaco.cluster.service import total_memory
from pleaco.placement import Demand, assign, plan

MIB = 1 << 20
NODES = ["n1", "n2", "n3"]


def test_without_memory_it_is_plain_assignment() -> None:
    demands = [Demand("web", 7), Demand("api", 4, 64 * MIB)]
    assert plan(demands, NODES) == {"web": assign("web", 7, NODES), "api": assign("api", 4, NODES)}
    # Limits, but no node says how much memory it has: nothing is limited either.
    assert plan(demands, NODES, memory={}) == plan(demands, NODES)


def test_a_node_takes_no_more_than_its_memory_holds() -> None:
    memory = {"n1": 1024 * MIB, "n2": 1024 * MIB, "n3": 512 * MIB}
    placed = plan([Demand("web", 12, 256 * MIB)], NODES, memory=memory)["web"]
    assert Counter(placed) == {"n1": 4, "n2": 4, "n3": 2, None: 2}


def test_apps_are_placed_in_name_order_against_what_is_left() -> None:
    memory = {"n1": 512 * MIB}
    placed = plan([Demand("web", 2, 256 * MIB), Demand("api", 1, 256 * MIB)], ["n1"], memory=memory)
    assert placed == {"api": ["n1"], "web": ["n1", None]}
    # Replicas without a limit are not counted, and take no room.
    placed = plan([Demand("web", 2, 256 * MIB), Demand("api", 5)], ["n1"], memory=memory)
    assert placed == {"api": ["n1"] * 5, "web": ["n1", "n1"]}


def test_a_full_node_gives_its_share_to_the_others() -> None:
    memory = {"n1": 128 * MIB, "n2": 4096 * MIB, "n3": 4096 * MIB}
    placed = plan([Demand("web", 9, 128 * MIB)], NODES, memory=memory)["web"]
    assert Counter(placed)["n1"] == 1 and None not in placed
    # A node with unknown memory (an older version) is not limited.
    placed = plan([Demand("web", 9, 128 * MIB)], NODES, memory={"n1": 128 * MIB})["web"]
    assert Counter(placed)["n1"] == 1 and len(placed) == 9 and None not in placed


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 12), st.sampled_from(
           [None, 64 * MIB, 200 * MIB, 512 * MIB])), max_size=4, unique_by=lambda d: d[0]),
       st.lists(st.integers(0, 2048), min_size=1, max_size=4))
def test_never_over_a_nodes_memory_and_the_same_on_every_node(demands: list[tuple[str, int, int | None]],
                                                              mem_mib: list[int]) -> None:
    nodes = [f"n{i}" for i in range(len(mem_mib))]
    memory = {n: m * MIB for n, m in zip(nodes, mem_mib, strict=True)}
    ds = [Demand(*d) for d in demands]
    placed = plan(ds, nodes, memory=memory)
    shuffled = list(reversed(nodes))
    assert plan(list(reversed(ds)), shuffled, memory=memory) == placed  # order does not matter
    used: Counter[str] = Counter()
    for d in ds:
        assert len(placed[d.app]) == d.replicas
        for n in placed[d.app]:
            if n is not None and d.memory:
                used[n] += d.memory
    assert all(used[n] <= memory[n] for n in nodes)


def test_this_machines_memory_is_read_from_meminfo(tmp_path: Path) -> None:
    assert total_memory() > 0
    fake = tmp_path / "meminfo"
    fake.write_text("MemTotal:        2048 kB\nMemFree:          100 kB\n")
    assert total_memory(fake) == 2048 * 1024
    fake.write_text("garbage\n")
    assert total_memory(fake) == 0
    assert total_memory(tmp_path / "missing") == 0


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


def test_the_app_loop_runs_what_fits_and_says_what_does_not(world: World) -> None:
    n = world.node()
    n.rec.memory = lambda: {n.id: 128 * MIB}
    n.apps.deploy("web", {"image": IMG, "replicas": 3, "port": 8080, "memory": "64m"})
    n.settle(lambda: len(running(n)) == 2 and n.status().healthy == 2, "the 2 that fit")
    st_ = n.status()
    assert st_.state == "degraded" and st_.message == (
        "1 of 3 replicas fit on no node: each needs 64m of memory and the nodes' is taken")
    # More memory (a node grew, or joined): the third one starts.
    n.rec.memory = lambda: {n.id: 256 * MIB}
    n.settle(lambda: n.status().state == "running" and len(running(n)) == 3, "all 3")
