"""App specs over a real store: validation, releases, scaling, removal."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pleaco.apps import (
    DEFAULT_REPLICAS,
    AppSpec,
    AppStore,
    NotFound,
    ValidationError,
    validate_deploy,
    validate_hostname,
    validate_name,
)
from pleaco.identity import Identity
from pleaco.store import Record, Store, Timestamp

MAX = 10
IDENTITY = Identity.generate()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state.db", IDENTITY)
    yield s
    s.close()


@pytest.fixture
def apps(store: Store) -> AppStore:
    return AppStore(store, max_replicas=MAX)


def body(**fields: Any) -> dict[str, Any]:
    return {"image": "nginx:1.27", **fields}


# -- validation: every bad input names its field and writes nothing --------------------------

BAD_DEPLOYS = [
    # (name, body, field)
    pytest.param("Web", body(), "name", id="name-upper-case"),
    pytest.param("my_app", body(), "name", id="name-underscore"),
    pytest.param("a" * 64, body(), "name", id="name-too-long"),
    pytest.param("-web", body(), "name", id="name-leading-dash"),
    pytest.param("web-", body(), "name", id="name-trailing-dash"),
    pytest.param("", body(), "name", id="name-empty"),
    pytest.param("we.b", body(), "name", id="name-dot"),
    pytest.param(7, body(), "name", id="name-not-a-string"),
    pytest.param("web", [], "body", id="body-not-an-object"),
    pytest.param("web", {}, "image", id="image-missing"),
    pytest.param("web", body(image=""), "image", id="image-empty"),
    pytest.param("web", body(image="nginx latest"), "image", id="image-space"),
    pytest.param("web", body(image=5), "image", id="image-not-a-string"),
    pytest.param("web", body(replicas=-1), "replicas", id="replicas-negative"),
    pytest.param("web", body(replicas=MAX + 1), "replicas", id="replicas-above-max"),
    pytest.param("web", body(replicas=True), "replicas", id="replicas-bool"),
    pytest.param("web", body(replicas=2.0), "replicas", id="replicas-float"),
    pytest.param("web", body(replicas="2"), "replicas", id="replicas-string"),
    pytest.param("web", body(port=0), "port", id="port-0"),
    pytest.param("web", body(port=65536), "port", id="port-65536"),
    pytest.param("web", body(port=-80), "port", id="port-negative"),
    pytest.param("web", body(port=True), "port", id="port-bool"),
    pytest.param("web", body(port="8080"), "port", id="port-string"),
    pytest.param("web", body(env={"1ABC": "x"}), "env", id="env-name-digit-first"),
    pytest.param("web", body(env={"A-B": "x"}), "env", id="env-name-dash"),
    pytest.param("web", body(env={"": "x"}), "env", id="env-name-empty"),
    pytest.param("web", body(env={"A B": "x"}), "env", id="env-name-space"),
    pytest.param("web", body(env={"A": 1}), "env", id="env-value-int"),
    pytest.param("web", body(env={"A": None}), "env", id="env-value-null"),
    pytest.param("web", body(env={"A": ["x"]}), "env", id="env-value-list"),
    pytest.param("web", body(env={"A": "x\x00y"}), "env", id="env-value-nul"),
    pytest.param("web", body(env="A=1"), "env", id="env-not-an-object"),
    pytest.param("web", body(cmd=["sh"]), "cmd", id="unknown-field"),
    pytest.param("web", body(port=80, health="healthz"), "health", id="health-no-slash"),
    pytest.param("web", body(port=80, health="/a b"), "health", id="health-space"),
    pytest.param("web", body(port=80, health=5), "health", id="health-not-a-string"),
    pytest.param("web", body(health="/healthz"), "health", id="health-without-port"),
    pytest.param("web", body(host="Example.com"), "host", id="host-upper-case"),
    pytest.param("web", body(host="a..b"), "host", id="host-empty-label"),
    pytest.param("web", body(host="-a.com"), "host", id="host-leading-dash"),
    pytest.param("web", body(host="a_b.com"), "host", id="host-underscore"),
    pytest.param("web", body(host=""), "host", id="host-empty"),
    pytest.param("web", body(host="."), "host", id="host-dot"),
    pytest.param("web", body(host="a" * 64 + ".com"), "host", id="host-label-too-long"),
    pytest.param("web", body(host=("a" * 63 + ".") * 4), "host", id="host-too-long"),
    pytest.param("web", body(host=3), "host", id="host-not-a-string"),
]


@pytest.mark.parametrize(("name", "request_body", "field"), BAD_DEPLOYS)
def test_validate_deploy_names_the_bad_field(name: Any, request_body: Any, field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        validate_deploy(name, request_body, MAX)
    assert exc.value.field == field
    assert str(exc.value).startswith(f"{field}: ")


@pytest.mark.parametrize(("name", "request_body", "field"), BAD_DEPLOYS)
def test_bad_deploy_leaves_the_store_unchanged(
    apps: AppStore, store: Store, name: Any, request_body: Any, field: str
) -> None:
    apps.deploy("existing", body(port=80, host="taken.example.com"))
    before = store.all()
    with pytest.raises(ValidationError) as exc:
        apps.deploy(name, request_body)
    assert exc.value.field == field
    assert store.all() == before


@pytest.mark.parametrize("name", ["web", "a", "0", "a-b", "a" * 63, "web-2"])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("example.com", "example.com"),
        ("example.com.", "example.com"),
        ("a-1.b.c", "a-1.b.c"),
        ("localhost", "localhost"),
    ],
)
def test_good_hosts(host: str, expected: str) -> None:
    assert validate_hostname(host) == expected


@pytest.mark.parametrize(
    ("name", "request_body"),
    [
        pytest.param("web\n", body(), id="name"),
        pytest.param("web", body(image="nginx\n"), id="image"),
        pytest.param("web", body(env={"A\n": "x"}), id="env-name"),
        pytest.param("web", body(port=80, health="/h\n"), id="health"),
        pytest.param("web", body(host="example.com\n"), id="host"),
    ],
)
def test_trailing_newline_is_refused(name: str, request_body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        validate_deploy(name, request_body, MAX)


def test_validate_deploy_accepts_a_full_spec() -> None:
    spec, replicas = validate_deploy(
        "web",
        body(replicas=MAX, port=65535, env={"A_1": "x", "_B": ""}, health="/healthz?x=1", host="web.example.com."),
        MAX,
    )
    assert spec == AppSpec(
        name="web",
        image="nginx:1.27",
        port=65535,
        env={"A_1": "x", "_B": ""},
        health="/healthz?x=1",
        host="web.example.com",
        revision=0,
    )
    assert replicas == MAX


def test_validate_deploy_edges() -> None:
    assert validate_deploy("web", body(replicas=0, port=1), MAX)[1] == 0
    assert validate_deploy("web", body(), MAX)[1] is None


def test_two_apps_cannot_claim_one_host(apps: AppStore, store: Store) -> None:
    apps.deploy("one", body(host="shop.example.com"))
    before = store.all()
    with pytest.raises(ValidationError) as exc:
        apps.deploy("two", body(host="shop.example.com."))  # same name with a trailing dot
    assert exc.value.field == "host"
    assert "one" in str(exc.value)
    assert store.all() == before
    assert apps.get("two") is None


def test_host_is_free_again_after_remove(apps: AppStore) -> None:
    apps.deploy("one", body(host="shop.example.com"))
    apps.remove("one")
    assert apps.deploy("two", body(host="shop.example.com")).spec.host == "shop.example.com"


def test_an_app_can_keep_its_own_host(apps: AppStore) -> None:
    apps.deploy("one", body(host="shop.example.com"))
    result = apps.deploy("one", body(host="shop.example.com", image="nginx:2"))
    assert result.new_release and result.spec.host == "shop.example.com"


def test_hosts_claimed_on_other_nodes_count_and_free_up(apps: AppStore, store: Store) -> None:
    peer = Identity.generate()
    store.put("node", peer.node_id, {"public_key": peer.public_key.hex()})

    def remote(value: dict[str, Any] | None, wall_ms: int) -> Record:
        return Record.create(peer, "app", "theirs", value, Timestamp(wall_ms, 0, peer.node_id))

    far = 1 << 50  # later than any local write
    assert store.apply(remote({"image": "nginx:1", "host": "shop.example.com", "revision": 1}, far))
    with pytest.raises(ValidationError, match="theirs"):
        apps.deploy("mine", body(host="shop.example.com"))
    assert store.apply(remote({"image": "nginx:1", "host": "other.example.com", "revision": 2}, far + 1))
    assert apps.deploy("mine", body(host="shop.example.com")).created
    with pytest.raises(ValidationError, match="mine"):
        apps.deploy("third", body(host="shop.example.com"))
    assert store.apply(remote(None, far + 2))
    assert apps.deploy("fourth", body(host="other.example.com")).created
    assert [s.name for s in apps.specs()] == ["fourth", "mine"]


def test_a_deploy_reads_no_other_app(apps: AppStore, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write's cost must not grow with the apps already there: no listing of them."""
    for i in range(5):
        apps.deploy(f"app{i}", body(host=f"app{i}.example.com"))
    listed: list[str] = []
    for method in ("records", "peek_records", "all"):
        real = getattr(store, method)

        def spy(*args: Any, _real: Any = real, _name: str = method, **kwargs: Any) -> Any:
            listed.append(f"{_name}{args}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(store, method, spy)
    apps.deploy("new", body(host="new.example.com"))
    apps.deploy("app3", body(host="app3.example.com", image="nginx:2"))
    with pytest.raises(ValidationError):
        apps.deploy("other", body(host="app1.example.com"))
    apps.scale("app2", 3)
    assert listed == []
    assert apps.get("app3") is not None and apps.get("app3").image == "nginx:2"  # type: ignore[union-attr]


def test_late_notifications_do_not_bring_back_an_old_spec(apps: AppStore, store: Store) -> None:
    first = store.put("app", "web", {"image": "nginx:1", "revision": 1})
    store.put("app", "web", {"image": "nginx:2", "revision": 2})
    apps._changed(first)  # another thread's notification of the older commit, arriving late
    spec = apps.get("web")
    assert spec is not None and spec.image == "nginx:2"


def test_replica_counts_follow_every_write(apps: AppStore, store: Store) -> None:
    apps.deploy("web", body(replicas=2))
    assert apps.replicas("web") == 2
    peer = Identity.generate()
    store.put("node", peer.node_id, {"public_key": peer.public_key.hex()})
    assert store.apply(Record.create(peer, "scale", "web", {"replicas": 5}, Timestamp(1 << 50, 0, peer.node_id)))
    assert apps.replicas("web") == 5
    store.put("scale", "web", {"replicas": "many"})  # malformed: as if absent
    assert apps.replicas("web") == DEFAULT_REPLICAS
    apps.scale("web", 0)
    assert apps.replicas("web") == 0
    apps.remove("web")
    assert apps.replicas("web") == DEFAULT_REPLICAS
    assert AppStore(store, MAX).replicas("web") == DEFAULT_REPLICAS


def test_an_app_record_that_does_not_parse_is_left_out(apps: AppStore, store: Store) -> None:
    store.put("app", "broken", {"no": "image"})
    apps.deploy("fine", body())
    assert [s.name for s in apps.specs()] == ["fine"]
    assert apps.get("broken") is None


def test_specs_page_in_name_order(apps: AppStore) -> None:
    for name in ["d", "b", "a", "c"]:
        apps.deploy(name, body())
    assert [s.name for s in apps.specs(limit=2)] == ["a", "b"]
    assert [s.name for s in apps.specs(after="b", limit=2)] == ["c", "d"]
    assert [s.name for s in apps.specs(after="bb")] == ["c", "d"]
    assert apps.specs(after="d") == []
    apps.remove("c")
    assert [s.name for s in apps.specs(after="a")] == ["b", "d"]
    assert apps.count() == 3


def test_the_cached_specs_match_the_store_after_any_mix_of_writes(apps: AppStore, store: Store) -> None:
    rng = random.Random(7)
    for _ in range(300):
        name = f"a{rng.randrange(40):02d}"
        if rng.random() < 0.6:
            apps.deploy(name, body(image=f"nginx:{rng.randrange(3)}", host=f"{name}.example.com"))
        elif apps.get(name) is not None:
            apps.remove(name)
    expected = [AppSpec.from_value(r.key, r.value) for r in store.records("app")]  # type: ignore[arg-type]
    assert apps.specs() == expected
    assert AppStore(store, MAX).specs() == expected
    assert [s.name for s in apps.specs(after="a20")] == [s.name for s in expected if s.name > "a20"]


def test_a_second_app_store_on_a_filled_store_sees_every_app(apps: AppStore, store: Store) -> None:
    apps.deploy("one", body(host="one.example.com"))
    apps.deploy("two", body())
    again = AppStore(store, max_replicas=MAX)
    assert [s.name for s in again.specs()] == ["one", "two"]
    with pytest.raises(ValidationError):
        again.deploy("three", body(host="one.example.com"))


# -- deploy, releases, scale, remove ---------------------------------------------------------


def test_first_deploy_creates_app_release_and_scale(apps: AppStore, store: Store) -> None:
    result = apps.deploy("web", body(port=8080, env={"A": "1"}))
    assert result.created and result.new_release
    assert result.spec.revision == 1
    assert result.replicas == DEFAULT_REPLICAS
    assert apps.get("web") == AppSpec("web", "nginx:1.27", 8080, {"A": "1"}, None, None, 1)
    assert apps.replicas("web") == DEFAULT_REPLICAS
    release = store.value("release", "web/1")
    assert release is not None
    assert release["app"] == "web" and release["revision"] == 1 and release["image"] == "nginx:1.27"
    assert release["spec"] == apps.get("web").to_value()  # type: ignore[union-attr]
    assert sorted((r.kind, r.key) for r in store.all()) == [("app", "web"), ("release", "web/1"), ("scale", "web")]


def test_same_spec_again_is_not_a_new_release(apps: AppStore, store: Store) -> None:
    apps.deploy("web", body(port=8080, env={"A": "1"}, health="/h", host="w.example.com", replicas=3))
    before = store.all()
    result = apps.deploy("web", body(port=8080, env={"A": "1"}, health="/h", host="w.example.com", replicas=3))
    assert not result.new_release and not result.created
    assert result.spec.revision == 1
    assert result.replicas == 3
    assert store.all() == before  # not a single record rewritten


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"image": "nginx:1.28"}, id="image"),
        pytest.param({"env": {"A": "2"}}, id="env-value"),
        pytest.param({"env": {"A": "1", "B": "x"}}, id="env-added"),
        pytest.param({"port": 9090}, id="port"),
        pytest.param({"health": "/ready"}, id="health"),
        pytest.param({"host": "other.example.com"}, id="host"),
    ],
)
def test_changed_spec_is_a_new_release(apps: AppStore, store: Store, change: dict[str, Any]) -> None:
    base = body(port=8080, env={"A": "1"}, health="/h", host="w.example.com")
    apps.deploy("web", base)
    scale_before = store.get("scale", "web")
    result = apps.deploy("web", {**base, **change})
    assert result.new_release and not result.created
    assert result.spec.revision == 2
    assert apps.get("web").revision == 2  # type: ignore[union-attr]
    second = store.value("release", "web/2")
    assert second is not None and second["revision"] == 2
    assert second["spec"] == result.spec.to_value()
    assert store.value("release", "web/1") is not None  # history kept
    assert store.get("scale", "web") == scale_before  # replicas not given: scale untouched


