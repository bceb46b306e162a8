"""The proxy loop: this node's Caddy container runs, and holds the routes pleaco wants.

Each pass (every ``proxy.interval`` seconds, or sooner when woken):
1. the proxy container exists, runs, and was made with the current settings (image,
   admin address, mounts), else it is created, started or replaced;
2. the routes are computed from the app reconciler's view (once it finished a pass): each
   app with a port gets its host name, routed to its replicas that are running and
   healthy, minus those draining; the DNS answers with those replicas at once;
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
nodes' ``route`` records say the replica is serving. A node publishes as serving exactly
what its own proxy routes to (``serving``), so a replica being drained leaves every proxy.

Draining: the app reconciler asks ``may_remove`` before it stops a container. A container
the proxies still route to is first taken out of the routes (here, and in the ``route``
record); it may be removed once ``rollout.drain_grace`` seconds have passed since they
stopped sending it requests (plus MESH_DELAY for the record to reach the other nodes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pleaco import logs
from pleaco.apps import AppStore
from pleaco.config import Config
from pleaco.ingress.caddy import AdminError, CaddyAdmin, ProxySettings, Route, Upstream, admin_session, build_config
from pleaco.ingress.dns import UpstreamDNS
from pleaco.ingress.hosts import MOUNT_AT, HostsFile
from pleaco.ingress.orphans import OrphanSweeper, known_members, settings_addresses
from pleaco.ingress.traffic import TrafficStats
from pleaco.metrics import Counter, Gauge, Registry
from pleaco.reconcile.apps import AppReconciler
from pleaco.reconcile.publish import is_loopback, local_dial_host
from pleaco.runtime import ContainerInfo, DockerRuntime, EngineUnavailable, NotFound
from pleaco.runtime.docker import InfraInfo, InfraSpec

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
# Seconds for a replica's "not serving" to reach the other nodes' proxies: the app
# reconciler's next pass (woken at once), gossip (well under a second in a LAN cluster) and
# their proxy pass (proxy.interval). Their DNS refresh is counted separately.
MESH_DELAY = 2.0
LABEL_SETTINGS = "pleaco.proxy-settings"
BOOT_DIR = "/etc/pleaco-proxy"  # where the boot config is mounted in the container


def default_host(app: str, cluster_domain: str) -> str:
    return f"{app}.{cluster_domain}"


class ProxyReconciler:
    def __init__(
        self,
        cfg: Config,
        node_id: str,
        apps: AppStore,
        reconciler: AppReconciler,
        runtime: DockerRuntime,
        registry: Registry,
    ) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.apps = apps
        self.reconciler = reconciler
        self.runtime = runtime
        self.dir = cfg.data_dir / "proxy"
        self.traffic = TrafficStats(registry)
        self.up = False  # the proxy runs and holds the applied config
        self.last_error = "not checked yet"
        self.container: InfraInfo | None = None
        self.applied: dict[str, Any] | None = None
        self.applied_ids: set[str] = set()
        self.serving_ids: set[str] | None = None  # this node's containers in the last routes
        self.applied_routes: list[Route] = []
        self.drain_requested: set[str] = set()  # containers to take out of the proxy
        self.proven: set[str] = set()  # containers that passed health while current
        self.left_at: dict[str, float] = {}  # container id -> when the proxy stopped routing to it
        self._image_missing_logged = False
        self._image_checked = 0.0
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._access_port = 0
        self._dns_port = 0
        self._first_pass_at: float | None = None
        self._grace_supported = True  # until the proxy refuses grace_period (Caddy < 2.7.5)
        self.dns = UpstreamDNS()
        self.hosts = HostsFile.for_host(self.dir / "hosts")
        self._boot_written: dict[str, Any] | None = None
        # This start's part of the admin identity marker (see CaddyAdmin), and the cleanup
        # of proxies and replicas other identities left on this engine (see orphans).
        self.nonce = secrets.token_hex(8)
        self.orphans = OrphanSweeper(cfg.proxy, runtime, node_id, ROLE, BOOT_DIR, self.dir,
                                     lambda: known_members(apps.store), lambda: settings_addresses(self.settings()))
        self.m_applies = registry.register(
            Counter("pleaco_proxy_config_applies_total", "Proxy config loads by result.", ("result",))
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

    def wake(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

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
        )

    def routes(self) -> list[Route]:
        """Every app with a port, routed to its healthy, non-draining replicas on this node
        and to those the other live nodes publish as serving.

        A container of the current release is routed once pleaco's probe passed; one of an
        older release keeps serving while it runs, until the reconciler asks to drain it, if
        it had passed while current (remembered in memory: an agent restarted mid-rollout
        routes only the new release's replicas, as they turn healthy).
        """
        rec = self.reconciler
        by_app: dict[str, list[ContainerInfo]] = {}
        for c in rec.observed.containers:
            by_app.setdefault(c.app, []).append(c)
        host = local_dial_host(rec.publish_host)
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
                if not c.running or c.host_port is None or c.id in self.drain_requested:
                    continue
                if c.release == spec.revision:
                    st = rec.replicas.get((c.app, c.replica))
                    if st is None or st.container_id != c.id or not st.healthy:
                        continue
                    self.proven.add(c.id)
                elif c.id not in self.proven:
                    # An older release's container serves on only if it was healthy while it
                    # was current: a failed release rolled back must not get traffic.
                    continue
                # The container's own address and port when it has one (no docker-proxy in
                # between); else its published port.
                address = f"{c.ip}:{spec.port}" if c.ip else f"{host}:{c.host_port}"
                ups.append(Upstream(address, c.id))
            for inst in rec.remote_instances(spec.name):
                if inst.serving and inst.address and self._reachable(inst.address):
                    ups.append(Upstream(inst.address, f"{inst.node}/{inst.container}"))
            out.append(Route(spec.name, name, getattr(spec, "https", None) or "on", spec.health, tuple(ups)))
        return out

    def _reachable(self, address: str) -> bool:
        """Another node's loopback address is only ours too when we share one machine (then
        our advertised address is a loopback one as well); dialled from elsewhere it would
        reach whatever listens on that port here."""
        host = address.rpartition(":")[0]
        return not is_loopback(host) or is_loopback(self.reconciler.advertise_host)

    # -- draining (called by the app reconciler) ----------------------------------------------

    def serving(self, c: ContainerInfo) -> bool:
        """Whether this node's container takes traffic (what the ``route`` record says)."""
        if self.serving_ids is None:  # no routes computed yet: the reconciler's own rule
            return self.reconciler.healthy_current(c)
        return c.id in self.serving_ids

    def _mesh(self) -> bool:
        """Other live nodes' proxies may route to this node's replicas."""
        return any(n != self.node_id for n in self.reconciler.live_nodes())

    def may_remove(self, c: ContainerInfo, reason: str) -> bool:
        """Whether the app reconciler may stop this container now (see the module doc)."""
        mesh = self._mesh()
        if not mesh and (not self.enabled or not self.up):
            return True  # no proxy sends it anything
        if c.id in self.applied_ids:
            if c.id not in self.drain_requested:
                self.drain_requested.add(c.id)
                log.info("replica.draining", app=c.app, replica=c.replica, release=c.release,
                         container=c.id[:12], reason=reason)
                self.wake()
            return False
        left = self.left_at.get(c.id)
        wait = self.cfg.rollout.drain_grace + DNS_REFRESH + (MESH_DELAY if mesh else 0.0)
        return left is None or time.monotonic() - left >= wait

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        if not self.enabled:
            log.info("proxy.disabled")
            # No proxy here, but other nodes' proxies route to this node's replicas: keep
            # deciding which serve, so they are drained before they stop.
            async def decide() -> None:
                if self._warm():
                    self._publish(self.routes())

            await self._every_interval(decide)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.cfg.data_dir / "proxy-data").mkdir(parents=True, exist_ok=True)
        self.hosts.ensure(boot_upstreams_ips(self.dir / "caddy.json"))  # must exist before the container
        server = None
        if self.cfg.proxy.access_metrics:
            server = await asyncio.start_server(self.traffic.handle, "127.0.0.1", 0)
            self._access_port = int(server.sockets[0].getsockname()[1])
        loop = asyncio.get_running_loop()
        dns_transport = await self._start_dns(loop)
        async with admin_session() as session:
            admin = CaddyAdmin(session, self.cfg.proxy.admin_listen, self.cfg.proxy.admin_timeout,
                               node_id=self.node_id, nonce=self.nonce, on_foreign=self.orphans.note_foreign)
            try:
                await self._every_interval(lambda: self.reconcile_once(admin))
            finally:
                # The agent is stopping: hand the proxy the static config, so it keeps
                # routing to the replicas (which stay up) without the agent's DNS.
                if self.up and self.applied is not None:
                    with contextlib.suppress(AdminError, asyncio.CancelledError):
                        await asyncio.shield(admin.load(build_config(self.applied_routes, self.settings(static=True))))
                        log.info("proxy.static_config_applied", reason="agent stopping")
                dns_transport.close()
                if server is not None:
                    server.close()

    async def _every_interval(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step`` every ``proxy.interval`` seconds, or at once when woken; never returns."""
        while True:
            self._wake.clear()
            await step()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.cfg.proxy.interval)

    async def reconcile_once(self, admin: CaddyAdmin) -> None:
        try:
            if not await self._ensure_container():
                self.up = False
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

    def _container_settings(self) -> str:
        """What the container was made with; a change (new image, admin address) replaces it."""
        p = self.cfg.proxy
        raw = json.dumps([self.cfg.proxy_image, p.admin_listen, str(self.dir), MOUNT_AT])
        return hashlib.sha256(raw.encode()).hexdigest()[:16]

    async def _engine(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def _ensure_container(self) -> bool:
        await self.orphans.sweep()
        info: InfraInfo | None = await self._engine(self.runtime.find_infra, self.node_id, ROLE)
        want = self._container_settings()
        if info is not None and info.labels.get(LABEL_SETTINGS) != want:
            log.info("proxy.replacing", container=info.id[:12], reason="settings changed")
            await self._engine(self.runtime.remove_infra, info.id, self.node_id, ROLE)
            self.m_restarts.inc(action="replace")
            info = None
        if info is None:
            now = time.monotonic()
            if self._image_missing_logged and now - self._image_checked < self.cfg.image_recheck_interval:
                return False  # missing a moment ago: not asked again on every pass
            self._image_checked = now
            if not await self._engine(self.runtime.image_exists, self.cfg.proxy_image):
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
                       (str(self.cfg.data_dir / "proxy-data"), "/data", "rw")),
                env=(("XDG_DATA_HOME", "/data"), ("XDG_CONFIG_HOME", "/config")),
                labels={LABEL_SETTINGS: want},
            )
            try:
                cid = await self._engine(self.runtime.run_infra, spec)
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
                await self._engine(self.runtime.start, info.id)
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

    def _warm(self) -> bool:
        """True once the app reconciler finished a whole pass (it saw the containers and
        probed them). Before that its view is empty or unprobed, and routing by it would
        take every replica out of the proxy for a moment at each agent start."""
        at = self.reconciler.observed.at
        if self._first_pass_at is None:
            self._first_pass_at = at if at else None
            return False
        return at != self._first_pass_at

    async def _ensure_config(self, admin: CaddyAdmin) -> None:
        if not self._warm():
            return
        routes = self.routes()
        self._publish(routes)
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

    def _publish(self, routes: list[Route]) -> None:
        """Answer the proxy's upstream lookups with these routes, and note which
        containers just stopped being listed (their drain starts now)."""
        upstreams = {
            r.app: [(u.address.rpartition(":")[0], int(u.address.rpartition(":")[2])) for u in r.upstreams]
            for r in routes
        }
        if self.enabled:
            # Names first, then the DNS points at them: Caddy rarely has to ask for an address.
            self.hosts.ensure(ip for ups in upstreams.values() for ip, _ in ups)
        self.dns.set_upstreams(upstreams)
        now = time.monotonic()
        ids = {u.container for r in routes for u in r.upstreams}
        for gone in self.applied_ids - ids:
            self.left_at.setdefault(gone, now)
        for back in ids & set(self.left_at):
            del self.left_at[back]
        self.applied_ids = ids
        present = {c.id for c in self.reconciler.observed.containers}
        # Forget containers that no longer exist.
        self.drain_requested &= present
        self.proven &= present
        for cid in [k for k in self.left_at if k not in present]:
            del self.left_at[cid]
        local = present & ids
        if local != self.serving_ids:
            self.serving_ids = local
            self.reconciler.wake()  # publish it in the route records now

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


def boot_path(data_dir: Path) -> Path:
    return data_dir / "proxy" / "caddy.json"


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
                    host, _, port = str(up["dial"]).rpartition(":")
                    out.setdefault(rid[len("pleaco-"):-len("-proxy")], []).append((host, int(port)))
    return {app: sorted(set(ups)) for app, ups in out.items()}
