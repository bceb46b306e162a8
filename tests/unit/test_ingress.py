"""The proxy's pure parts: Caddy config, the upstream DNS, access-log metrics, settings."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pleaco import config
from pleaco.apps import ValidationError, validate_deploy
from pleaco.config import ConfigError, load
from pleaco.ingress import dns, traffic
from pleaco.ingress.caddy import (
    CaddyAdmin,
    ForeignProxy,
    ProxySettings,
    Route,
    Upstream,
    admin_session,
    build_config,
    config_marker,
    identity_marker,
    is_internal_name,
    route_problems,
)
from pleaco.ingress.config import ProxyConfig
from pleaco.ingress.orphans import OrphanSweeper, config_addresses, find_orphans, overlap, parse_address
from pleaco.ingress.traffic import TrafficStats
from pleaco.metrics import Registry
from pleaco.net import dnswire
from pleaco.runtime.docker import ContainerInfo, InfraInfo
from pleaco.urlpath import health_path_problem

SETTINGS = ProxySettings(listen="0.0.0.0:80", https_listen="0.0.0.0:443", admin_listen="127.0.0.1:2019",
                         try_duration=5.0, health_interval=2.0)
DYNAMIC = ProxySettings(listen="127.0.0.1:8080", https_listen="127.0.0.1:8443", admin_listen="127.0.0.1:2019",
                        try_duration=5.0, health_interval=2.0, access_log="127.0.0.1:9000", dns="127.0.0.1:5300")


def route(app: str, host: str, https: str = "on", ups: int = 2) -> Route:
    return Route(app, host, https, "/healthz",
                 tuple(Upstream(f"127.0.0.1:{3000 + i}", f"c{app}{i}") for i in range(ups)))


@pytest.fixture(autouse=True)
def no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", tmp_path / "absent" / "pleaco.toml")


def handler(cfg: dict[str, Any], server: str, host: str) -> dict[str, Any]:
    for r in cfg["apps"]["http"]["servers"][server]["routes"]:
        if r.get("match") == [{"host": [host]}]:
            return dict(r["handle"][0])
    raise AssertionError(f"no route for {host} on {server}")


def test_static_config_lists_upstreams_with_least_conn_retries_and_health_checks() -> None:
    cfg = build_config([route("web", "web.example.com")], SETTINGS)
    assert cfg["admin"] == {"listen": "127.0.0.1:2019", "config": {"persist": False}}
    h = handler(cfg, "http", "web.example.com")
    assert h["upstreams"] == [{"dial": "127.0.0.1:3000"}, {"dial": "127.0.0.1:3001"}]
    assert h["load_balancing"]["selection_policy"] == {"policy": "least_conn"}
    assert h["load_balancing"]["try_duration"] == "5s"
    assert h["health_checks"]["active"]["uri"] == "/healthz"
    http = cfg["apps"]["http"]["servers"]["http"]
    assert http["listen"] == [":80"] and http["automatic_https"] == {"disable": True}
    # Public name: no internal-CA policy, so Caddy's default (ACME) applies.
    assert "tls" not in cfg["apps"] and cfg["apps"]["http"]["servers"]["https"]["listen"] == [":443"]
    assert "logging" not in cfg


def test_dynamic_config_takes_upstreams_from_the_agent_dns() -> None:
    cfg = build_config([route("web", "web.pleaco.internal")], DYNAMIC)
    h = handler(cfg, "http", "web.pleaco.internal")
    assert "upstreams" not in h and "active" not in h["health_checks"]
    assert h["dynamic_upstreams"]["source"] == "srv"
    assert h["dynamic_upstreams"]["name"] == "web.upstreams.pleaco"
    assert h["dynamic_upstreams"]["resolver"] == {"addresses": ["udp/127.0.0.1:5300"]}
    assert h["transport"]["resolver"] == {"addresses": ["udp/127.0.0.1:5300"]}
    assert cfg["apps"]["tls"]["automation"]["policies"] == [
        {"subjects": ["web.pleaco.internal"], "issuers": [{"module": "internal"}]}]
    assert cfg["logging"]["logs"]["pleaco_access"]["writer"] == {"output": "net", "address": "tcp/127.0.0.1:9000"}
    # Only the set of routes matters: the same routes with other upstreams give the same
    # config, so a rollout causes no reload.
    assert build_config([route("web", "web.pleaco.internal", ups=5)], DYNAMIC) == cfg
    # Caddy 2.6 refuses grace_period: it is only there when asked for.
    assert "grace_period" not in h["dynamic_upstreams"]
    graced = build_config([route("web", "web.pleaco.internal")], dataclasses.replace(DYNAMIC, dns_grace=600))
    assert handler(graced, "http", "web.pleaco.internal")["dynamic_upstreams"]["grace_period"] == "600s"


def test_redirect_off_no_upstreams_and_unknown_hosts() -> None:
    cfg = build_config([route("a", "a.test", "redirect"), route("b", "b.test", "off"),
                        route("c", "c.test", ups=0)], DYNAMIC)
    redirect = handler(cfg, "http", "a.test")
    assert redirect["status_code"] == 308
    assert redirect["headers"]["Location"] == ["https://{http.request.host}:8443{http.request.uri}"]
    assert handler(cfg, "https", "a.test")["handler"] == "reverse_proxy"
    assert handler(cfg, "http", "b.test")["handler"] == "reverse_proxy"
    https_hosts = [r["match"][0]["host"][0] for r in cfg["apps"]["http"]["servers"]["https"]["routes"] if "match" in r]
    assert https_hosts == ["a.test", "c.test"]  # "off" is HTTP only
    assert handler(cfg, "http", "c.test")["status_code"] == 503
    last = cfg["apps"]["http"]["servers"]["http"]["routes"][-1]
    assert "match" not in last and last["handle"][0]["status_code"] == 404
    assert json.loads(json.dumps(cfg)) == cfg


@pytest.mark.parametrize(("host", "internal"), [
    ("web.pleaco.internal", True), ("x.local", True), ("localhost", True), ("a.test", True),
    ("shop.example.com", False), ("internal.example.org", False),
])
def test_internal_names(host: str, internal: bool) -> None:
    assert is_internal_name(host) is internal


def query(name: str, qtype: int, qid: int = 7) -> bytes:
    return struct.pack(">HHHHHH", qid, 0x100, 1, 0, 0, 0) + dnswire.encode_name(name) + struct.pack(">HH", qtype, 1)


def parse_answers(msg: bytes) -> tuple[int, int, list[tuple[int, bytes]]]:
    """(id, rcode, [(type, rdata)]) of a response whose records' owner names are pointers."""
    qid, flags, _qd, an = struct.unpack(">HHHH", msg[:8])
    i = 12
    while msg[i]:
        i += msg[i] + 1
    i += 5
    out = []
    for _ in range(an):
        assert msg[i:i + 2] == b"\xc0\x0c"
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", msg[i + 2:i + 12])
        out.append((rtype, msg[i + 12:i + 12 + rdlen]))
        i += 12 + rdlen
    assert i == len(msg)
    return qid, flags & 0xF, out


