"""Caddy's JSON config for pleaco's routes, and a small client for Caddy's admin API.

pleaco owns the whole config: every change is one ``POST /load`` of the full document,
which Caddy applies without dropping its listeners (a graceful reload in the same process;
requests in flight finish on the old config). ``GET /config/`` tells whether the running
proxy still holds what pleaco applied (it forgets everything when its container restarts).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from pleaco import hostport, logs
from pleaco.apps import ValidationError, validate_hostname, validate_max_conns
from pleaco.errors import PleacoError
from pleaco.ingress.dns import srv_name
from pleaco.ingress.traffic import Sampling
from pleaco.urlpath import health_path_problem

log = logs.get("pleaco.ingress.caddy")

# Names Caddy's internal CA signs; anything else gets ACME (Let's Encrypt / ZeroSSL).
INTERNAL_SUFFIXES = (".internal", ".local", ".localhost", ".test", ".home.arpa")
HTTPS_MODES = ("off", "on", "redirect")


def is_internal_name(host: str) -> bool:
    return host == "localhost" or host.endswith(INTERNAL_SUFFIXES)


@dataclass(frozen=True)
class Upstream:
    """One replica reachable from the proxy: ``address`` is HOST:PORT as Caddy dials it."""

    address: str
    container: str  # full container id, so pleaco knows what the proxy routes to


@dataclass(frozen=True)
class Route:
    app: str
    host: str
    https: str  # off | on | redirect
    health: str | None
    upstreams: tuple[Upstream, ...]
    # The app scales to zero: without upstreams its requests go to the activator (when
    # the settings name one, with the agent's DNS), not to the immediate 503.
    activate: bool = False
    # Connections to one upstream at most (the app's ``max_conns``): None takes the
    # settings' upstream_max_conns, 0 is no cap whatever they say.
    max_conns: int | None = None


@dataclass(frozen=True)
class ProxySettings:
    """What the config needs from pleaco's settings (kept separate so tests build configs)."""

    listen: str  # HOST:PORT for HTTP
    https_listen: str
    admin_listen: str
    try_duration: float
    health_interval: float
    access_log: str = ""  # HOST:PORT the agent collects access logs on; empty: none
    dns: str = ""  # HOST:PORT of the agent's upstream DNS (pleaco.ingress.dns); empty: static upstreams
    dns_refresh: float = 1.0  # seconds Caddy caches an app's upstream list
    # Seconds Caddy keeps the last upstream list when the DNS does not answer (the agent
    # killed and restarting); 0 leaves it out: Caddy before 2.7.5 refuses the field.
    dns_grace: float = 0.0
    # Connections the proxy holds to one upstream at most (Caddy's max_conns_per_host) for
    # an app that names none; 0: no limit. See ProxyConfig.upstream_max_conns.
    upstream_max_conns: int = 0
    # The access log's sampling (see pleaco.ingress.traffic.Sampling).
    log_sampling: Sampling = field(default_factory=Sampling)
    # HOST:PORT of the agent's activator (pleaco.ingress.activator); empty: none (and in the
    # boot file, which must work without the agent).
    activator: str = ""


def _listen(addr: str) -> str:
    host, port = hostport.split(addr)
    # Caddy's ":80" means every interface; an explicit 0.0.0.0 would exclude IPv6.
    return f":{port}" if host in ("", "0.0.0.0", "::") else f"{host}:{port}"


def _port(addr: str) -> int:
    return hostport.split(addr)[1]


