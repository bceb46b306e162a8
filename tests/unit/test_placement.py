"""Rendezvous placement: deterministic, one owner per replica, minimal movement, weights."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pleaco.placement import assign, owned_replicas, owner

NODES = [f"node-{i:02d}" for i in range(5)]


def test_owner_is_deterministic_and_independent_of_node_order() -> None:
    first = [owner("web", i, NODES) for i in range(200)]
    again = [owner("web", i, list(NODES)) for i in range(200)]
    reordered = [owner("web", i, list(reversed(NODES))) for i in range(200)]
    assert first == again == reordered
    assert set(first) == set(NODES)  # 200 replicas over 5 nodes: everyone gets some


def test_different_apps_place_differently() -> None:
    a = [owner("web", i, NODES) for i in range(100)]
    b = [owner("api", i, NODES) for i in range(100)]
    assert a != b


def test_every_replica_has_exactly_one_owner() -> None:
    replicas = 300
    owned = {n: owned_replicas("web", replicas, NODES, n) for n in NODES}
    counts = Counter(i for indexes in owned.values() for i in indexes)
    assert sorted(counts) == list(range(replicas))
    assert set(counts.values()) == {1}
    for n, indexes in owned.items():
        assert indexes == sorted(indexes)
        assert all(assign("web", replicas, NODES)[i] == n for i in indexes)


@pytest.mark.parametrize(("replicas", "nodes"), [(6, 4), (3, 5), (10, 3), (50, 5), (7, 7)])
def test_bounded_load_spreads_evenly(replicas: int, nodes: int) -> None:
    # Plain rendezvous leaves a node empty for 6 replicas on 4 nodes; bounded load does not.
    names = [f"n{i}" for i in range(nodes)]
    counts = Counter(assign("web", replicas, names))
    assert max(counts.values()) - min(counts.get(n, 0) for n in names) <= 1
    assert sum(counts.values()) == replicas


@settings(max_examples=100, deadline=None)
@given(
    app=st.text(min_size=1, max_size=10),
    replicas=st.integers(0, 40),
    nodes=st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6, unique=True),
)
def test_partition_property(app: str, replicas: int, nodes: list[str]) -> None:
    parts = [owned_replicas(app, replicas, nodes, n) for n in nodes]
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(replicas))


def test_a_single_node_owns_everything() -> None:
    assert owned_replicas("web", 7, ["solo"], "solo") == list(range(7))
    assert all(owner("web", i, ["solo"]) == "solo" for i in range(7))
    assert owned_replicas("web", 0, ["solo"], "solo") == []


def test_a_node_outside_the_list_owns_nothing() -> None:
    assert owned_replicas("web", 50, NODES, "stranger") == []
    assert owned_replicas("web", 5, ["solo"], "stranger") == []


def test_no_nodes_is_an_error() -> None:
    with pytest.raises(ValueError):
        owner("web", 0, [])


@pytest.mark.parametrize("gone", NODES)
def test_removing_a_node_moves_only_its_replicas(gone: str) -> None:
    replicas = 500
    before = {i: owner("web", i, NODES) for i in range(replicas)}
    rest = [n for n in NODES if n != gone]
    after = {i: owner("web", i, rest) for i in range(replicas)}
    moved = {i for i in range(replicas) if before[i] != after[i]}
    assert moved == {i for i in range(replicas) if before[i] == gone}
    assert moved  # the departed node did own something


def test_adding_a_node_only_takes_replicas_to_itself() -> None:
    replicas = 500
    before = {i: owner("web", i, NODES) for i in range(replicas)}
    after = {i: owner("web", i, [*NODES, "newcomer"]) for i in range(replicas)}
    changed = [i for i in range(replicas) if before[i] != after[i]]
    assert changed
    assert all(after[i] == "newcomer" for i in changed)


def test_weights_skew_the_share() -> None:
    replicas = 4000
    nodes = ["big", "small"]
    weights = {"big": 3.0, "small": 1.0}
    big = len(owned_replicas("web", replicas, nodes, "big", weights))
    small = len(owned_replicas("web", replicas, nodes, "small", weights))
    assert big + small == replicas
    assert 0.70 <= big / replicas <= 0.80


def test_equal_weights_share_evenly() -> None:
    replicas = 4000
    share = len(owned_replicas("web", replicas, ["x", "y"], "x")) / replicas
    assert 0.45 <= share <= 0.55
    weighted = len(owned_replicas("web", replicas, ["x", "y"], "x", {"x": 2.0, "y": 2.0}))
    assert weighted / replicas == share  # scaling every weight changes nothing


def test_missing_weight_defaults_to_one() -> None:
    explicit = [owner("web", i, NODES, {n: 1.0 for n in NODES}) for i in range(200)]
    implicit = [owner("web", i, NODES, {}) for i in range(200)]
    assert explicit == implicit