def test_dropping_env_is_a_new_release(apps: AppStore) -> None:
    apps.deploy("web", body(env={"A": "1"}))
    assert apps.deploy("web", body()).spec.revision == 2


def test_revisions_keep_counting(apps: AppStore, store: Store) -> None:
    for i in range(1, 5):
        assert apps.deploy("web", body(image=f"nginx:{i}")).spec.revision == i
    assert [r.key for r in store.records("release")] == ["web/1", "web/2", "web/3", "web/4"]


def test_replicas_only_change_is_not_a_release(apps: AppStore, store: Store) -> None:
    apps.deploy("web", body(replicas=2))
    app_before = store.get("app", "web")
    result = apps.deploy("web", body(replicas=5))
    assert not result.new_release
    assert result.replicas == 5
    assert store.get("app", "web") == app_before
    assert store.value("scale", "web") == {"replicas": 5}
    assert store.value("release", "web/2") is None


def test_scale_and_deploy_write_separate_records(apps: AppStore, store: Store) -> None:
    apps.deploy("web", body(replicas=2))
    app_before = store.get("app", "web")
    assert apps.scale("web", 4) == 4
    assert store.get("app", "web") == app_before  # the spec record is untouched by scaling
    assert apps.replicas("web") == 4
    scale_after_scale = store.get("scale", "web")
    # A deploy without replicas changes the spec but not the scale.
    apps.deploy("web", body(image="nginx:2"))
    assert store.get("scale", "web") == scale_after_scale
    assert apps.replicas("web") == 4


