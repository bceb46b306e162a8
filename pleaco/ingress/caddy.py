"""Caddy's JSON config for pleaco's routes, and a small client for Caddy's admin API.

pleaco owns the whole config: every change is one ``POST /load`` of the full document,
which Caddy applies without dropping its listeners (a graceful reload in the same process;
requests in flight finish on the old config). ``GET /config/`` tells whether the running
proxy still holds what pleaco applied (it forgets everything when its container restarts).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from pleaco.errors import PleacoError
from pleaco.ingress.dns import srv_name

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


def _listen(addr: str) -> str:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    # Caddy's ":80" means every interface; an explicit 0.0.0.0 would exclude IPv6.
    return f":{port}" if host in ("", "0.0.0.0", "::") else f"{host}:{port}"


def _port(addr: str) -> int:
    return int(addr.rpartition(":")[2])


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
    else:
        # Known host, nothing healthy yet: say so rather than fall through to a 404.
        handle = [{"handler": "static_response", "status_code": 503,
                   "body": f"no healthy replica of {route.app}\n"}]
    return {"@id": f"pleaco-{route.app}-{'redirect' if redirect else 'proxy'}",
            "match": [{"host": [route.host]}], "handle": handle, "terminal": True}


def build_config(routes: list[Route], s: ProxySettings) -> dict[str, Any]:
    """The complete Caddy config for these routes. Deterministic (sorted), so equal route
    sets give equal documents and a comparison tells whether anything changed."""
    routes = sorted(routes, key=lambda r: r.host)
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
        "admin": {"listen": s.admin_listen, "config": {"persist": False}},
        "apps": apps,
    }
    if s.access_log:
        config["logging"] = {
            "logs": {
                "default": {"exclude": ["http.log.access.pleaco_access"]},
                "pleaco_access": {
                    "writer": {"output": "net", "address": f"tcp/{s.access_log}"},
                    # Only what pleaco.ingress.traffic reads (host, status, duration): the
                    # agent parses a line per request, and headers made most of each line.
                    "encoder": {"format": "filter", "wrap": {"format": "json"},
                                "fields": {name: {"filter": "delete"} for name in ACCESS_LOG_DROPPED}},
                    "include": ["http.log.access.pleaco_access"],
                },
            }
        }
    return config


# Access log fields the agent does not read (Caddy's filter encoder deletes them).
ACCESS_LOG_DROPPED = ("request>headers", "request>tls", "request>remote_ip", "request>remote_port",
                      "request>proto", "request>method", "request>uri", "resp_headers", "user_id", "size",
                      "bytes_read")


class AdminError(PleacoError, RuntimeError, code="proxy_admin_failed"):
    """Caddy's admin API refused a request or is not reachable."""


class CaddyAdmin:
    """Caddy's admin API on loopback. Caddy checks the Origin/Host of admin requests;
    talking to it from the same host by its listen address satisfies that."""

    def __init__(self, session: aiohttp.ClientSession, listen: str, timeout: float) -> None:
        self.base = f"http://{listen}"
        self.session = session
        self.timeout = aiohttp.ClientTimeout(total=timeout)

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

    async def config(self) -> Any:
        raw = await self._request("GET", "/config/")
        return json.loads(raw) if raw.strip() else None

    async def load(self, config: dict[str, Any]) -> None:
        await self._request("POST", "/load", config)

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).decode(errors="replace")
