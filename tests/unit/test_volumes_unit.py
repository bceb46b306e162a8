"""Persistent volumes: the spec field's validation, the claim rule and placement pinning."""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pleaco.apps import AppSpec, AppStore, ValidationError, validate_deploy
from pleaco.identity import Identity
from pleaco.mounts import VolumeMount, VolumeSpecError, parse_all, parse_mount
from pleaco.placement import Demand, Owners, app_owner, owner, plan
from pleaco.runtime import Conflict as RuntimeConflict
from pleaco.stacks.config import VolumeSettings
from pleaco.stacks.volumes import (
    NotATar,
    Pin,
    VolumeConflict,
    VolumeLoop,
    VolumeNotFound,
    VolumeRecord,
    Volumes,
    check_tar,
    claim_node,
    pin,
)
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


# -- placement pinning and the claim rule ---------------------------------------------------

A, B, C = "node-a" + "0" * 58, "node-b" + "0" * 58, "node-c" + "0" * 58


def _spec(name: str = "db", volumes: tuple[str, ...] = ("data:/data",), constraints: tuple[str, ...] = ()) -> AppSpec:
    spec, _ = validate_deploy(name, {"image": "x", "volumes": list(volumes), "constraints": list(constraints)}, 10)
    return spec


def _rec(volume: str, node: str, removing: bool = False) -> VolumeRecord:
    return VolumeRecord("db", volume, node, 1, removing)


def test_pin_without_volumes_is_anywhere() -> None:
    assert pin(_spec(volumes=()), {}, [A, B]) == Pin(None)


def test_pin_unclaimed_places_nowhere_and_asks_for_a_claim() -> None:
    found = pin(_spec(), {}, [A, B])
    assert found.only == frozenset() and found.claim and "choose the node" in found.why


def test_pin_follows_the_holding_node_and_waits_while_it_is_down() -> None:
    assert pin(_spec(), {"data": _rec("data", B)}, [A, B]) == Pin(frozenset({B}))
    down = pin(_spec(), {"data": _rec("data", B)}, [A, C])
    assert down.only == frozenset() and not down.claim
    assert f"on node {B[:12]}, which is down" in down.why
    # A second volume not claimed yet goes where the first is.
    two = pin(_spec(volumes=("data:/data", "logs:/logs")), {"data": _rec("data", B)}, [A, B])
    assert two.only == frozenset({B}) and two.claim


def test_pin_refuses_volumes_split_over_nodes_and_removals() -> None:
    split = pin(_spec(volumes=("data:/data", "logs:/logs")), {"data": _rec("data", A), "logs": _rec("logs", B)}, [A, B])
    assert split.only == frozenset() and "different nodes" in split.why
    going = pin(_spec(), {"data": _rec("data", A, removing=True)}, [A, B])
    assert going.only == frozenset() and "being removed" in going.why


def test_claim_node_is_deterministic_and_honours_constraints() -> None:
    spec = _spec()
    chosen = claim_node(spec, [], [A, B, C], {}, {})
    assert chosen in (A, B, C)
    assert all(claim_node(spec, [], order, {}, {}) == chosen for order in ([C, B, A], [B, A, C]))
    # The node replica 0 ranks first (plain rendezvous), so a claim moves nothing around.
    assert chosen == owner("db", 0, [A, B, C])
    ssd = _spec(constraints=("node.labels.disk==ssd",))
    assert claim_node(ssd, [], [A, B, C], {C: {"disk": "ssd"}}, {}) == C
    assert claim_node(ssd, [], [A, B], {C: {"disk": "ssd"}}, {}) is None
    # Already holding a volume: the rest go to its node.
    assert claim_node(spec, [_rec("data", B)], [A, B, C], {}, {}) == B


def test_plan_places_every_replica_on_the_pinned_node() -> None:
    placed = plan([Demand("db", 5, only=frozenset({B})), Demand("web", 4)], [A, B, C])
    assert placed["db"] == [B] * 5
    assert set(placed["web"]) == {A, B, C}  # others as ever
    assert plan([Demand("db", 2, only=frozenset())], [A, B])["db"] == [None, None]


def test_claim_writes_once_and_only_the_missing(store: Store) -> None:
    apps = AppStore(store, max_replicas=10)
    spec = apps.deploy("db", {"image": "x", "volumes": ["data:/data", "logs:/logs"]}).spec
    volumes = Volumes(store, apps)
    assert [r.volume for r in volumes.claim(spec, A)] == ["data", "logs"]
    assert volumes.claim(spec, B) == []  # no double claim
    assert {r.node for r in volumes.records("db")} == {A}
    assert volumes.pin(spec, [A, B]).only == frozenset({A})


def test_a_claim_for_use_waits_and_refuses_when_another_nodes_claim_was_kept(store: Store) -> None:
    """A job or restore claims and uses the volume at once; the owner may claim it for its
    first replica at the same moment. The store keeps one claim; the node whose claim was not
    kept must refuse, not fill a volume that nothing will mount."""
    apps = AppStore(store, max_replicas=10)
    spec = apps.deploy("db", {"image": "x", "volumes": ["data:/data", "logs:/logs"]}).spec
    waited: list[float] = []

    def rival_claim_arrives(seconds: float) -> None:
        waited.append(seconds)
        store.put("volume", "db/logs", {"node": B, "created_ms": 2})  # kept over A's: written later

    volumes = Volumes(store, apps, claim_settle=1.5, sleep=rival_claim_arrives)
    with pytest.raises(VolumeConflict, match=f"volume logs of app db was claimed at the same moment by node {B[:12]}"):
        volumes.claim_for_use(spec, A)
    assert waited == [1.5]
    # Uncontested: the claim is kept, and a second call has nothing to claim nor wait for.
    other = apps.deploy("kv", {"image": "x", "volumes": ["data:/data"]}).spec
    quiet = Volumes(store, apps, claim_settle=1.5, sleep=waited.append)
    assert [r.node for r in quiet.claim_for_use(other, A)] == [A] and waited == [1.5, 1.5]
    assert quiet.claim_for_use(other, A) == [] and waited == [1.5, 1.5]


