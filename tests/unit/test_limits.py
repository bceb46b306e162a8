"""Resource limits per app: validation, the [apps] defaults, what the app loop asks the
engine for (the twin keeps it), and the status of a replica killed for its memory limit.
Against Docker Engine: tests/integration/test_scale.py."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_reconcile_twin import IMG, World, deploy, running

from pleaco import config
from pleaco.apps import AppDefaults, AppStore, ValidationError, format_memory, parse_memory, validate_deploy
from pleaco.identity import Identity
from pleaco.store import Store


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "apps.db", Identity.generate())
    yield s
    s.close()


def test_sizes_parse_in_dockers_units_and_print_back() -> None:
    assert parse_memory("256m") == 256 << 20 == parse_memory(256 << 20) == parse_memory(" 256M ")
    assert parse_memory("1g") == 1 << 30 and parse_memory("6144k") == 6 << 20
    assert parse_memory(str(7 << 20)) == 7 << 20 and parse_memory(f"{7 << 20}b") == 7 << 20
    assert [format_memory(n) for n in (256 << 20, 1 << 30, 6144 << 10, (6 << 20) + 1)] == [
        "256m", "1g", "6m", f"{(6 << 20) + 1}b"]


BAD_LIMITS: list[tuple[dict[str, Any], str, str]] = [
    ({"memory": "0"}, "memory", "below Docker's minimum of 6m"),
    ({"memory": 0}, "memory", "below Docker's minimum"),
    ({"memory": "4m"}, "memory", "below Docker's minimum"),
    ({"memory": -1}, "memory", "below Docker's minimum"),
    ({"memory": "-256m"}, "memory", "is not a size"),
    ({"memory": "lots"}, "memory", "is not a size"),
    ({"memory": "1.5g"}, "memory", "is not a size"),
    ({"memory": "256mb"}, "memory", "is not a size"),
    ({"memory": True}, "memory", "is not a size"),
    ({"memory": "99999999g"}, "memory", "more than any machine has"),
    ({"cpus": 0}, "cpus", "out of range 0.01..1024"),
    ({"cpus": -0.5}, "cpus", "out of range"),
    ({"cpus": 0.001}, "cpus", "out of range"),
    ({"cpus": math.nan}, "cpus", "expected a number"),
    ({"cpus": math.inf}, "cpus", "expected a number"),
    ({"cpus": "0.5"}, "cpus", "expected a number"),
    ({"cpus": True}, "cpus", "expected a number"),
    ({"pids": 0}, "pids", "expected a whole number 1..4194304"),
    ({"pids": -1}, "pids", "expected a whole number"),
    ({"pids": 2.5}, "pids", "expected a whole number"),
    ({"pids": "100"}, "pids", "expected a whole number"),
]


@pytest.mark.parametrize(("limits", "field", "message"), BAD_LIMITS)
def test_bad_limits_are_refused_naming_the_field(store: Store, limits: dict[str, Any], field: str,
                                                 message: str) -> None:
    with pytest.raises(ValidationError) as err:
        validate_deploy("web", {"image": IMG, **limits}, 10)
    assert err.value.field == field and message in str(err.value)
    apps = AppStore(store, 10)
    apps.deploy("web", {"image": IMG, "memory": "64m"})
    before = store.count()
    with pytest.raises(ValidationError):
        apps.deploy("web", {"image": IMG, **limits})
    assert store.count() == before and apps.get("web").memory == 64 << 20  # type: ignore[union-attr]


def test_a_limit_is_part_of_the_release(store: Store) -> None:
    apps = AppStore(store, 10)
    first = apps.deploy("web", {"image": IMG, "memory": "64m", "cpus": 0.5, "pids": 50})
    assert (first.spec.memory, first.spec.cpus, first.spec.pids) == (64 << 20, 0.5, 50)
    assert not apps.deploy("web", {"image": IMG, "memory": 64 << 20, "cpus": 0.5, "pids": 50}).new_release
    changed = apps.deploy("web", {"image": IMG, "memory": "128m", "cpus": 0.5, "pids": 50})
    assert changed.new_release and changed.spec.revision == 2
    # An app written before limits existed (no such fields in its record) reads as none.
    store.put("app", "old", {"image": IMG, "revision": 1})
    assert AppStore(store, 10).get("old").memory is None  # type: ignore[union-attr]


def test_defaults_fill_what_a_deploy_does_not_name(store: Store) -> None:
    apps = AppStore(store, 10, AppDefaults(memory="512m", cpus=1.0, pids=100))
    spec = apps.deploy("web", {"image": IMG}).spec
    assert (spec.memory, spec.cpus, spec.pids) == (512 << 20, 1.0, 100)
    assert not apps.deploy("web", {"image": IMG}).new_release  # the same spec again: nothing
    spec = apps.deploy("web", {"image": IMG, "memory": "64m", "pids": 10}).spec
    assert (spec.memory, spec.cpus, spec.pids) == (64 << 20, 1.0, 10)
    none = AppStore(store, 10, AppDefaults(memory="", cpus=0.0, pids=0)).deploy("api", {"image": IMG}).spec
    assert (none.memory, none.cpus, none.pids) == (None, None, None)


def test_the_apps_table_in_the_config(tmp_path: Path) -> None:
    assert config.load(env={}).apps == AppDefaults(memory="", cpus=0.0, pids=4096)
    path = tmp_path / "pleaco.toml"
    path.write_text('[apps]\nmemory = "256m"\ncpus = 0.5\npids = 200\n')
    assert config.load(path, env={}).apps == AppDefaults(memory="256m", cpus=0.5, pids=200)
    assert config.load(env={"PLEACO_APPS_MEMORY": "1g"}).apps.memory == "1g"
    for text, message in [('memory = "4m"', "apps.memory: '4m' is below"), ("cpus = -1.0", "apps.cpus"),
                          ("pids = -3", "apps.pids"), ("colour = 1", "unknown setting 'apps.colour'")]:
        path.write_text(f"[apps]\n{text}\n")
        with pytest.raises(config.ConfigError, match=message):
            config.load(path, env={})


def test_the_engine_is_asked_for_the_limits(world: World) -> None:
    n = world.node()
    n.apps.deploy("web", {"image": IMG, "replicas": 2, "port": 8080, "memory": "64m", "cpus": 0.5, "pids": 50})
    n.settle(lambda: len(running(n)) == 2, "2 running")
    for c in running(n):
        made = world.engine.inspect(c.id)
        assert (made.memory, made.nano_cpus, made.pids) == (64 << 20, 500_000_000, 50)
    status = n.status().to_json()
    assert (status["memory"], status["cpus"], status["pids"]) == (64 << 20, 0.5, 50)


def test_out_of_memory_is_named_in_the_status(world: World) -> None:
    n = world.node()
    n.apps.deploy("web", {"image": IMG, "replicas": 1, "port": 8080, "memory": "64m"})
    n.settle(lambda: len(running(n)) == 1, "running")
    [c] = running(n)
    world.engine.crash(c.id, oom=True)
    n.settle(lambda: n.status().state == "crashloop", "crashloop")
    st = n.status()
    assert st.message.startswith("replica 0 exited: out of memory (limit 64m); restarted"), st.message
    assert st.instances[0].last_exit_code == 137
    # A crash that is not the OOM killer's keeps its exit code as the reason.
    n.settle(lambda: len(running(n)) == 1, "restarted")
    world.engine.crash(running(n)[0].id, exit_code=3)
    n.settle(lambda: "exited with code 3" in n.status().message, "the plain crash's reason")
    # Killed (137) with OOMKilled not set, which Docker does when the OOM event loses its
    # race with the exit: likely out of memory, and said so.
    n.settle(lambda: len(running(n)) == 1, "restarted")
    world.engine.crash(running(n)[0].id, exit_code=137)
    n.settle(lambda: "likely out of memory (limit 64m)" in n.status().message, "likely out of memory")


def test_an_app_without_limits_runs_without(world: World) -> None:
    n = world.node()
    deploy(n, 1)
    n.settle(lambda: len(running(n)) == 1, "running")
    made = world.engine.inspect(running(n)[0].id)
    assert (made.memory, made.nano_cpus, made.pids) == (None, None, None)


def test_limits_the_engine_refuses_are_named_in_the_status(world: World) -> None:
    n = world.node()  # the twin has 4 CPUs, and refuses more as Docker does
    n.apps.deploy("web", {"image": IMG, "replicas": 1, "port": 8080, "cpus": 8})
    n.settle(lambda: "cannot start" in n.status().message, "the refusal in the status")
    st = n.status()
    assert st.state == "starting" and st.message.startswith(
        "replica 0 cannot start: docker engine: Range of CPUs is from 0.01 to 4.00"), st.message
    # A new release that fits starts, and the old refusal is not its message.
    n.apps.deploy("web", {"image": IMG, "replicas": 1, "port": 8080, "cpus": 2})
    n.settle(lambda: n.status().state == "running", "running")