def _proxy_handler(route: Route, s: ProxySettings) -> dict[str, Any]:
    handler: dict[str, Any] = {
        "handler": "reverse_proxy",
        "load_balancing": {
            "selection_policy": {"policy": "least_conn"},
            # Retry a request whose upstream refuses the connection on another upstream.
            "try_duration": f"{s.try_duration:g}s",
            "try_interval": "100ms",
        },
        "health_checks": {
            # Passive: an upstream that fails to connect is skipped for a while.
            "passive": {"fail_duration": "2s", "max_fails": 1},
        },
        # X-Forwarded-For/-Proto/-Host are set by Caddy itself; untrusted incoming values
        # are replaced, so the app sees the real client.
    }
    if s.dns:
        # Upstreams from the agent's DNS (see pleaco.ingress.dns): changing them needs no
        # config reload. Upstream names are resolved there too (ip-A-B-C-D.pleaco).
        resolver = {"addresses": [f"udp/{s.dns}"]}
        handler["dynamic_upstreams"] = {
            "source": "srv", "name": srv_name(route.app), "refresh": f"{s.dns_refresh:g}s",
            "resolver": resolver, "dial_timeout": "1s",
        }
        if s.dns_grace:
            handler["dynamic_upstreams"]["grace_period"] = f"{s.dns_grace:g}s"
        handler["transport"] = {"protocol": "http", "resolver": resolver}
    else:
        handler["upstreams"] = [{"dial": u.address} for u in route.upstreams]
    # The cap is the app's (how many requests one replica takes at once); the proxy's
    # setting is the default for apps that name none.
    max_conns = s.upstream_max_conns if route.max_conns is None else route.max_conns
    if max_conns:
        handler.setdefault("transport", {"protocol": "http"})["max_conns_per_host"] = max_conns
    if route.health and not s.dns:
        # Caddy runs active checks on static upstreams only; with DNS upstreams pleaco's own
        # probes (every reconcile pass) decide what is listed at all.
        handler["health_checks"]["active"] = {
            "uri": route.health,
            "interval": f"{s.health_interval:g}s",
            "timeout": "2s",
        }
    return handler


def _host_route(route: Route, s: ProxySettings, redirect: bool) -> dict[str, Any]:
    if redirect:
        https_port = _port(s.https_listen)
        port_part = "" if https_port == 443 else f":{https_port}"
        handle: list[dict[str, Any]] = [{
            "handler": "static_response",
            "status_code": 308,
            "headers": {"Location": [f"https://{{http.request.host}}{port_part}{{http.request.uri}}"]},
        }]
    elif route.upstreams:
        handle = [_proxy_handler(route, s)]
    elif route.activate and s.activator and s.dns:
        # Scales to zero: the same handler with or without replicas, so going to zero and
        # back changes no config (a reload would cut the requests the activator is just
        # releasing); with none, the agent's DNS answers with the activator instead.
        handle = [_proxy_handler(route, s)]
    else:
        # Known host, nothing healthy yet: say so rather than fall through to a 404.
        handle = [{"handler": "static_response", "status_code": 503,
                   "body": f"no healthy replica of {route.app}\n"}]
    return {"@id": f"pleaco-{route.app}-{'redirect' if redirect else 'proxy'}",
            "match": [{"host": [route.host]}], "handle": handle, "terminal": True}


# Problems already logged by usable_routes (the config is built every pass; one line each).
_reported: set[str] = set()


def route_problems(route: Route) -> tuple[str | None, str | None]:
    """(why the route cannot be served at all, why its health path cannot be used)."""
    try:
        host_ok = validate_hostname(route.host) == route.host
    except ValidationError:
        host_ok = False
    bad_route = None if host_ok and route.https in HTTPS_MODES else f"host {route.host!r}, https {route.https!r}"
    return bad_route, None if route.health is None else health_path_problem(route.health)


def usable_routes(routes: list[Route]) -> list[Route]:
    """The routes with nothing Caddy would refuse: the API validates every value, but a
    record written before a rule existed must not make the proxy's boot file one Caddy
    cannot start from (every app of the node would be unreachable). A bad health path
    loses its active check only (pleaco's probes still decide what is routed), a bad
    connection cap is replaced by the proxy's default; a route that cannot be written at
    all is left out. Each is logged once as an error."""
    out = []
    for route in routes:
        bad_route, bad_health = route_problems(route)
        if bad_route:
            _report("proxy.route_dropped", route.app, bad_route)
            continue
        if bad_health:
            _report("proxy.health_check_dropped", route.app, bad_health)
            route = dataclasses.replace(route, health=None)
        if route.max_conns is not None:
            try:
                validate_max_conns(route.max_conns)
            except ValidationError as exc:
                _report("proxy.max_conns_dropped", route.app, str(exc))
                route = dataclasses.replace(route, max_conns=None)
        out.append(route)
    return out


def _report(event: str, app: str, problem: str) -> None:
    key = f"{event} {app} {problem}"
    if key not in _reported:
        if len(_reported) > 1000:
            _reported.clear()
        _reported.add(key)
        log.error(event, app=app, error=problem)