def test_a_job_runs_where_the_volumes_are_and_claims_none_held(store: Store) -> None:
    apps = AppStore(store, max_replicas=10)
    spec = apps.deploy("db", {"image": "x", "volumes": ["data:/data", "logs:/logs"]}).spec
    volumes = Volumes(store, apps)
    assert volumes.node_for(_spec(volumes=()), A, [A, B]) == (A, False)  # no volumes: where it is asked
    assert volumes.node_for(spec, A, [A, B]) == (A, True)  # none held: the node taking the job claims
    assert volumes.holder(spec, [A, B]) is None
    store.put("volume", "db/data", {"node": B, "created_ms": 1})
    assert volumes.node_for(spec, A, [A, B]) == (B, False)  # held: there, and the rest goes there too
    assert volumes.node_for(spec, B, [A, B]) == (B, True)
    assert volumes.holder(spec, [A, B]) == B
    with pytest.raises(VolumeConflict, match=f"on node {B[:12]}, which is down"):
        volumes.node_for(spec, A, [A, C])
    assert volumes.holder(spec, [A, C]) is None


def test_remove_is_refused_while_mounted_and_marks_otherwise(store: Store) -> None:
    apps = AppStore(store, max_replicas=10)
    spec = apps.deploy("db", {"image": "x", "volumes": ["data:/data"]}).spec
    volumes = Volumes(store, apps)
    volumes.claim(spec, A)
    with pytest.raises(VolumeConflict, match="still mounts volume data"):
        volumes.remove("db")
    apps.remove("db")
    assert volumes.records("db")[0].removing is False  # apps rm keeps it (orphaned)
    with pytest.raises(VolumeNotFound):
        volumes.remove("db", "nope")
    assert [r.removing for r in volumes.remove("db")] == [True]
    with pytest.raises(VolumeNotFound, match="no such app"):
        volumes.lookup("other", "data")


def test_check_tar(tmp_path: Path) -> None:
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w") as t:
        info = tarfile.TarInfo("./log")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    assert check_tar(good) == 1
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar archive\n" * 100)
    with pytest.raises(NotATar, match="not a valid tar"):
        check_tar(bad)
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as t:
        t.addfile(tarfile.TarInfo("../escape"), io.BytesIO(b""))
    with pytest.raises(NotATar, match="outside the volume"):
        check_tar(evil)


class _Engine:
    """The volume calls of the Docker adapter the loop makes: a volume in use refuses removal."""

    def __init__(self) -> None:
        self.volumes = {("db", "data")}
        self.in_use = True
        self.removed: list[tuple[str, str]] = []

    def remove_volume(self, app: str, volume: str, node_id: str) -> None:
        if self.in_use:
            raise RuntimeConflict("volume is in use")
        self.volumes.discard((app, volume))
        self.removed.append((app, volume))


def test_only_the_owner_claims_and_the_holder_removes(store: Store) -> None:
    apps = AppStore(store, max_replicas=10)
    volumes = Volumes(store, apps)
    live = [A, B]
    engine = _Engine()
    claimed: list[str] = []

    def loop_of(me: str) -> VolumeLoop:
        return VolumeLoop(VolumeSettings(), volumes, engine, Owners(me, lambda: live),  # type: ignore[arg-type]
                          lambda: live, dict, dict, on_claim=lambda: claimed.append(me))

    owner_id = app_owner("db", live)
    other = B if owner_id == A else A
    apps.deploy("db", {"image": "x", "volumes": ["data:/data"], "replicas": 0})
    asyncio.run(loop_of(owner_id).step())
    assert volumes.records() == []  # no replicas wanted: nothing claimed yet
    apps.scale("db", 2)
    asyncio.run(loop_of(other).step())
    assert volumes.records() == [] and claimed == []  # not its to claim
    asyncio.run(loop_of(owner_id).step())
    [rec] = volumes.records()
    assert rec.node == claim_node(apps.get("db"), [], live, {}, {}) and claimed == [owner_id]  # type: ignore[arg-type]

    # Removal: only the holding node removes, once the volume is no longer in use.
    apps.remove("db")
    volumes.remove("db")
    holder, not_holder = loop_of(rec.node), loop_of(B if rec.node == A else A)
    asyncio.run(not_holder.step())
    asyncio.run(holder.step())
    assert engine.removed == [] and volumes.records()[0].removing
    engine.in_use = False
    asyncio.run(holder.step())
    assert engine.removed == [("db", "data")] and volumes.records() == []


def test_a_negative_claim_settle_is_refused() -> None:
    assert VolumeSettings(claim_settle=0.0).validate() == []
    assert VolumeSettings(claim_settle=-1.0).validate() == ["volumes.claim_settle: must be at least 0"]
    assert VolumeSettings(claim_settle=float("nan")).validate() == ["volumes.claim_settle: must be at least 0"]
