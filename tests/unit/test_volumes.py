"""Persistent volumes: the spec field's validation, the claim rule and placement pinning."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pleaco.apps import AppSpec, AppStore, ValidationError, validate_deploy
from pleaco.identity import Identity
from pleaco.mounts import VolumeMount, VolumeSpecError, parse_all, parse_mount
from pleaco.store import Store

IDENTITY = Identity.generate()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db", IDENTITY)
    yield s
    s.close()


def test_deploy_keeps_volumes_in_the_spec_and_the_record(store: Store) -> None:
    apps = AppStore(store, max_replicas=10)
    result = apps.deploy("db", {"image": "x", "volumes": [{"name": "data", "path": "/var/lib/db/"},
                                                           "cache:/cache"]})
    want = (VolumeMount("data", "/var/lib/db"), VolumeMount("cache", "/cache"))
    assert result.spec.volumes == want
    assert store.value("app", "db")["volumes"] == [{"name": "data", "path": "/var/lib/db"},
                                                   {"name": "cache", "path": "/cache"}]
    assert AppSpec.from_value("db", store.value("app", "db") or {}).volumes == want
    # The same volumes again: no new release; a changed mount is one.
    assert not apps.deploy("db", {"image": "x", "volumes": ["data:/var/lib/db", "cache:/cache"]}).new_release
    assert apps.deploy("db", {"image": "x", "volumes": ["data:/srv"]}).spec.revision == 2
    # A record written before the field existed reads as no volumes.
    assert AppSpec.from_value("old", {"image": "x"}).volumes == ()


@pytest.mark.parametrize(("volumes", "named"), [
    (["Data:/x"], "'Data'"),
    (["-data:/x"], "'-data'"),
    ([{"name": "a" * 64, "path": "/x"}], "not valid"),
    (["data:relative"], "not an absolute path"),
    (["data"], "expected NAME:/path"),
    (["data:/"], "root"),
    ([{"name": "data", "path": "/x", "extra": 1}], "exactly"),
    (["data:/x", "data:/y"], "named twice"),
    (["a:/x", "b:/x/"], "mounted twice"),
    ("data:/x", "expected a list"),
])
def test_bad_volumes_are_named(volumes: object, named: str) -> None:
    with pytest.raises(ValidationError, match="^volumes: .*" + named.replace("(", r"\(")) as info:
        validate_deploy("db", {"image": "x", "volumes": volumes}, 10)
    assert info.value.field == "volumes"


def test_parse_mount_and_list() -> None:
    assert parse_mount("pg.data_1:/var/lib/postgresql/data") == VolumeMount("pg.data_1", "/var/lib/postgresql/data")
    assert parse_all([]) == ()
    with pytest.raises(VolumeSpecError):
        parse_all(["x:/a"] * 17)