def test_scale_validates(apps: AppStore, store: Store) -> None:
    apps.deploy("web", body())
    before = store.all()
    for bad in (-1, MAX + 1, True, "3", 1.0):
        with pytest.raises(ValidationError) as exc:
            apps.scale("web", bad)
        assert exc.value.field == "replicas"
    with pytest.raises(ValidationError) as exc:
        apps.scale("Web", 1)
    assert exc.value.field == "name"
    with pytest.raises(NotFound):
        apps.scale("missing", 1)
    assert store.all() == before


def test_scale_to_zero_and_max(apps: AppStore) -> None:
    apps.deploy("web", body())
    assert apps.scale("web", 0) == 0 and apps.replicas("web") == 0
    assert apps.scale("web", MAX) == MAX and apps.replicas("web") == MAX


def test_remove_writes_tombstones(apps: AppStore, store: Store) -> None:
    apps.deploy("web", body())
    apps.deploy("web", body(image="nginx:2"))
    apps.deploy("webshop", body())  # shares a prefix, must survive
    apps.remove("web")
    for kind, key in [("app", "web"), ("scale", "web"), ("release", "web/1"), ("release", "web/2")]:
        rec = store.get(kind, key)
        assert rec is not None and rec.deleted, (kind, key)
    assert apps.get("web") is None
    assert [a.name for a in apps.specs()] == ["webshop"]
    assert store.value("release", "webshop/1") is not None
    assert apps.replicas("web") == DEFAULT_REPLICAS


