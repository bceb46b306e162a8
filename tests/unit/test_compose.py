"""Compose files onto apps (pleaco.stacks.compose): files written for Docker Compose (plain
keys only, plus ``x-pleaco``), good and bad; and the stack service over a real store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pleaco.apps import AppStore, ValidationError
from pleaco.builds.manifest import parse as parse_manifest
from pleaco.builds.secrets import SecretBox
from pleaco.identity import Identity
from pleaco.stacks.compose import ComposeError, load, plan
from pleaco.stacks.schedule import ScheduleStore
from pleaco.stacks.secrets import AppSecrets
from pleaco.stacks.service import StackConflict, StackNotFound, StackService
from pleaco.store import Store
from tests.unit.test_build_model import _service

MAX = 10
IDENTITY = Identity.generate()

SHOP = """
name: shop
x-common: &common
  restart: unless-stopped
services:
  web:
    <<: *common
    image: registry.example/shop-web:1.4
    command: ["gunicorn", "--bind", "0.0.0.0:8000", "shop.wsgi"]
    environment:
      DATABASE_HOST: db
      WORKERS: 4
      DEBUG: false
    ports: ["8080:8000"]
    healthcheck:
      test: ["CMD", "curl", "-f", "http://localhost:8000/healthz"]
    depends_on:
      db: {condition: service_healthy}
      cache: {condition: service_started}
    deploy:
      replicas: 3
      resources: {limits: {memory: 256M, cpus: "0.5", pids: 200}}
      placement: {constraints: ["node.labels.disk == ssd"]}
    x-pleaco: {host: shop.example.com, https: redirect}
  worker:
    image: registry.example/shop-web:1.4
    entrypoint: /usr/local/bin/celery -A shop worker
    environment: ["DATABASE_HOST=db", "QUEUE=default"]
    depends_on: [db, cache]
  db:
    image: postgres:16
    expose: ["5432"]
    volumes: ["pgdata:/var/lib/postgresql/data", {type: volume, source: pgconf, target: /etc/pg}]
  cache:
    image: redis:7
    expose: [6379]
volumes:
  pgdata:
  pgconf: {}
