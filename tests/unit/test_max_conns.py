"""The per-app connection cap (``max_conns``): validation, what ``apps show`` prints, and
the Caddy config it gives the app's route (the app's cap, else ``[proxy]
upstream_max_conns``). Through a real proxy: tests/integration/test_proxy.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pleaco.apps import MAX_CONNS, AppStore, ValidationError, validate_deploy
from pleaco.cli import apps as cli_apps
from pleaco.identity import Identity
from pleaco.ingress.caddy import ProxySettings, Route, Upstream, build_config
from pleaco.store import Store

IMG = "pleaco/hello:latest"
STATIC = ProxySettings(listen="0.0.0.0:80", https_listen="0.0.0.0:443", admin_listen="127.0.0.1:2019",
                       try_duration=5.0, health_interval=2.0)
DYNAMIC = dataclasses.replace(STATIC, listen="127.0.0.1:8080", dns="127.0.0.1:5300")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "apps.db", Identity.generate())
    yield s
    s.close()


def transport(routes: list[Route], s: ProxySettings, host: str) -> dict[str, Any]:
    cfg = build_config(routes, s)
    for r in cfg["apps"]["http"]["servers"]["http"]["routes"]:
        if r.get("match") == [{"host": [host]}]:
            return dict(r["handle"][0].get("transport", {}))
    raise AssertionError(f"no route for {host}")


def route(app: str, max_conns: int | None) -> Route:
    return Route(app, f"{app}.test", "off", "/healthz", (Upstream("127.0.0.1:3000", "c1"),), max_conns=max_conns)


@pytest.mark.parametrize("settings", [STATIC, DYNAMIC], ids=["static", "dns"])
def test_the_apps_cap_else_the_proxys_default_else_none(settings: ProxySettings) -> None:
    routes = [route("capped", 2), route("unset", None), route("uncapped", 0)]
    # No default: only the app that names a cap gets one.
    assert transport(routes, settings, "capped.test")["max_conns_per_host"] == 2
    assert "max_conns_per_host" not in transport(routes, settings, "unset.test")
    assert "max_conns_per_host" not in transport(routes, settings, "uncapped.test")
    # A default of 8: the app's own cap still wins, an app without one gets 8, and 0 opts out.
    default = dataclasses.replace(settings, upstream_max_conns=8)
    assert transport(routes, default, "capped.test")["max_conns_per_host"] == 2
    assert transport(routes, default, "unset.test")["max_conns_per_host"] == 8
    assert "max_conns_per_host" not in transport(routes, default, "uncapped.test")
    # The transport keeps what it had besides the cap (the DNS resolver with dynamic upstreams).
    t = transport(routes, settings, "capped.test")
    assert t["protocol"] == "http" and ("resolver" in t) == bool(settings.dns)


@pytest.mark.parametrize("bad", [-1, 70000, "8", 2.5, True])
def test_a_record_with_a_cap_caddy_would_refuse_gets_the_proxys_default(bad: Any) -> None:
    # The API refuses these; a record written around it must not make the whole config fail.
    default = dataclasses.replace(DYNAMIC, upstream_max_conns=8)
    assert transport([route("odd", bad)], default, "odd.test")["max_conns_per_host"] == 8
    assert "max_conns_per_host" not in transport([route("odd", bad)], DYNAMIC, "odd.test")


@pytest.mark.parametrize(("value", "message"), [
    (-1, "expected a whole number 0..65535 (0: no cap), got -1"),
    (MAX_CONNS + 1, "got 65536"),
    (10**12, "got 1000000000000"),
    (2.5, "got 2.5"),
    ("8", "got '8'"),
    ("lots", "got 'lots'"),
    (True, "got True"),
])
def test_bad_caps_are_refused_naming_the_field_and_change_nothing(store: Store, value: Any, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        validate_deploy("web", {"image": IMG, "max_conns": value}, 10)
    assert err.value.field == "max_conns" and message in str(err.value)
    apps = AppStore(store, 10)
    apps.deploy("web", {"image": IMG, "port": 8080, "max_conns": 4})
    before = store.count()
    with pytest.raises(ValidationError):
        apps.deploy("web", {"image": IMG, "port": 8080, "max_conns": value})
    assert store.count() == before and apps.get("web").max_conns == 4  # type: ignore[union-attr]


def test_the_cap_is_kept_in_the_spec_and_shown(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    apps = AppStore(store, 10)
    assert apps.deploy("web", {"image": IMG, "port": 8080}).spec.max_conns is None
    spec = apps.deploy("web", {"image": IMG, "port": 8080, "max_conns": 0}).spec
    assert spec.max_conns == 0 and AppStore(store, 10).get("web").max_conns == 0  # type: ignore[union-attr]
    assert apps.deploy("web", {"image": IMG, "port": 8080, "max_conns": MAX_CONNS}).spec.max_conns == MAX_CONNS
    shown = {"name": "web", "image": IMG, "revision": 3, "state": "running", "message": "", "healthy": 1,
             "running": 1, "replicas": 1, "port": 8080, "health": None, "host": None, "env": {}, "instances": []}
    cli_apps.show({**shown, "max_conns": 8})
    assert "max conns  8 per replica from each proxy" in capsys.readouterr().out
    cli_apps.show({**shown, "max_conns": 0})
    assert "max conns  no cap (whatever" in capsys.readouterr().out
    cli_apps.show({**shown, "max_conns": None})
    assert "max conns" not in capsys.readouterr().out