def test_remove_missing_app(apps: AppStore, store: Store) -> None:
    with pytest.raises(NotFound):
        apps.remove("ghost")
    with pytest.raises(ValidationError):
        apps.remove("Ghost")
    assert store.all() == []


def test_list_and_get(apps: AppStore) -> None:
    apps.deploy("b", body())
    apps.deploy("a", body(port=1))
    assert [a.name for a in apps.specs()] == ["a", "b"]
    assert apps.get("nope") is None


def test_spec_round_trips_through_value() -> None:
    spec = AppSpec("web", "img", 80, {"A": "1"}, "/h", "x.example.com", 4)
    value = spec.to_value()
    assert "name" not in value
    assert AppSpec.from_value("web", value) == spec


@pytest.mark.parametrize("env", [[], "", 0, False])
def test_falsy_non_object_env_is_refused(env: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        validate_deploy("web", body(env=env), MAX)
    assert exc.value.field == "env"


def test_wanted_specs_are_the_apps_that_want_a_replica(apps: AppStore, store: Store) -> None:
    apps.deploy("a", {"image": "img"})  # one replica by default
    apps.deploy("b", {"image": "img", "replicas": 0})
    apps.deploy("c", {"image": "img", "replicas": 3})
    assert [s.name for s in apps.wanted_specs()] == ["a", "c"]
    apps.scale("a", 0)
    apps.scale("b", 2)
    apps.remove("c")
    assert [s.name for s in apps.wanted_specs()] == ["b"]
    # Built again from the store (an agent's start): the same.
    assert [s.name for s in AppStore(store, max_replicas=MAX).wanted_specs()] == ["b"]