"""


def doc(text: str) -> dict[str, Any]:
    value = yaml.safe_load(text)
    assert isinstance(value, dict)
    return value


def with_service(**svc: Any) -> dict[str, Any]:
    return {"services": {"web": {"image": "pleaco/hello:latest", **svc}}, "volumes": {"cache": None}}


def error(document: Any, stack: Any = "shop") -> str:
    with pytest.raises(ComposeError) as info:
        plan(stack, document, MAX)
    return str(info.value)


def test_a_compose_file_maps_onto_apps_in_waves() -> None:
    p = plan("shop", doc(SHOP), MAX)
    assert [s.app for s in p.services] == ["shop-cache", "shop-db", "shop-web", "shop-worker"]
    assert p.waves == (("cache", "db"), ("web", "worker"))
    web = p.service("web")
    assert web.body == {
        "image": "registry.example/shop-web:1.4", "command": ["gunicorn", "--bind", "0.0.0.0:8000", "shop.wsgi"],
        "env": {"DATABASE_HOST": "db", "WORKERS": "4", "DEBUG": "false"}, "port": 8000, "health": "/healthz",
        "host": "shop.example.com", "https": "redirect", "replicas": 3, "memory": "256m", "cpus": 0.5,
        "pids": 200, "constraints": ["node.labels.disk == ssd"]}
    assert web.depends_on == ("cache", "db")
    worker = p.service("worker")
    assert worker.body["entrypoint"] == ["/usr/local/bin/celery", "-A", "shop", "worker"]
    assert worker.body["env"] == {"DATABASE_HOST": "db", "QUEUE": "default"}
    assert "port" not in worker.body
    assert p.service("db").body == {"image": "postgres:16", "port": 5432, "volumes": [
        {"name": "pgdata", "path": "/var/lib/postgresql/data"}, {"name": "pgconf", "path": "/etc/pg"}]}
    shared = doc(SHOP)
    shared["services"]["cache"]["volumes"] = ["pgdata:/data"]
    assert error(shared).startswith("services.db.volumes: volume 'pgdata' is also service 'cache'")


@pytest.mark.parametrize(("svc", "where"), [
    ({"build": "."}, "services.web.build"),
    ({"volumes": ["data:/var/lib/data"]}, "services.web.volumes: volume 'data' is not declared"),
    ({"volumes": ["./src:/app"]}, "services.web.volumes: './src:/app': bind mounts"),
    ({"volumes": ["/var/cache"]}, "services.web.volumes: '/var/cache': anonymous volumes"),
    ({"volumes": ["cache:/var/cache:ro"]}, "services.web.volumes: 'cache:/var/cache:ro': mount options"),
    ({"volumes": [{"type": "tmpfs", "target": "/tmp"}]}, "services.web.volumes: type 'tmpfs'"),
    ({"volumes": [{"source": "cache", "target": "/c", "read_only": True}]}, "services.web.volumes.read_only"),
    ({"volumes": ["cache:relative/path"]}, "services.web (volumes): volume cache: path 'relative/path'"),
    ({"networks": ["front"]}, "services.web.networks"),
    ({"privileged": True}, "services.web.privileged"),
    ({"x-pleaco": {"replicas": 2}}, "services.web.x-pleaco.replicas"),
    ({"deploy": {"mode": "global"}}, "services.web.deploy.mode"),
    ({"deploy": {"resources": {"reservations": {"memory": "1g"}}}}, "services.web.deploy.resources.reservations"),
    ({"deploy": {"resources": {"limits": {"devices": []}}}}, "services.web.deploy.resources.limits.devices"),
    ({"deploy": {"placement": {"preferences": []}}}, "services.web.deploy.placement.preferences"),
    ({"healthcheck": {"test": ["pg_isready"]}}, "services.web.healthcheck.test: ['pg_isready']: a list starts"),
    ({"healthcheck": {"test": "pg_isready", "interval": "5 seconds"}}, "services.web.healthcheck.interval"),
    ({"healthcheck": {"test": "pg_isready", "interval": 5}}, "services.web.healthcheck.interval"),
    ({"healthcheck": {"test": "pg_isready", "retries": 0}}, "services.web.healthcheck.retries"),
    ({"healthcheck": {"test": "pg_isready", "start_interval": "1s"}}, "services.web.healthcheck.start_interval"),
    ({"healthcheck": {"test": ["CMD-SHELL", "a", "b"]}}, "services.web.healthcheck: CMD-SHELL takes one"),
    ({"healthcheck": {"test": ["CMD", "redis-cli"]}, "x-pleaco": {"health": "/h"}, "ports": [80]},
     "services.web.x-pleaco.health: the healthcheck is a command"),
    ({"ports": ["8080:80/udp"]}, "services.web.ports"),
    ({"ports": ["8000-8010:8000-8010"]}, "services.web.ports"),
    ({"ports": [80, 443]}, "services.web.ports"),
    ({"restart": "on-failure"}, "services.web.restart"),
    ({"depends_on": {"db": {"condition": "service_completed_successfully"}}}, "services.web.depends_on.db"),
    ({"depends_on": ["db"]}, "services.web.depends_on"),
    ({"environment": {"TOKEN": None}}, "services.web.environment.TOKEN"),
    ({"environment": ["TOKEN"]}, "services.web.environment.TOKEN"),
    ({"environment": {"BAD-NAME": "x"}}, "services.web (environment)"),
    ({"env_file": ".env"}, "services.web.env_file"),
    ({"x-pleaco": {"host": "web.example.com"}}, "services.web.x-pleaco.host"),
    ({"deploy": {"resources": {"limits": {"memory": "1m"}}}}, "services.web (memory)"),
    ({"deploy": {"replicas": 99}}, "services.web (replicas)"),
    ({"deploy": {"placement": {"constraints": ["node.role == manager"]}}}, "services.web (constraints)"),
    ({"image": "not an image"}, "services.web (image)"),
])
def test_what_pleaco_does_not_support_is_an_error_naming_service_and_key(svc: dict[str, Any], where: str) -> None:
    message = error(with_service(**svc))
    assert message.startswith(where), message


def test_top_level_keys_and_names() -> None:
    assert error({**with_service(), "volumes": {"data": {"driver": "nfs"}}}).startswith("volumes.data.driver: ")
    assert error({**with_service(), "volumes": ["data"]}).startswith("volumes: ")
    assert error({**with_service(), "networks": {}}).startswith("networks: ")
    assert error({**with_service(), "name": "other"}).startswith("name: ")
    assert error({"services": {}}).startswith("services: ")
    assert error(["not", "a", "mapping"]).startswith("compose: ")
    assert error({"services": {"web": {"command": "x"}}}).startswith("services.web.image: ")
    # Obsolete and extension keys are fine, as in Compose.
    assert plan("shop", {**with_service(), "version": "3.8", "x-anchors": {"a": 1}}, MAX).name == "shop"
    # Names: the stack's, each service's (it is also a host name), and the app they make.
    assert error(with_service(), stack="Shop").startswith("stack name: ")
    assert error({"services": {"Web_1": {"image": "x"}}}).startswith("services.Web_1: ")
    assert error({"services": {"a" * 60: {"image": "x"}}}, stack="long").startswith(f"services.{'a' * 60} (app name)")


def test_depends_on_cycles_and_unknown_services() -> None:
    cyclic = {"services": {"a": {"image": "x", "depends_on": ["b"]}, "b": {"image": "x", "depends_on": ["c"]},
                           "c": {"image": "x", "depends_on": ["a"]}, "d": {"image": "x"}}}
    assert error(cyclic) == "services: depends_on has a cycle: a -> b -> c -> a"
    assert error({"services": {"a": {"image": "x", "depends_on": ["a"]}}}) == "services: depends_on has a cycle: a -> a"
    assert error({"services": {"a": {"image": "x", "depends_on": ["ghost"]}}}).startswith("services.a.depends_on: ")


def test_health_from_a_healthcheck_or_x_pleaco() -> None:
    for test in (["CMD", "wget", "-qO-", "http://127.0.0.1:8080/ready"], "curl -fsS http://localhost:8080/ready",
                 ["CMD-SHELL", "curl -f http://localhost:8080/ready || exit 1"]):
        assert plan("s", with_service(ports=[8080], healthcheck={"test": test}), MAX).services[0].body["health"] \
            == "/ready"
    assert "health" not in plan("s", with_service(healthcheck={"disable": True}), MAX).services[0].body
    assert "health" not in plan("s", with_service(healthcheck={"test": ["NONE"]}), MAX).services[0].body
    assert plan("s", with_service(ports=[8080], **{"x-pleaco": {"health": "/h"}}), MAX).services[0].body["health"] \
        == "/h"
    assert error(with_service(ports=[8080], healthcheck={"test": "curl http://localhost:9000/h"})) \
        .startswith("services.web.healthcheck.test: checks port 9000")
    assert error(with_service(**{"x-pleaco": {"health": "/h"}})).startswith("services.web (healthcheck)")


def test_a_command_healthcheck_is_run_by_the_engine_with_its_timings() -> None:
    check = {"test": ["CMD", "redis-cli", "ping"], "interval": "1m30s", "timeout": "500ms", "retries": 5,
             "start_period": "2s"}
    body = plan("s", with_service(healthcheck=check), MAX).services[0].body
    assert "health" not in body
    assert body["health_cmd"] == {"test": ["CMD", "redis-cli", "ping"], "interval": 90.0, "timeout": 0.5,
                                  "retries": 5, "start_period": 2.0}
    # A shell line; and a curl with timings of its own stays the command it is (pleaco's
    # HTTP probe has no per-app timings), run by the engine.
    assert plan("s", with_service(healthcheck={"test": "pg_isready -U app"}), MAX).services[0].body["health_cmd"] \
        == {"test": "pg_isready -U app"}
    body = plan("s", with_service(ports=[80], healthcheck={"test": "curl -f http://localhost/", "interval": "5s"}),
                MAX).services[0].body
    assert "health" not in body and body["health_cmd"]["interval"] == 5.0


def test_the_client_reads_env_files_relative_to_the_compose_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "web.env").write_text("# settings\nexport LEVEL=debug\nNAME='shop web'\n\nPORT=1\n")
    compose = tmp_path / "compose.yaml"
    compose.write_text("services:\n  web:\n    image: x\n    env_file: conf/web.env\n    environment: {PORT: 2}\n")
    loaded = load(compose)
    assert loaded["services"]["web"] == {"image": "x", "environment": {"LEVEL": "debug", "NAME": "shop web",
                                                                       "PORT": "2"}}
    assert plan("s", loaded, MAX).services[0].body["env"] == {"LEVEL": "debug", "NAME": "shop web", "PORT": "2"}
    compose.write_text("services:\n  web:\n    image: x\n    env_file: [missing.env]\n")
    with pytest.raises(ComposeError, match=r"^services\.web\.env_file .*missing\.env: cannot read it"):
        load(compose)
    (tmp_path / "bad.env").write_text("OK=1\nnot a pair\n")
    compose.write_text("services:\n  web:\n    image: x\n    env_file: bad.env\n")
    with pytest.raises(ComposeError, match=r"^services\.web\.env_file .*bad\.env, line 2: expected KEY=VALUE"):
        load(compose)
    compose.write_text("services: [\n")
    with pytest.raises(ComposeError, match="not valid YAML"):
        load(compose)
    compose.write_text("services:\n  web: !!python/object:os.system {}\n")
    with pytest.raises(ComposeError, match="not valid YAML"):  # the safe loader builds no objects
        load(compose)


# -- the stack service over a real store ---------------------------------------------------


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[AppStore]:
    store = Store(tmp_path / "state.db", IDENTITY)
    yield AppStore(store, max_replicas=MAX)
    store.close()


def stack_parts(apps: AppStore) -> tuple[AppSecrets, ScheduleStore]:
    """The app secrets and schedules a StackService writes, over the apps' store."""
    data = Path(apps.store.path).parent
    return AppSecrets(apps.store, apps, SecretBox(data), data), ScheduleStore(apps.store)


