"""The activator over a real store and real HTTP on loopback (a stand-in replica served by
aiohttp): the wake writes 1 only when the count is 0 and the policy scales to zero, and
only once; the queue's bound and its timeout answer a clear 503 with a Retry-After; held
requests are released to the first replica with their method, path, headers and body, and
count as demand in the load report meanwhile; the proxy routes an app at zero to it."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pleaco.apps import AppStore
from pleaco.cluster.load import LoadView
from pleaco.config import ConfigError, load
from pleaco.identity import Identity
from pleaco.ingress.activator import Activator, ActivatorSettings
from pleaco.ingress.caddy import ProxySettings, Route, Upstream, build_config
from pleaco.ingress.dns import srv_name
from pleaco.ingress.load import LoadReporter
from pleaco.ingress.proxy import dns_upstreams
from pleaco.metrics import Registry
from pleaco.reconcile.autoscale import decision_record, previous_of
from pleaco.scale import Sample, decide
from pleaco.store import Store

POLL = 0.01  # seconds between looks while a condition settles

ZERO = {"min_replicas": 0, "max_replicas": 3, "metric": "concurrency", "scale_to_zero_after": 5}


@pytest.fixture
def apps(tmp_path: Path) -> Iterator[AppStore]:
    store = Store(tmp_path / "state.db", Identity.generate())
    apps = AppStore(store, 100)
    apps.deploy("web", {"image": "img", "port": 8080})
    apps.set_autoscale("web", ZERO)
    apps.scale("web", 0)
    yield apps
    store.close()


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def activator(apps: AppStore, upstreams: list[str], max_held: int = 2, hold_timeout: float = 10.0) -> Activator:
    return Activator(ActivatorSettings(f"127.0.0.1:{port()}", max_held, hold_timeout), apps,
                     lambda host: {"web.test": "web", "ghost.test": "ghost"}.get(host.split(":")[0]),
                     lambda app: list(upstreams), Registry())


def test_the_wake_writes_one_only_at_zero_and_only_once(apps: AppStore) -> None:
    act = activator(apps, [])
    assert act.wake("web") is True and apps.replicas("web") == 1
    written = apps.store.peek("scale", "web")
    assert written is not None
    # In the decision history, as the autoscaler's decisions are (apps show prints them).
    record = apps.decision("web")
    assert record is not None and record["node"] == apps.store.identity.node_id
    [entry] = record["history"]
    assert (entry["from"], entry["to"], entry["reason"]) == (0, 1, "request while at zero")
    # Idempotent: at 1 already, nothing is written (the record keeps its version).
    assert act.wake("web") is False
    again = apps.store.peek("scale", "web")
    assert again is not None and again.ts == written.ts
    # Not above zero, not without a policy that scales to zero, not for an unknown app.
    apps.scale("web", 2)
    assert act.wake("web") is False and apps.replicas("web") == 2
    apps.set_autoscale("web", {"min_replicas": 0, "max_replicas": 3, "scale_to_zero_after": 5})
    apps.scale("web", 0)
    apps.set_autoscale("web", {"min_replicas": 1, "max_replicas": 3})  # moves the count to 1
    apps.scale("web", 1)
    apps.store.put("scale", "web", {"replicas": 0})  # at 0 without a policy that allows it
    assert act.wake("web") is False and apps.replicas("web") == 0
    assert act.wake("ghost") is False


def test_the_wake_continues_the_autoscalers_history_and_state(apps: AppStore) -> None:
    """After the autoscaler's 1 -> 0, the wake's 0 -> 1 is the next entry, and the state it
    records is one the autoscaler continues from (the counts for its scale-down limit)."""
    policy = apps.autoscale("web")
    assert policy is not None
    apps.scale("web", 1)
    idle = decide(policy, 1, [Sample(t, 0.0) for t in range(-10, 1)], 0.0)
    assert idle.desired == 0
    now = time.time()
    apps.record_decision("web", policy, 1, 0, decision_record("web", idle, 1, policy, "n" * 32, now - 1, None))
    assert activator(apps, []).wake("web") is True
    record = apps.decision("web")
    assert record is not None
    assert [(h["from"], h["to"]) for h in record["history"]] == [(1, 0), (0, 1)]
    previous = previous_of(record, policy)
    assert previous is not None and previous.desired == 1 and previous.counts[-1][1] == 1
    # Someone else set the count meanwhile: the wake writes nothing, count or history.
    apps.scale("web", 0)
    real = apps.decision

    def scaled_meanwhile(name: str) -> dict[str, Any] | None:
        apps.scale(name, 2)  # after the wake read the count (0)
        return real(name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(apps, "decision", scaled_meanwhile)
        assert activator(apps, []).wake("web") is False
    assert apps.replicas("web") == 2 and apps.decision("web") == record


async def _get(url: str, app: str = "web", **kw: Any) -> tuple[int, str, dict[str, str]]:
    async with aiohttp.ClientSession() as s, s.request(kw.pop("method", "GET"), url,
                                                       headers={"Host": f"{app}.test", **kw.pop("headers", {})},
                                                       **kw) as r:
        return r.status, await r.text(), dict(r.headers)


def test_beyond_max_held_and_after_the_timeout_a_clear_503_with_retry_after(apps: AppStore) -> None:
    act = activator(apps, [], max_held=2, hold_timeout=1.0)

    async def run() -> list[tuple[int, str, dict[str, str]]]:
        await act.start()
        try:
            url = f"http://{act.settings.listen}/x"
            held = [asyncio.create_task(_get(url)) for _ in range(2)]
            for _ in range(200):
                if act.held().get("web") == 2:
                    break
                await asyncio.sleep(POLL)
            assert act.held() == {"web": 2}
            over = await _get(url)  # the third, while two are held
            return [over, *await asyncio.gather(*held)]
        finally:
            await act.stop()

    over, *timed_out = asyncio.run(run())
    assert over[0] == 503 and "already holds 2 requests" in over[1] and "activator_max_held" in over[1]
    assert over[2]["Retry-After"] == "1"
    for status, body, headers in timed_out:
        assert status == 503 and "no replica of web became healthy within 1s" in body and headers["Retry-After"]
    assert apps.replicas("web") == 1  # woken meanwhile
    assert act.held() == {}


def test_held_requests_are_released_to_the_first_replica_with_method_headers_and_body(apps: AppStore) -> None:
    upstreams: list[str] = []
    act = activator(apps, upstreams, max_held=5)
    seen: list[dict[str, Any]] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append({"method": request.method, "path": request.path_qs, "body": await request.read(),
                     "headers": dict(request.headers)})
        return web.Response(text=f"hello {request.method}", headers={"X-App": "yes"})

    async def run() -> list[tuple[int, str, dict[str, str]]]:
        replica = web.Application()
        replica.router.add_route("*", "/{tail:.*}", echo)
        runner = web.AppRunner(replica)
        await runner.setup()
        replica_port = port()
        await web.TCPSite(runner, "127.0.0.1", replica_port).start()
        await act.start()
        try:
            url = f"http://{act.settings.listen}/a/b?c=1"
            tasks = [asyncio.create_task(_get(url)),
                     asyncio.create_task(_get(url, method="POST", data=b"payload", headers={"X-Mine": "1"}))]
            for _ in range(200):
                if act.held().get("web") == 2:
                    break
                await asyncio.sleep(POLL)
            assert act.held() == {"web": 2} and apps.replicas("web") == 1 and seen == []
            upstreams.append(f"127.0.0.1:{replica_port}")  # the first replica is serving
            return list(await asyncio.gather(*tasks))
        finally:
            await act.stop()
            await runner.cleanup()

    got = asyncio.run(run())
    assert [(s, b) for s, b, _ in got] == [(200, "hello GET"), (200, "hello POST")]
    assert all(h["X-App"] == "yes" for _, _, h in got)
    post = next(r for r in seen if r["method"] == "POST")
    assert post["path"] == "/a/b?c=1" and post["body"] == b"payload" and post["headers"]["X-Mine"] == "1"
    assert all(r["headers"]["Host"] == "web.test" for r in seen)


def test_requests_for_no_app_are_refused(apps: AppStore) -> None:
    act = activator(apps, [])

    async def run() -> tuple[int, str, dict[str, str]]:
        await act.start()
        try:
            return await _get(f"http://{act.settings.listen}/", app="ghost")
        finally:
            await act.stop()

    status, body, _ = asyncio.run(run())
    assert status == 404 and "no app" in body and apps.replicas("web") == 0


def test_held_requests_are_demand_in_the_load_report() -> None:
    view: Any = SimpleNamespace(observed=SimpleNamespace(containers=[]))
    held = {"web": 3}
    reporter = LoadReporter(2.0, view, None, lambda entries: None, LoadView("me", 10.0), Registry(),
                            held=lambda: dict(held))
    (entry,) = reporter.entries()
    assert entry.app == "web" and entry.concurrency == 3 and entry.rps == pytest.approx(3 / 2.0)
    held.clear()
    (gone,) = reporter.entries()  # reported once more with zeros, so the figure drops at once
    assert gone.concurrency == 0 and reporter.entries() == []


SETTINGS = ProxySettings(listen="127.0.0.1:8080", https_listen="127.0.0.1:8443", admin_listen="127.0.0.1:2019",
                         try_duration=5.0, health_interval=2.0, dns="127.0.0.1:5300", activator="127.0.0.1:2020")


def _handler(cfg: dict[str, Any], host: str) -> dict[str, Any]:
    (found,) = [r for r in cfg["apps"]["http"]["servers"]["http"]["routes"] if r.get("match") == [{"host": [host]}]]
    return dict(found["handle"][0])


def test_the_proxy_routes_an_app_at_zero_to_the_activator_with_no_config_change() -> None:
    zero = Route("web", "web.test", "off", "/healthz", (), activate=True)
    up = dataclasses.replace(zero, upstreams=(Upstream("127.0.0.1:3000", "c1"),))
    plain = Route("other", "other.test", "off", "/healthz", ())
    cfg = build_config([zero, plain], SETTINGS)
    # The same reverse proxy with or without replicas (no reload between zero and one) ...
    h = _handler(cfg, "web.test")
    assert h["handler"] == "reverse_proxy" and h["dynamic_upstreams"]["name"] == srv_name("web")
    assert build_config([up, plain], SETTINGS) == cfg
    # ... whose upstreams the agent's DNS answers: the activator while there is no replica.
    assert dns_upstreams([zero, plain], "127.0.0.1:2020") == {"web": [("127.0.0.1", 2020)], "other": []}
    assert dns_upstreams([up], "127.0.0.1:2020") == {"web": [("127.0.0.1", 3000)]}
    assert dns_upstreams([zero], "") == {"web": []}
    # Without the policy, without an activator, or in the boot file: the immediate 503.
    assert _handler(cfg, "other.test")["status_code"] == 503
    for settings in (dataclasses.replace(SETTINGS, activator=""), dataclasses.replace(SETTINGS, dns="")):
        assert _handler(build_config([zero], settings), "web.test")["status_code"] == 503


@pytest.mark.parametrize(("env", "says"), [
    ({"PLEACO_PROXY_ACTIVATOR_LISTEN": "0.0.0.0:2020"}, "loopback"),
    ({"PLEACO_PROXY_ACTIVATOR_LISTEN": "nope"}, "activator_listen"),
    ({"PLEACO_PROXY_ACTIVATOR_MAX_HELD": "0"}, "activator_max_held"),
    ({"PLEACO_PROXY_ACTIVATOR_HOLD_TIMEOUT": "0"}, "activator_hold_timeout"),
])
def test_activator_settings_are_validated(env: dict[str, str], says: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pleaco import config
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", tmp_path / "absent" / "pleaco.toml")
    with pytest.raises(ConfigError, match=says):
        load(env=env)
    assert load(env={"PLEACO_PROXY_ACTIVATOR_LISTEN": ""}).proxy.activator_listen == ""
