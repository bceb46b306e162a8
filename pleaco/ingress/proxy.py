"""The proxy loop: this node's Caddy container runs, and holds the routes pleaco wants.

Each step (every ``proxy.interval`` seconds, or sooner when woken):
1. the proxy container exists, runs, and was made with the current settings (image,
   admin address, mounts), else it is created, started or replaced;
2. the routes are computed from this node's view (once the app loop finished a pass): each
   app with a port gets its host name, routed to the replicas ``NodeView.serving`` names
   here and to those the other nodes' ``route`` records say serve; the DNS answers with
   those replicas at once;
3. ``GET /config/`` is compared with the config for those routes; when they differ (an app
   or host name changed, or the proxy restarted from its boot file) the whole config is
   ``POST /load``-ed.

The container runs in the host's network namespace. That keeps the admin API on the
host's loopback (the agent reaches it, nothing off the host does), lets Caddy dial app
replicas on their loopback-published ports, and lets it see the client's real address
(no userland proxy or NAT in between), which it passes on in X-Forwarded-For.

Upstreams come from the agent's DNS (pleaco.ingress.dns), so rollouts need no reload. A
static variant of the config (upstreams listed, no access-log writer: it must work without
the agent) is written to ``DATA_DIR/proxy/caddy.json``; Caddy boots from it, so a proxy the
engine restarts while the agent is down comes back with its routes, and a stopping agent
loads it into the running proxy.

The routing mesh: every node's proxy also routes to the other live nodes' replicas, dialled
at the address their port is published on (pleaco.reconcile.publish), as far as those
nodes' ``route`` records say the replica is serving. A node's record and its proxy use one
rule (``NodeView.serving``), so a replica being drained leaves every proxy; the drain
itself is pleaco.reconcile.drain, which this loop tells what its proxy routes to.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import aiohttp

from pleaco import hostport, logs
from pleaco.ingress.activator import Activator, ActivatorSettings
from pleaco.ingress.caddy import AdminError, CaddyAdmin, ProxySettings, Route, Upstream, admin_session, build_config
from pleaco.ingress.config import IngressSettings
from pleaco.ingress.dns import UpstreamDNS
from pleaco.ingress.hosts import MOUNT_AT, HostsFile
from pleaco.ingress.orphans import OrphanSweeper, known_members, settings_addresses
from pleaco.ingress.traffic import Sampling, TrafficStats
from pleaco.metrics import Counter, Gauge, Registry
from pleaco.reconcile.loop import Loop
from pleaco.reconcile.publish import local_dial_host
from pleaco.reconcile.routes import InstanceStatus, RouteTable
from pleaco.reconcile.view import NodeView
from pleaco.runtime import ContainerInfo, EngineUnavailable, NotFound
from pleaco.runtime.docker import InfraInfo, InfraSpec
from pleaco.runtime.engine import Engine

log = logs.get("pleaco.ingress.proxy")

ROLE = "proxy"
# Seconds Caddy caches an app's upstream list from the DNS: a replica taken out is sent no
# new request after this (plus drain_grace for those in flight).
DNS_REFRESH = 1.0
# Seconds Caddy (2.7.5 and later) keeps routing to the last upstreams it had when the
# agent's DNS does not answer: the agent was killed and is restarting. Replicas outlive
# the agent, so the last list stays right; 10 minutes outlasts any restart. Older Caddy
# (Debian 12 has 2.6.2) refuses the setting: then it is left out, and requests fail from
# about a second after the agent dies until it answers again.
DNS_GRACE = 600.0
# Seconds between whole reads of the proxy's config when nothing changed here: in between,
# a pass only asks whether the proxy still holds this start's config (its marker), so a pass
# costs the same at 5 apps and at 5000; a config edited by hand is put back within this.
FULL_CHECK_INTERVAL = 10.0
LABEL_SETTINGS = "pleaco.proxy-settings"
BOOT_DIR = "/etc/pleaco-proxy"  # where the boot config is mounted in the container


def default_host(app: str, cluster_domain: str) -> str:
    return f"{app}.{cluster_domain}"


class ProxyReconciler(Loop):
    name = "proxy"

    def __init__(
        self,
        cfg: IngressSettings,
        data_dir: Path,
        view: NodeView,
        routes: RouteTable,
        runtime: Engine,
        registry: Registry,
        live_nodes: Callable[[], Collection[str]] | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.interval = cfg.proxy.interval
        self.data_dir = data_dir
        self.view = view
        self.node_id = view.node_id
        self.apps = view.apps
        self.route_table = routes
        self.live_nodes = live_nodes or (lambda: [self.node_id])
        self.runtime = runtime
        self.dir = data_dir / "proxy"
        self.traffic = TrafficStats(registry, sampling=Sampling(cfg.proxy.access_log_first, cfg.proxy.access_log_every))
        self.up = False  # the proxy runs and holds the applied config
        self.last_error = "not checked yet"
        self.container: InfraInfo | None = None
        self.applied: dict[str, Any] | None = None
        self.applied_routes: list[Route] = []
        # The routes as last computed, and what they were computed from (see routes()).
        self._routes: list[Route] | None = None
        self._routes_from: tuple[Any, ...] = ()
        self._next_full_check = 0.0
        self._image_missing_logged = False
        self._image_checked = 0.0
        self._access_port = 0
        self._dns_port = 0
        self._server: asyncio.AbstractServer | None = None
        self._dns_transport: asyncio.BaseTransport | None = None
        self._session: aiohttp.ClientSession | None = None
        self._admin: CaddyAdmin | None = None
        self._grace_supported = True  # until the proxy refuses grace_period (Caddy < 2.7.5)
        self.dns = UpstreamDNS()
        # Holds the requests for apps at zero (started in setup when configured).
        self.activator: Activator | None = None
        if cfg.proxy.activator_listen:
            p = cfg.proxy
            self.activator = Activator(ActivatorSettings(p.activator_listen, p.activator_max_held,
                                                         p.activator_hold_timeout), self.apps, self.app_of,
                                       self.serving, registry)
        self.hosts = HostsFile.for_host(self.dir / "hosts")
        self._boot_written: dict[str, Any] | None = None
        # This start's part of the admin identity marker (see CaddyAdmin), and the cleanup
        # of proxies and replicas other identities left on this engine (see orphans).
        self.nonce = secrets.token_hex(8)
        self.orphans = OrphanSweeper(cfg.proxy, runtime, self.node_id, ROLE, BOOT_DIR, self.dir,
                                     lambda: known_members(self.apps.store),
                                     lambda: settings_addresses(self.settings()), blocking=self.blocking)
        self.m_applies = registry.register(
            Counter("pleaco_proxy_config_applies_total", "Proxy config loads by result.", ("result",))
        )
        self.m_checks = registry.register(
            Counter("pleaco_proxy_config_checks_total",
                    "Checks that the proxy holds pleaco's config: by its marker, or by a whole read.", ("kind",))
        )
        self.m_restarts = registry.register(
            Counter("pleaco_proxy_container_actions_total", "Proxy container actions.", ("action",))
        )
        registry.register(
            Gauge("pleaco_proxy_up", "1 when this node's proxy runs and holds pleaco's routes.",
                  collect=lambda: {(): 1.0 if self.up else 0.0})
        )
        registry.register(
            Gauge("pleaco_proxy_upstreams", "Replicas the proxy routes to, by app.", ("app",),
                  collect=lambda: {(r.app,): float(len(r.upstreams)) for r in self.applied_routes})
        )

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.proxy_image)

    # -- what the proxy should hold ---------------------------------------------------------

    def settings(self, static: bool = False) -> ProxySettings:
        """The live config's settings; ``static`` for the boot file, which must work without
        the agent (upstreams listed in it, no access-log writer)."""
        p = self.cfg.proxy
        return ProxySettings(
            listen=self.cfg.proxy_listen, https_listen=p.https_listen, admin_listen=p.admin_listen,
            try_duration=p.try_duration, health_interval=p.health_interval,
            access_log=f"127.0.0.1:{self._access_port}" if self._access_port and not static else "",
            dns=f"127.0.0.1:{self._dns_port}" if self._dns_port and not static else "",
            dns_refresh=DNS_REFRESH, dns_grace=DNS_GRACE if self._grace_supported else 0.0,
            upstream_max_conns=p.upstream_max_conns, log_sampling=self.traffic.sampling,
            activator=p.activator_listen if self.activator is not None and not static else "",
        )

    def routes(self) -> list[Route]:
        """Every app with a port, routed to what this node serves (``NodeView.serving``) and
        to what the other live nodes' ``route`` records say they serve (or drain, when nothing
        serves an app that should run: ``_draining``). Computed again only
        when what it is made from changed: the store, the live nodes, or this node's view
        (the same list object otherwise, which tells the caller nothing changed)."""
        view = self.view
        made_from = (self.apps.store.generation, tuple(sorted(self.live_nodes())), tuple(view.observed.containers),
                     frozenset(view.drain.requested), frozenset(view.proven),
                     tuple((k, st.healthy, st.container_id) for k, st in sorted(view.replicas.items())))
        if self._routes is not None and made_from == self._routes_from:
            return self._routes
        self._routes = self._compute_routes()
        self._routes_from = made_from
        return self._routes

    def _compute_routes(self) -> list[Route]:
        view = self.view
        by_app: dict[str, list[ContainerInfo]] = {}
        for c in view.observed.containers:
            by_app.setdefault(c.app, []).append(c)
        host = local_dial_host(view.publish_host)
        live = set(self.live_nodes())
        out = []
        taken: set[str] = set()
        specs = sorted(self.apps.specs(), key=lambda s: (s.host is None, s.name))  # explicit hosts win
        for spec in specs:
            if spec.port is None:
                continue
            name = spec.host or default_host(spec.name, self.cfg.cluster_domain)
            if name in taken:
                log.warning("proxy.host_taken", app=spec.name, host=name)
                continue
            taken.add(name)
            ups = []
            for c in sorted(by_app.get(spec.name, []), key=lambda c: (c.replica, c.release)):
                if not view.serving(c, spec):
                    continue
                # The container's own address and port when it has one (no docker-proxy in
                # between); else its published port.
                # On the agent's network: its address there (view.address).
                address = (view.address(c, spec) if view.cluster_network
                           else f"{c.ip}:{spec.port}" if c.ip else f"{host}:{c.host_port}")
                ups.append(Upstream(address, c.id))
            remote = [i for i in self.route_table.instances(spec.name, live)
                      if i.address and view.reachable(i.address)]
            chosen = [i for i in remote if i.serving]
            if not ups and not chosen and self.apps.replicas(spec.name) > 0:
                chosen = [i for i in remote if _draining(i)]
            ups += [Upstream(i.address, f"{i.node}/{i.container}") for i in chosen]
            policy = self.apps.autoscale(spec.name)
            out.append(Route(spec.name, name, getattr(spec, "https", None) or "on", spec.health, tuple(ups),
                             activate=policy is not None and policy.scale_to_zero_after is not None,
                             max_conns=spec.max_conns))
        return out

    def app_of(self, host: str) -> str | None:
        """The app served under this host name (as a request's Host header has it)."""
        name = hostport.request_host(host)
        return next((r.app for r in self.routes() if r.host == name), None)

    def serving(self, app: str) -> list[str]:
        """Where the app's serving replicas are (HOST:PORT, this node's and the others'),
        as the routes have them: what the activator releases held requests to."""
        return [u.address for r in self.routes() if r.app == app for u in r.upstreams]

    # -- the loop -----------------------------------------------------------------------------

    async def setup(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "proxy-data").mkdir(parents=True, exist_ok=True)
        self.hosts.ensure(boot_upstreams_ips(self.dir / "caddy.json"))  # must exist before the container
        if self.cfg.proxy.access_metrics:
            self._server = await asyncio.start_server(self.traffic.handle, "127.0.0.1", 0)
            self._access_port = int(self._server.sockets[0].getsockname()[1])
        self._dns_transport = await self._start_dns(asyncio.get_running_loop())
        if self.activator is not None:
            try:
                await self.activator.start()
            except OSError as exc:
                # Apps at zero then get the proxy's immediate 503, as without an activator.
                log.error("activator.listen_failed", address=self.cfg.proxy.activator_listen,
                          error=exc.strerror or str(exc))
                await self.activator.stop()
                self.activator = None
        self._session = admin_session()
        self._admin = CaddyAdmin(self._session, self.cfg.proxy.admin_listen, self.cfg.proxy.admin_timeout,
                                 node_id=self.node_id, nonce=self.nonce, on_foreign=self.orphans.note_foreign)

    async def teardown(self) -> None:
        # The agent is stopping: hand the proxy the static config, so it keeps routing to
        # the replicas (which stay up) without the agent's DNS.
        try:
            if self.up and self.applied is not None and self._admin is not None:
                with contextlib.suppress(AdminError, asyncio.CancelledError):
                    await asyncio.shield(self._admin.load(build_config(self.applied_routes,
                                                                       self.settings(static=True))))
                    log.info("proxy.static_config_applied", reason="agent stopping")
        finally:
            if self.activator is not None:
                await self.activator.stop()
            if self._dns_transport is not None:
                self._dns_transport.close()
            if self._server is not None:
                self._server.close()
            if self._session is not None:
                await self._session.close()

    async def step(self) -> str | None:
        assert self._admin is not None
        await self.reconcile_once(self._admin)
        return None if self.up else "down"

    async def reconcile_once(self, admin: CaddyAdmin) -> None:
        try:
            if not await self._ensure_container():
                self.up = False
                self.view.drain.proxy_applied(None)
                return
            await self._ensure_config(admin)
        except EngineUnavailable as exc:
            self._down(str(exc))
        except AdminError as exc:
            # Just started, or restarting: the next pass tries again.
            self._down(f"admin API: {exc}")
        except Exception as exc:
            log.error("proxy.reconcile_failed", exc_info=True, error=str(exc))
            self._down(str(exc))

    def _down(self, error: str) -> None:
        if self.up or error != self.last_error:
            log.warning("proxy.down", error=error)
        self.up = False
        self.last_error = error
        self.view.drain.proxy_applied(None)  # it routes nothing now

    def _container_settings(self) -> str:
        """What the container was made with; a change (new image, admin address) replaces it."""
        p = self.cfg.proxy
        raw = json.dumps([self.cfg.proxy_image, p.admin_listen, str(self.dir), MOUNT_AT])
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    async def _ensure_container(self) -> bool:
        await self.orphans.sweep()
        info: InfraInfo | None = await self.blocking(self.runtime.find_infra, self.node_id, ROLE)
        want = self._container_settings()
        if info is not None and info.labels.get(LABEL_SETTINGS) != want:
            log.info("proxy.replacing", container=info.id[:12], reason="settings changed")
            await self.blocking(self.runtime.remove_infra, info.id, self.node_id, ROLE)
            self.m_restarts.inc(action="replace")
            info = None
        if info is None:
            now = time.monotonic()
            if self._image_missing_logged and now - self._image_checked < self.cfg.image_recheck_interval:
                return False  # missing a moment ago: not asked again on every pass
            self._image_checked = now
            if not await self.blocking(self.runtime.image_exists, self.cfg.proxy_image):
                if not self._image_missing_logged:
                    log.warning("proxy.image_missing", image=self.cfg.proxy_image)
                    self._image_missing_logged = True
                self.last_error = f"image {self.cfg.proxy_image!r} is not present on this node"
                return False
            self._image_missing_logged = False
            self._boot_written = build_config(self.routes(), self.settings(static=True))
            self._write_boot(self._boot_written)
            spec = InfraSpec(
                role=ROLE, node=self.node_id, name=f"pleaco-proxy-{self.node_id[:12]}",
                image=self.cfg.proxy_image,
                command=("caddy", "run", "--config", f"{BOOT_DIR}/caddy.json"),
                binds=((str(self.dir), BOOT_DIR, "ro"), (str(self.hosts.path), MOUNT_AT, "ro"),
                       (str(self.data_dir / "proxy-data"), "/data", "rw")),
                env=(("XDG_DATA_HOME", "/data"), ("XDG_CONFIG_HOME", "/config")),
                labels={LABEL_SETTINGS: want},
            )
            try:
                cid = await self.blocking(self.runtime.run_infra, spec)
            except RuntimeError as exc:
                if isinstance(exc, EngineUnavailable):
                    raise
                self.last_error = f"cannot start the proxy: {exc}"
                log.warning("proxy.start_failed", error=str(exc))
                # A leftover of that name (another agent's data dir?) is replaced next pass.
                return False
            self.m_restarts.inc(action="create")
            log.info("proxy.started", container=cid[:12], image=self.cfg.proxy_image, listen=self.cfg.proxy_listen)
            self.applied = None
            return True
        self.container = info
        if not info.running:
            log.warning("proxy.not_running", container=info.id[:12], state=info.state)
            try:
                await self.blocking(self.runtime.start, info.id)
            except NotFound:
                return False
            self.m_restarts.inc(action="restart")
            log.info("proxy.restarted", container=info.id[:12])
            self.applied = None
        return True

    async def _start_dns(self, loop: asyncio.AbstractEventLoop) -> asyncio.BaseTransport:
        """Bind the upstream DNS on the port it had before, if free, answering with the
        upstreams of the last config written: after an agent crash the proxy's config still
        points here, and keeps routing while this agent's first passes run."""
        port_file = self.dir / "dns.port"
        with contextlib.suppress(OSError, ValueError):
            self.dns.set_upstreams(boot_upstreams(json.loads((self.dir / "caddy.json").read_text())))
        transport: asyncio.BaseTransport | None = None
        with contextlib.suppress(OSError, ValueError):
            previous = int(port_file.read_text())
            transport, _ = await loop.create_datagram_endpoint(lambda: self.dns, local_addr=("127.0.0.1", previous))
        if transport is None:
            transport, _ = await loop.create_datagram_endpoint(lambda: self.dns, local_addr=("127.0.0.1", 0))
        self._dns_port = int(transport.get_extra_info("sockname")[1])
        port_file.write_text(f"{self._dns_port}\n")
        return transport

    async def _ensure_config(self, admin: CaddyAdmin) -> None:
        if not self.view.warm:
            return
        routes = self.routes()
        now = time.monotonic()
        if routes is self.applied_routes and self.up and now < self._next_full_check and await admin.holds_marker():
            self.m_checks.inc(kind="marker")
            return  # nothing changed here, and the proxy still holds what this start loaded
        self.m_checks.inc(kind="full")
        self._next_full_check = now + FULL_CHECK_INTERVAL
        self._serve(routes)
        boot = build_config(routes, self.settings(static=True))
        if boot != self._boot_written:
            self._write_boot(boot)
            self._boot_written = boot
        desired = build_config(routes, self.settings())
        # Asked every pass, also when nothing changed here: the proxy may have restarted
        # from its boot file or been reloaded by hand. One loopback GET is cheap.
        current = await admin.config()
        if current != desired:
            try:
                await admin.load(desired)
            except AdminError as exc:
                if not (self._grace_supported and "grace_period" in str(exc)):
                    raise
                self._grace_supported = False
                log.info("proxy.no_dns_grace", reason="this Caddy does not know grace_period (before 2.7.5)")
                desired = build_config(routes, self.settings())
                if current != desired:
                    await admin.load(desired)
            self.m_applies.inc(result="ok")
            log.info("proxy.config_applied", routes=len(routes),
                     upstreams=sum(len(r.upstreams) for r in routes),
                     reason="changed" if current else "empty")
        self.applied = desired
        self.applied_routes = routes
        self.traffic.set_hosts({r.host: r.app for r in routes})
        if not self.up:
            log.info("proxy.up", admin=self.cfg.proxy.admin_listen, listen=self.cfg.proxy_listen)
        self.up = True
        self.last_error = ""

    def _serve(self, routes: list[Route]) -> None:
        """Answer the proxy's upstream lookups with these routes (Caddy has them within
        DNS_REFRESH), and tell the drain which of this node's containers it routes to."""
        upstreams = dns_upstreams(routes, self.cfg.proxy.activator_listen if self.activator is not None else "")
        # Names first, then the DNS points at them: Caddy rarely has to ask for an address.
        self.hosts.ensure(ip for ups in upstreams.values() for ip, _ in ups)
        self.dns.set_upstreams(upstreams)
        self.view.drain.proxy_applied({u.container for r in routes for u in r.upstreams})

    def _write_boot(self, config: dict[str, Any]) -> None:
        boot = {k: v for k, v in config.items() if k != "logging"}
        tmp = self.dir / "caddy.json.tmp"
        tmp.write_text(json.dumps(boot, indent=1, sort_keys=True))
        os.replace(tmp, self.dir / "caddy.json")

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "up": self.up,
            "error": self.last_error,
            "image": self.cfg.proxy_image,
            "listen": self.cfg.proxy_listen,
            "https_listen": self.cfg.proxy.https_listen,
            "container": self.container.id[:12] if self.container else "",
            "dns": {"queries": self.dns.queries, "address_queries": self.dns.address_queries},
            "routes": [
                {"app": r.app, "host": r.host, "https": r.https, "upstreams": [u.address for u in r.upstreams]}
                for r in self.applied_routes
            ],
        }


