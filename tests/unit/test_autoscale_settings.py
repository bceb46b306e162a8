"""An app's autoscale policy over a real store: set, replaced, off, removed with the app,
seen by another AppStore on the same store, bad input refused and nothing written."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pleaco.apps import AUTOSCALE_SUFFIX, AppStore, NotFound, ValidationError
from pleaco.identity import Identity
from pleaco.scale import AutoscalePolicy, PolicyError
from pleaco.store import Store

IDENTITY = Identity.generate()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db", IDENTITY)
    yield s
    s.close()


@pytest.fixture
def apps(store: Store) -> AppStore:
    a = AppStore(store, max_replicas=20)
    a.deploy("web", {"image": "nginx:1.27", "replicas": 3})
    return a


def test_set_replace_and_turn_off(apps: AppStore, store: Store) -> None:
    policy = apps.set_autoscale("web", {"min_replicas": 2, "max_replicas": 8, "metric": "rps", "target": 150})
    assert apps.autoscale("web") == policy == AutoscalePolicy(2, 8, metric="rps", target=150.0)
    # Another node's AppStore over the same records sees it (and reads it at start).
    assert AppStore(store, max_replicas=20).autoscale("web") == policy
    apps.set_autoscale("web", {"min_replicas": 1, "max_replicas": 4})
    assert apps.autoscale("web") == AutoscalePolicy(1, 4)
    assert apps.replicas("web") == 3  # inside the new range: untouched
    assert apps.clear_autoscale("web") is True
    assert apps.autoscale("web") is None and apps.replicas("web") == 3
    assert apps.clear_autoscale("web") is False


def test_the_count_moves_into_the_range_at_once(apps: AppStore) -> None:
    apps.set_autoscale("web", {"min_replicas": 5, "max_replicas": 8})
    assert apps.replicas("web") == 5
    apps.set_autoscale("web", {"min_replicas": 1, "max_replicas": 2})
    assert apps.replicas("web") == 2


def test_manual_scale_stays_inside_the_range(apps: AppStore) -> None:
    apps.set_autoscale("web", {"min_replicas": 2, "max_replicas": 4})
    assert apps.scale("web", 4) == 4
    with pytest.raises(ValidationError, match=r"outside the app's autoscale range 2\.\.4"):
        apps.scale("web", 9)
    assert apps.replicas("web") == 4


def test_deploy_replicas_stays_inside_the_range_and_a_refused_deploy_changes_nothing(apps: AppStore,
                                                                                   store: Store) -> None:
    apps.set_autoscale("web", {"min_replicas": 2, "max_replicas": 4})
    before = store.count()
    for replicas in (1, 9):
        with pytest.raises(ValidationError, match=r"replicas: \d is outside the app's autoscale range 2\.\.4"):
            apps.deploy("web", {"image": "nginx:1.28", "replicas": replicas})
    assert store.count() == before and apps.replicas("web") == 3
    spec = apps.get("web")
    assert spec is not None and spec.image == "nginx:1.27" and spec.revision == 1
    # Inside the range, or without --replicas, a deploy goes through.
    assert apps.deploy("web", {"image": "nginx:1.28", "replicas": 4}).replicas == 4
    assert apps.deploy("web", {"image": "nginx:1.29"}).replicas == 4


def test_every_per_app_verb_refuses_a_missing_app_or_a_bad_name(apps: AppStore, store: Store) -> None:
    before = store.count()
    calls = [lambda n: apps.scale(n, 2), lambda n: apps.set_autoscale(n, {"min_replicas": 1, "max_replicas": 2}),
             apps.clear_autoscale, apps.remove, apps.rollback]
    for call in calls:
        with pytest.raises(NotFound, match="app 'nope' does not exist"):
            call("nope")
        with pytest.raises(ValidationError, match="is not a DNS label"):
            call("Bad_Name")
    assert store.count() == before


def test_removing_the_app_removes_its_policy(apps: AppStore, store: Store) -> None:
    apps.set_autoscale("web", {"min_replicas": 1, "max_replicas": 4})
    apps.remove("web")
    assert store.value("scale", "web" + AUTOSCALE_SUFFIX) is None and apps.autoscale("web") is None
    apps.deploy("web", {"image": "nginx:1.27"})
    assert apps.autoscale("web") is None and apps.replicas("web") == 1


BAD: list[tuple[Any, str]] = [
    ({"min_replicas": 5, "max_replicas": 2}, "min_replicas"),
    ({"min_replicas": 1, "max_replicas": 4, "target": -3}, "target"),
    ({"min_replicas": 1, "max_replicas": 4, "target": math.inf}, "target"),
    ({"min_replicas": 1, "max_replicas": 4, "metric": "memory"}, "metric"),
    ({"min_replicas": 1, "max_replicas": 21}, "max_replicas"),  # above the cluster's max_replicas
    ({"min_replicas": 1, "max_replicas": 4, "speed": 2}, "speed"),
    ({"max_replicas": 4}, "min_replicas"),
    ({"min_replicas": 0, "max_replicas": 4}, "min_replicas"),
    ([1, 4], "autoscale"),
]


@pytest.mark.parametrize(("body", "field"), BAD)
def test_bad_policies_change_nothing(apps: AppStore, store: Store, body: Any, field: str) -> None:
    apps.set_autoscale("web", {"min_replicas": 1, "max_replicas": 4})
    before = store.count()
    with pytest.raises(PolicyError) as err:
        apps.set_autoscale("web", body)
    assert err.value.field == field
    assert apps.autoscale("web") == AutoscalePolicy(1, 4) and store.count() == before


def test_an_app_that_does_not_exist(apps: AppStore) -> None:
    with pytest.raises(NotFound):
        apps.set_autoscale("nope", {"min_replicas": 1, "max_replicas": 4})
    with pytest.raises(NotFound):
        apps.clear_autoscale("nope")