def identity_marker(node_id: str, nonce: str) -> str:
    """The ``@id`` of the config's admin object: which agent (node, and which start of it)
    loaded the config the admin API answers with. Caddy keeps ``@id`` in what ``GET
    /config/`` returns and strips it before it applies the config."""
    return f"{MARKER_PREFIX}{node_id}/{nonce}"


MARKER_PREFIX = "pleaco-agent/"


def config_marker(config: Any) -> tuple[str, str] | None:
    """(node id, nonce) of the agent that loaded ``config``, None when it carries no marker."""
    try:
        marker = config["admin"]["@id"]
    except (KeyError, TypeError):
        return None
    if not isinstance(marker, str) or not marker.startswith(MARKER_PREFIX):
        return None
    node, _, nonce = marker[len(MARKER_PREFIX):].partition("/")
    return node, nonce


def build_config(routes: list[Route], s: ProxySettings, marker: str = "") -> dict[str, Any]:
    """The complete Caddy config for these routes. Deterministic (sorted), so equal route
    sets give equal documents and a comparison tells whether anything changed. ``marker``
    (identity_marker) names the agent that loads it."""
    routes = sorted(usable_routes(routes), key=lambda r: r.host)
    # A host no app claims gets a 404 that says so (Caddy's own answer would be an empty 200).
    unknown = {"handle": [{"handler": "static_response", "status_code": 404,
                           "body": "no app is served under this host name\n"}]}
    http_routes = [*(_host_route(r, s, redirect=r.https == "redirect") for r in routes), unknown]
    https_routes = [_host_route(r, s, redirect=False) for r in routes if r.https in ("on", "redirect")]
    servers: dict[str, Any] = {
        "http": {
            "listen": [_listen(s.listen)],
            "routes": http_routes,
            # pleaco decides about HTTPS per app; Caddy must not add redirects of its own.
            "automatic_https": {"disable": True},
        }
    }
    if s.access_log:
        servers["http"]["logs"] = {"default_logger_name": "pleaco_access"}
    apps: dict[str, Any] = {"http": {"http_port": _port(s.listen), "https_port": _port(s.https_listen)}}
    if https_routes:
        servers["https"] = {
            "listen": [_listen(s.https_listen)],
            "routes": [*https_routes, unknown],
            "automatic_https": {"disable_redirects": True},
        }
        if s.access_log:
            servers["https"]["logs"] = {"default_logger_name": "pleaco_access"}
        internal = sorted({r.host for r in routes if r.https != "off" and is_internal_name(r.host)})
        if internal:
            apps["tls"] = {"automation": {"policies": [{"subjects": internal, "issuers": [{"module": "internal"}]}]}}
        # The internal CA's root stays inside the proxy (no host trust store to install into).
        apps["pki"] = {"certificate_authorities": {"local": {"install_trust": False}}}
    apps["http"]["servers"] = servers
    config: dict[str, Any] = {
        # persist=false: pleaco holds the truth and re-applies it; a stale autosave must
        # never come back after a restart.
        "admin": {"listen": s.admin_listen, "config": {"persist": False}, **({"@id": marker} if marker else {})},
        "apps": apps,
    }
    if s.access_log:
        config["logging"] = {
            "logs": {
                "default": {"exclude": ["http.log.access.pleaco_access"]},
                "pleaco_access": {
                    "writer": {"output": "net", "address": f"tcp/{s.access_log}"},
                    # Caddy's plain JSON encoder, without logger name and message. Not
                    # the filter encoder that would leave out the fields the agent does
                    # not read: it costs Caddy more per request than the fields do, even
                    # for requests the sampler then drops (benchmarks/README.md). Caddy
                    # 2.6 redacts Authorization, Cookie and Set-Cookie itself.
                    "encoder": {"format": "json", **LEAN_KEYS},
                    "include": ["http.log.access.pleaco_access"],
                    **({"sampling": {"interval": int(s.log_sampling.interval * 1e9), "first": s.log_sampling.first,
                                     "thereafter": s.log_sampling.every}} if s.log_sampling.every > 1 else {}),
                },
            }
        }
    return config


# The JSON encoder's own keys, left out (an empty key omits the field).
LEAN_KEYS = {"message_key": "", "name_key": ""}