def _draining(inst: InstanceStatus) -> bool:
    """Another node's replica it is draining: it served until that node asked it to stop,
    and it still runs. It answers until that node stops it, which is at least MESH_DELAY
    (pleaco.reconcile.drain) after it wrote this. Not "healthy": a record calls only a
    replica of the current release healthy, and a replica a rollout replaces is of the last.

    A proxy falls back on these when an app that should run has nothing serving: the record
    that takes a replaced replica out of service and the one that puts its replacement in
    are two records, and gossip may bring them in either order (the newest goes first, a
    packet holds two route records at most, and a relay may pass on either first), so for
    a moment a rollout on another node looks like an app with no replica at all. Better the
    old replica than a 503. Not for an app scaled to zero: its replicas stop once drained,
    and the activator holds its requests."""
    return inst.draining and inst.state == "running"


def dns_upstreams(routes: list[Route], activator: str) -> dict[str, list[tuple[str, int]]]:
    """What the agent's DNS answers for each app: its replicas; for an app that scales to
    zero and has none, the activator (``activator``, empty: none), which holds its
    requests while a first replica starts."""
    out = {}
    for r in routes:
        ups = [hostport.split(u.address) for u in r.upstreams]
        if not ups and r.activate and activator:
            ups = [hostport.split(activator)]
        out[r.app] = ups
    return out


def boot_upstreams_ips(path: Path) -> list[str]:
    """The upstream addresses of the boot config at ``path`` ([] when there is none)."""
    try:
        return [ip for ups in boot_upstreams(json.loads(path.read_text())).values() for ip, _ in ups]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def boot_upstreams(config: dict[str, Any]) -> dict[str, list[tuple[str, int]]]:
    """app -> [(ip, port)] from a static (boot) config written by build_config."""
    out: dict[str, list[tuple[str, int]]] = {}
    for server in config["apps"]["http"]["servers"].values():
        for route in server.get("routes", []):
            rid = str(route.get("@id", ""))
            if not (rid.startswith("pleaco-") and rid.endswith("-proxy")):
                continue
            for handler in route.get("handle", []):
                for up in handler.get("upstreams", []):
                    host, port = hostport.split(str(up["dial"]))
                    out.setdefault(rid[len("pleaco-"):-len("-proxy")], []).append((host, port))
    return {app: sorted(set(ups)) for app, ups in out.items()}