def two(**web: Any) -> dict[str, Any]:
    return {"services": {"web": {"image": "pleaco/hello:latest", "ports": [8080], "depends_on": ["kv"], **web},
                         "kv": {"image": "pleaco/busybox:latest", "command": "nc -lk -p 7000", "expose": [7000]}}}


def test_deploys_in_order_changes_only_what_changed_and_drops_what_the_file_dropped(apps: AppStore) -> None:
    healthy: set[str] = set()
    order: list[str] = []
    stacks = StackService(apps, *stack_parts(apps), lambda app: app in healthy, lambda: None, poll=0.01)

    def deployed(app: str) -> bool:
        if apps.get(app) is not None and app not in order:
            order.append(app)
            healthy.add(app)  # it "becomes healthy" once deployed
        return app in healthy

    stacks.healthy = deployed
    first = asyncio.run(stacks.deploy("st", two()))
    assert order == ["st-kv"] and first.waves == (("kv",), ("web",))
    assert [(s.app, s.revision, s.created) for s in first.services] == [("st-kv", 1, True), ("st-web", 1, True)]
    assert apps.get("st-web").stack == "st" and apps.get("st-kv").command == ("nc", "-lk", "-p", "7000")  # type: ignore[union-attr]
    again = asyncio.run(stacks.deploy("st", two(environment={"COLOUR": "blue"})))
    assert [(s.app, s.revision, s.changed) for s in again.services] == [("st-kv", 1, False), ("st-web", 2, True)]
    dropped = asyncio.run(stacks.deploy("st", {"services": {"kv": two()["services"]["kv"]}}))
    assert dropped.removed == ("st-web",) and apps.get("st-web") is None
    assert list(stacks.stacks()) == ["st"]
    assert stacks.remove("st") == ["st-kv"] and apps.get("st-kv") is None
    with pytest.raises(StackNotFound):
        stacks.remove("st")