def test_dns_answers_srv_with_uncompressed_targets_and_their_addresses() -> None:
    server = dns.UpstreamDNS()
    server.set_upstreams({"web": [("127.0.0.1", 3000), ("10.0.0.5", 3001)]})
    qid, rcode, answers = parse_answers(server.answer(query("web.upstreams.pleaco", dns.QTYPE_SRV, 42)))
    assert (qid, rcode) == (42, 0)
    srv = [(struct.unpack(">HHH", r[:6])[2], r[6:]) for t, r in answers if t == dns.QTYPE_SRV]
    assert srv == [(3000, dnswire.encode_name("ip-127-0-0-1.pleaco")),
                   (3001, dnswire.encode_name("ip-10-0-0-5.pleaco"))]
    _, rcode, answers = parse_answers(server.answer(query("ip-10-0-0-5.pleaco", dns.QTYPE_A)))
    assert rcode == 0 and answers == [(dns.QTYPE_A, bytes([10, 0, 0, 5]))]
    _, rcode, answers = parse_answers(server.answer(query("ip-10-0-0-5.pleaco", 28)))  # AAAA: none
    assert rcode == 0 and answers == []
    for unknown in ("ghost.upstreams.pleaco", "ip-999-0-0-1.pleaco", "example.com"):
        assert parse_answers(server.answer(query(unknown, dns.QTYPE_SRV)))[1] == dns.RCODE_NXDOMAIN
    assert server.answer(b"\x00\x07junk")[3] & 0xF == dns.RCODE_FORMERR
    assert server.answer(b"") == b""