class AdminError(PleacoError, RuntimeError, code="proxy_admin_failed"):
    """Caddy's admin API refused a request or is not reachable."""


class ForeignProxy(AdminError):
    """The admin API answered with another agent's config: another proxy shares the
    address (Caddy binds it with SO_REUSEPORT, so each connection lands on either)."""

    def __init__(self, node: str, what: str) -> None:
        super().__init__(f"another proxy answers on the admin address ({what})")
        self.node = node  # the other agent's node id; "" when its config carries no marker


def admin_session() -> aiohttp.ClientSession:
    """A session for CaddyAdmin: one connection per request. A kept-alive connection stays
    with one process, so with a second proxy on the same address (SO_REUSEPORT) every
    request would go to whichever the first one reached, and the marker check would never
    see the other."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


class CaddyAdmin:
    """Caddy's admin API on loopback. Caddy checks the Origin/Host of admin requests;
    talking to it from the same host by its listen address satisfies that.

    With ``node_id`` and ``nonce`` it makes sure it talks to this agent's proxy: every
    config it loads carries identity_marker(node_id, nonce) (the admin object's ``@id``) and
    is read back after the load; ``config()`` answers only a config this agent loaded in
    this start (None for any other of this node: boot file, earlier start, so it is loaded
    again) and raises ForeignProxy for another node's. ``on_foreign`` hears of each.
    A marker rather than a per-node admin address: the admin address is a documented
    setting, an orphan made with the same flags has the same one, and only a check of what
    answers tells the two processes behind it apart."""

    def __init__(self, session: aiohttp.ClientSession, listen: str, timeout: float, node_id: str = "",
                 nonce: str = "", on_foreign: Callable[[str], None] | None = None) -> None:
        self.base = f"http://{listen}"
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.node_id = node_id
        self.marker = identity_marker(node_id, nonce) if node_id else ""
        self.on_foreign = on_foreign

    async def _request(self, method: str, path: str, body: Any = None) -> bytes:
        data = None if body is None else json.dumps(body).encode()
        try:
            async with self.session.request(
                method, self.base + path, data=data, timeout=self.timeout,
                headers={"Content-Type": "application/json"} if data is not None else None,
            ) as resp:
                text = await resp.read()
                if resp.status >= 400:
                    raise AdminError(f"{method} {path}: {resp.status} {text.decode(errors='replace')[:500]}")
                return text
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AdminError(f"{method} {path}: {exc or type(exc).__name__}") from exc

    async def _raw_config(self) -> Any:
        raw = await self._request("GET", "/config/")
        return json.loads(raw) if raw.strip() else None

    def _foreign(self, node: str, what: str) -> ForeignProxy:
        if self.on_foreign is not None:
            self.on_foreign(node)
        return ForeignProxy(node, what)

    async def config(self) -> Any:
        config = await self._raw_config()
        if not self.marker or config is None:
            return config
        found = config_marker(config)
        if found is not None and found[0] != self.node_id:
            raise self._foreign(found[0], f"it holds node {found[0]}'s config")
        if config.get("admin", {}).get("@id") != self.marker:
            return None  # not loaded by this start: load it again
        del config["admin"]["@id"]
        return config

    async def holds_marker(self) -> bool:
        """Whether the proxy still holds the config this start loaded, asked cheaply: the
        admin object's ``@id`` alone (``GET /config/admin/@id``, a few bytes however many
        routes there are; ``/id/`` cannot name it: the marker holds slashes). False without
        a marker, or on any error (the caller then reads the whole config)."""
        if not self.marker:
            return False
        try:
            raw = await self._request("GET", "/config/admin/@id")
            return bool(json.loads(raw) == self.marker)
        except (AdminError, ValueError):
            return False

    async def load(self, config: dict[str, Any]) -> None:
        if not self.marker:
            await self._request("POST", "/load", config)
            return
        marked = {**config, "admin": {**config.get("admin", {}), "@id": self.marker}}
        await self._request("POST", "/load", marked)
        # On a new connection: if another process shares the address, this read lands on
        # either, and a config without this start's marker gives it away.
        back = await self._raw_config()
        found = config_marker(back)
        if found != config_marker(marked):
            node = found[0] if found is not None and found[0] != self.node_id else ""
            raise self._foreign(node, "the config just loaded is not what it answers")

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).decode(errors="replace")