def test_bad_input_or_a_name_taken_changes_nothing(apps: AppStore) -> None:
    stacks = StackService(apps, *stack_parts(apps), lambda app: True, lambda: None)
    apps.deploy("st-kv", {"image": "pleaco/busybox:latest"})  # a plain app in the way
    before = apps.store.count()
    with pytest.raises(StackConflict, match="st-kv"):
        asyncio.run(stacks.deploy("st", two()))
    with pytest.raises(ComposeError, match=r"^services\.web\.privileged"):
        asyncio.run(stacks.deploy("other", two(privileged=True)))
    assert apps.store.count() == before and [s.name for s in apps.specs()] == ["st-kv"]
    # A plain deploy of a stack's app keeps it in the stack.
    asyncio.run(stacks.deploy("ok", {"services": {"web": {"image": "x"}}}))
    apps.deploy("ok-web", {"image": "y"})
    assert apps.get("ok-web").stack == "ok"  # type: ignore[union-attr]


def test_command_and_entrypoint_of_a_plain_deploy(apps: AppStore) -> None:
    spec = apps.deploy("w", {"image": "x", "command": ["-p", "80"], "entrypoint": ["httpd"]}).spec
    assert (spec.command, spec.entrypoint, spec.stack) == (("-p", "80"), ("httpd",), None)
    assert not apps.deploy("w", {"image": "x", "command": ["-p", "80"], "entrypoint": ["httpd"]}).new_release
    assert apps.deploy("w", {"image": "x"}).spec.command is None  # a deploy is the whole spec, as ever
    for bad in ({"command": "httpd -f"}, {"command": ["a\x00b"]}, {"entrypoint": [1]}, {"command": ["x"] * 1025}):
        with pytest.raises(ValidationError, match=f"^{next(iter(bad))}: "):
            apps.deploy("w", {"image": "x", **bad})


def test_a_build_keeps_the_command_and_stack_a_deploy_gave(tmp_path: Path) -> None:
    svc = _service(tmp_path)
    conn = svc.connect("st-web", "https://github.com/o/web.git", None, None).connection
    svc.apps.deploy("st-web", {"image": "img-0", "command": ["serve", "--fast"], "entrypoint": ["/bin/app"]},
                    stack="st")
    b = svc.push(conn, "a" * 40, delivery="d1").build
    assert b is not None
    b.image = "img-a"
    svc._release(b, parse_manifest(""))
    spec = svc.apps.get("st-web")
    assert spec is not None and spec.image == "img-a" and spec.revision == 2
    assert (spec.command, spec.entrypoint, spec.stack) == (("serve", "--fast"), ("/bin/app",), "st")