def test_dns_answers_fit_udp_with_many_replicas() -> None:
    server = dns.UpstreamDNS()
    ups = [("127.0.0.1", 30000 + i) for i in range(50)]
    server.set_upstreams({"a-long-app-name-of-forty-characters-abcd": ups})
    msg = server.answer(query("a-long-app-name-of-forty-characters-abcd.upstreams.pleaco", dns.QTYPE_SRV))
    assert len(msg) <= 512
    ports = {struct.unpack(">HHH", r[:6])[2] for _, r in parse_answers(msg)[2]}
    assert len(ports) == dns.MAX_RECORDS and ports <= {p for _, p in ups}


def test_access_log_lines_become_per_app_metrics() -> None:
    registry = Registry()
    stats = TrafficStats(registry)
    stats.set_hosts({"web.test": "web"})
    line = {"request": {"host": "web.test:8080"}, "duration": 0.003, "status": 200}
    for _ in range(3):
        stats.record(json.dumps(line).encode())
    stats.record(json.dumps({**line, "status": 502}).encode())
    stats.record(json.dumps({**line, "request": {"host": "other.test"}}).encode())
    stats.record(b"not json")
    text = registry.render()
    assert 'pleaco_app_requests_total{app="web",code="2xx"} 3' in text
    assert 'pleaco_app_requests_total{app="web",code="5xx"} 1' in text
    assert 'pleaco_app_request_duration_seconds_bucket{app="web",le="0.005"} 4' in text
    assert 'pleaco_proxy_access_log_lines_total{result="unknown_host"} 1' in text
    assert 'pleaco_proxy_access_log_lines_total{result="unparsed"} 1' in text
    assert stats.in_flight()[("web",)] == pytest.approx(4 * 0.003 / traffic.WINDOW, abs=0.001)


def test_proxy_and_rollout_settings_load_from_env_and_are_validated() -> None:
    cfg = load(env={"PLEACO_PROXY_ADMIN_LISTEN": "127.0.0.1:3019", "PLEACO_ROLLOUT_MAX_SURGE": "1",
                    "PLEACO_ROLLOUT_DRAIN_GRACE": "0.5", "PLEACO_CLUSTER_DOMAIN": "apps.internal"})
    assert cfg.proxy.admin_listen == "127.0.0.1:3019" and cfg.rollout.max_surge == 1
    assert cfg.rollout.drain_grace == 0.5 and cfg.cluster_domain == "apps.internal"
    for env, needle in [
        ({"PLEACO_PROXY_ADMIN_LISTEN": "0.0.0.0:2019"}, "loopback"),
        ({"PLEACO_PROXY_ADMIN_LISTEN": "nope"}, "admin_listen"),
        ({"PLEACO_ROLLOUT_MAX_SURGE": "0"}, "never replace"),
        ({"PLEACO_ROLLOUT_DEADLINE": "0"}, "deadline"),
        ({"PLEACO_PROXY_TRY_DURATION": "-1"}, "try_duration"),
        ({"PLEACO_CLUSTER_DOMAIN": "Not_A.Domain"}, "cluster_domain"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            load(env=env)


def test_https_mode_is_validated() -> None:
    spec, _ = validate_deploy("web", {"image": "x", "https": "redirect"}, 10)
    assert spec.https == "redirect"
    assert validate_deploy("web", {"image": "x"}, 10)[0].https is None
    for bad in ("always", True, 1, ""):
        with pytest.raises(ValidationError, match=r"^https:"):
            validate_deploy("web", {"image": "x", "https": bad}, 10)


def test_hosts_file_names_every_upstream_and_is_rewritten_in_place(tmp_path: Path) -> None:
    from pleaco.ingress.hosts import HostsFile

    path = tmp_path / "hosts"
    hosts = HostsFile(path, "127.0.0.1 localhost")
    assert hosts.ensure(["172.17.0.2"])
    inode = path.stat().st_ino
    assert not hosts.ensure(["172.17.0.2"])  # nothing new: not written again
    assert hosts.ensure(["10.0.0.6"])  # a new one; the old one stays (never wrong)
    lines = path.read_text().splitlines()
    assert lines[0] == "127.0.0.1 localhost"
    assert "172.17.0.2 ip-172-17-0-2.pleaco" in lines and "10.0.0.6 ip-10-0-0-6.pleaco" in lines
    assert path.stat().st_ino == inode  # a bind mount keeps seeing it


@pytest.mark.parametrize("path", ["/", "/healthz", "/healthz?x=1&y=%20", "/a%2Fb", "/~user/ready.json",
                                  "/" + "a" * 1023])
def test_health_paths_caddy_and_clients_accept(path: str) -> None:
    assert health_path_problem(path) is None
    validate_deploy("web", {"image": "x", "port": 80, "health": path}, 10)


@pytest.mark.parametrize(("path", "says"), [
    ("/healthz#%zz", "fragment"), ("/healthz#top", "fragment"), ("/a%zz", "'%'"), ("/a%2", "'%'"),
    ("/a?q=%g0", "'%'"), ("/a b", "visible ASCII"), ("/a\tb", "visible ASCII"), ("/h\x7f", "visible ASCII"),
    ("/ünï", "visible ASCII"), ("healthz", "starting with '/'"), ("", "starting with '/'"),
    ("//evil.test/x", "'//'"), ("/" + "a" * 1024, "at most 1024"), (5, "string"),
])
def test_health_paths_refused_name_the_field_and_the_problem(path: object, says: str) -> None:
    assert says in (health_path_problem(path) or "")
    with pytest.raises(ValidationError) as err:
        validate_deploy("web", {"image": "x", "port": 80, "health": path}, 10)
    assert err.value.field == "health" and says in str(err.value)


def test_boot_config_never_holds_a_value_caddy_refuses() -> None:
    """A record written before a rule existed: the route keeps serving without Caddy's
    active check; a route whose host cannot be written is left out."""
    bad_health = dataclasses.replace(route("bh", "bh.test"), health="/healthz#%zz")
    bad_host = dataclasses.replace(route("x", "x.test"), host="bad host")
    cfg = build_config([bad_health, bad_host, route("ok", "ok.test")], SETTINGS)
    assert "active" not in handler(cfg, "http", "bh.test")["health_checks"]
    assert handler(cfg, "http", "ok.test")["health_checks"]["active"]["uri"] == "/healthz"
    text = json.dumps(cfg)
    assert "%zz" not in text and "bad host" not in text
    assert route_problems(bad_health)[1] and route_problems(bad_host)[0]
    assert route_problems(route("ok", "ok.test")) == (None, None)


def test_identity_marker_round_trips_and_only_the_admin_object_carries_it() -> None:
    cfg = build_config([route("web", "web.test")], SETTINGS, marker=identity_marker("n1", "abc"))
    assert cfg["admin"]["@id"] == "pleaco-agent/n1/abc"
    assert config_marker(cfg) == ("n1", "abc")
    assert config_marker(build_config([], SETTINGS)) is None and config_marker(None) is None


def _admin_server(answer: dict[str, Any]) -> tuple[web.Application, list[Any]]:
    """A stand-in admin API: GET /config/ answers ``answer``; loads are recorded, not applied
    (as when another process behind the same address took the read)."""
    loads: list[Any] = []

    async def get_config(request: web.Request) -> web.Response:
        return web.json_response(answer)

    async def post_load(request: web.Request) -> web.Response:
        loads.append(await request.json())
        return web.Response()

    app = web.Application()
    app.router.add_get("/config/", get_config)
    app.router.add_post("/load", post_load)
    return app, loads


def _with_admin(answer: dict[str, Any], body: Callable[[CaddyAdmin], Awaitable[None]]) -> tuple[list[str], list[Any]]:
    foreign: list[str] = []

    async def main() -> list[Any]:
        app, loads = _admin_server(answer)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with admin_session() as session:
                await body(CaddyAdmin(session, f"127.0.0.1:{port}", 5, node_id="me", nonce="n1",
                                      on_foreign=foreign.append))
        finally:
            await runner.cleanup()
        return loads

    return foreign, asyncio.run(main())


def test_admin_client_refuses_another_agents_proxy() -> None:
    other = build_config([], SETTINGS, marker=identity_marker("them", "x"))

    async def check(admin: CaddyAdmin) -> None:
        with pytest.raises(ForeignProxy) as err:
            await admin.config()
        assert err.value.node == "them"

    foreign, _ = _with_admin(other, check)
    assert foreign == ["them"]


def test_admin_client_reads_its_load_back_and_knows_its_own_config() -> None:
    mine = build_config([], SETTINGS, marker=identity_marker("me", "n1"))
    earlier = build_config([], SETTINGS, marker=identity_marker("me", "n0"))

    async def own(admin: CaddyAdmin) -> None:
        assert await admin.config() == build_config([], SETTINGS)  # the marker taken off
        await admin.load(build_config([], SETTINGS))

    foreign, loads = _with_admin(mine, own)
    assert foreign == [] and loads[0]["admin"]["@id"] == "pleaco-agent/me/n1"

    async def stale(admin: CaddyAdmin) -> None:
        assert await admin.config() is None  # an earlier start's config: load it again
        with pytest.raises(ForeignProxy):  # the load did not reach what answers
            await admin.load(build_config([], SETTINGS))

    foreign, _ = _with_admin(earlier, stale)
    assert foreign == [""]


def _proxy(node: str, source: str, cid: str = "") -> InfraInfo:
    return InfraInfo(id=cid or f"c-{node}", name=f"pleaco-proxy-{node}", image="caddy", state="running",
                     started_at="", labels={"pleaco.role": "proxy", "pleaco.node": node},
                     mounts=((source, "/etc/pleaco-proxy"), ("/x/hosts", "/etc/hosts")))


def test_orphan_proxies_are_found_by_evidence_only(tmp_path: Path) -> None:
    own = tmp_path / "me" / "proxy"
    own.mkdir(parents=True)
    (tmp_path / "answered" / "proxy").mkdir(parents=True)  # no boot file: no addresses to compare
    mine = {("127.0.0.1", 8080), ("127.0.0.1", 8443), ("127.0.0.1", 2019)}
    for name, listen, admin in [("other", "127.0.0.1:9080", "127.0.0.1:3019"),  # another agent
                                ("clash", ":8080", "127.0.0.1:4019"),  # takes our HTTP port
                                ("member", "127.0.0.1:8080", "127.0.0.1:5019")]:
        (tmp_path / name / "proxy").mkdir(parents=True)
        cfg = build_config([], dataclasses.replace(SETTINGS, listen=listen, admin_listen=admin))
        (tmp_path / name / "proxy" / "caddy.json").write_text(json.dumps(cfg))
    proxies = [_proxy("me", str(own)), _proxy("old", str(own)), _proxy("lost", str(tmp_path / "gone" / "proxy")),
               *(_proxy(n, str(tmp_path / n / "proxy")) for n in ("other", "clash", "member", "answered"))]
    orphans, conflicts = find_orphans(proxies, "me", {"me", "member"}, "/etc/pleaco-proxy", own, mine,
                                      foreign={"answered"})
    found = {o.container.node: (o.reason, o.identity_gone) for o in orphans}
    assert found == {"old": ("same_data_dir", True), "lost": ("data_dir_gone", True),
                     "clash": ("address_conflict", False), "answered": ("admin_answered", False)}
    assert [p.node for p in conflicts] == ["member"]  # a member is never removed


@pytest.mark.parametrize(("a", "b", "clash"), [
    ("127.0.0.1:80", ":80", True), ("127.0.0.1:80", "127.0.0.2:80", False), ("0.0.0.0:80", "[::1]:80", True),
    ("localhost:2019", "127.0.0.1:2019", True), ("127.0.0.1:80", "127.0.0.1:81", False),
])
def test_address_overlap(a: str, b: str, clash: bool) -> None:
    pa, pb = parse_address(a), parse_address(b)
    assert pa is not None and pb is not None
    assert overlap({pa}, {pb}) is clash
    assert config_addresses(build_config([], dataclasses.replace(SETTINGS, listen=a))) >= {pa}


class FakeRuntime:
    """The engine calls OrphanSweeper makes (the real engine: tests/integration/test_proxy.py)."""

    def __init__(self, proxies: list[InfraInfo], replicas: dict[str, list[str]]) -> None:
        self.proxies, self.replicas = proxies, replicas
        self.removed: list[str] = []

    def list_infra(self, role: str) -> list[InfraInfo]:
        return list(self.proxies)

    def remove_infra(self, cid: str, node: str, role: str) -> None:
        self.proxies = [p for p in self.proxies if p.id != cid]
        self.removed.append(cid)

    def list_managed(self, node: str) -> list[ContainerInfo]:
        return [ContainerInfo(id=c, name=c, app="web", node=node, release=1, replica=0, state="running",
                              exit_code=None, image="x", host_port=None, created=0)
                for c in self.replicas.get(node, [])]

    def remove(self, cid: str, node: str) -> None:
        self.replicas[node].remove(cid)
        self.removed.append(cid)


def test_a_gone_identitys_replicas_are_removed_after_the_grace_period_only(tmp_path: Path) -> None:
    own = tmp_path / "proxy"
    own.mkdir()
    fake = FakeRuntime([_proxy("old", str(own), "p-old"), _proxy("me", str(own), "p-me")],
                       {"old": ["r1", "r2"], "other": ["r3"]})
    cfg = ProxyConfig(orphan_grace=3600, orphan_check_interval=0.001)
    sweeper = OrphanSweeper(cfg, fake, "me", "proxy", "/etc/pleaco-proxy", own,  # type: ignore[arg-type]
                            lambda: {"me"}, set)
    asyncio.run(sweeper.sweep())
    assert fake.removed == ["p-old"]  # the proxy at once; the replicas wait
    assert "old" in json.loads((own / "orphans.json").read_text())
    # A later agent start (a new sweeper) keeps counting from the first sighting, here made
    # an hour and a minute ago (the wall clock, not a grace of 0: a clock stepped back by a
    # millisecond between the two sweeps would make that flaky).
    state = own / "orphans.json"
    state.write_text(json.dumps({k: v - 3660 for k, v in json.loads(state.read_text()).items()}))
    later = OrphanSweeper(cfg, fake, "me", "proxy",  # type: ignore[arg-type]
                          "/etc/pleaco-proxy", own, lambda: {"me"}, set)
    asyncio.run(later.sweep())
    assert fake.removed == ["p-old", "r1", "r2"] and fake.replicas["other"] == ["r3"]
    asyncio.run(later.sweep())  # nothing left of it: forgotten
    assert json.loads((own / "orphans.json").read_text()) == {}
