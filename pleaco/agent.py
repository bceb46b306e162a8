"""The agent: wires identity, store, engine, reconcilers and API together, and runs them.

It runs in the foreground (systemd or a terminal supervise it), stops cleanly on SIGTERM or
SIGINT, and leaves app containers running: they are state, not children. Started again on
the same data dir it finds the same identity, store and containers, and carries on.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pleaco import __version__, hostport, logs
from pleaco.api.builds import add_routes as add_build_routes
from pleaco.api.cluster import add_routes as add_cluster_routes
from pleaco.api.cluster import nodes_json
from pleaco.api.exec import ReplicaLocator, node_api
from pleaco.api.exec import add_routes as add_exec_routes
from pleaco.api.jobs import add_routes as add_job_routes
from pleaco.api.labels import add_routes as add_label_routes
from pleaco.api.proxy import add_routes as add_proxy_routes
from pleaco.api.schedule import add_routes as add_schedule_routes
from pleaco.api.secrets import add_routes as add_secret_routes
from pleaco.api.server import ApiServer
from pleaco.api.stacks import add_routes as add_stack_routes
from pleaco.api.upgrade import UpgradeRoutes
from pleaco.api.volumes import VolumeRoutes
from pleaco.apps import AppSpec, AppStore
from pleaco.builds.engine import BuildEngine
from pleaco.builds.logship import BuildLogs
from pleaco.builds.poller import RepoPoller
from pleaco.builds.secrets import SecretBox
from pleaco.builds.service import BuildService
from pleaco.builds.transfer import ImageTransfer
from pleaco.cluster.service import Cluster, ClusterError, advertise_address
from pleaco.cluster.trust import TrustError
from pleaco.config import Config
from pleaco.errors import PleacoError
from pleaco.host import journal
from pleaco.host.addresses import AddressInUse, AddressRegistry, Listener
from pleaco.host.bundle import verify_bundle
from pleaco.host.bundleship import BundleShelf
from pleaco.host.config import UpgradeSettings
from pleaco.host.datadir import DataDirInUse, DataDirLock
from pleaco.host.systemd import Notifier, Supervision, ensure_docker, status_line
from pleaco.host.trial import LocalUpgrade, local_url
from pleaco.identity import Identity, write_secret_file
from pleaco.ingress.load import LoadReporter
from pleaco.ingress.proxy import DNS_REFRESH, ProxyReconciler
from pleaco.metrics import Registry
from pleaco.net import wireguard
from pleaco.net.addresses import read_host_tables
from pleaco.net.config import BRIDGE
from pleaco.net.isolation import DNS_PORT, Isolation
from pleaco.net.mesh import KernelMesh
from pleaco.placement import Owners
from pleaco.reconcile.apps import AppReconciler
from pleaco.reconcile.autoscale import Autoscaler
from pleaco.reconcile.drain import Drain
from pleaco.reconcile.loop import LoopRunner
from pleaco.reconcile.names import NameServerLoop, service_lookup, stack_app
from pleaco.reconcile.network import LiveMember, NetworkLoop, check_host
from pleaco.reconcile.rollout import RolloutGuard
from pleaco.reconcile.routes import RouteTable
from pleaco.reconcile.status import app_status
from pleaco.reconcile.tombstones import TombstoneCollector
from pleaco.reconcile.upgrade import (
    LocalState,
    NodeUpgrade,
    PlanMarks,
    UpgradeRollout,
    current_upgrade,
    node_record_value,
)
from pleaco.reconcile.view import NodeView
from pleaco.runtime import DockerRuntime
from pleaco.stacks.jobs import JOB_FILES_DIR, OneOffJobs
from pleaco.stacks.labels import NodeLabels
from pleaco.stacks.schedule import RunLogs, Scheduler, ScheduleStore
from pleaco.stacks.secrets import AppSecrets
from pleaco.stacks.service import RepoStacks, StackService
from pleaco.stacks.volumes import VolumeContent, VolumeLoop, Volumes
from pleaco.store import Record, Store
from pleaco.ui.events import LiveEvents
from pleaco.ui.history import HistorySampler
from pleaco.ui.pages import UiRoutes

log = logs.get("pleaco.agent")

# Runs per schedule the dashboard's live "jobs" topic carries (the newest).
JOB_RUNS_SHOWN = 5

# Seconds after a rollback was decided during which a stop counts as the guard's restart
# into the previous release (it stops the new agent and starts the old one at once).
RESTART_WINDOW = 60.0

# Record kinds whose change can alter what this node should run.
# "secret": a replica waiting for its app's secret starts once it arrives.
RECONCILE_KINDS = frozenset({"app", "scale", "release", "node", "secret", "volume"})


class AgentError(PleacoError, RuntimeError, code="agent_failed"):
    """The agent cannot start (bad data dir, port taken, ...)."""


def load_or_create_token(cfg: Config) -> str:
    path = cfg.token_path
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    while token.startswith("-"):  # `pleaco --token -x...` would read as an option (1 token in 64)
        token = secrets.token_urlsafe(32)
    write_secret_file(path, (token + "\n").encode())
    return token


class HostUpgrades:
    """The one-node upgrade (pleaco.host.trial) as the cluster rollout uses it
    (pleaco.reconcile.upgrade.LocalUpgrades)."""

    def __init__(self, upgrade: LocalUpgrade, settings: UpgradeSettings) -> None:
        self.upgrade = upgrade
        self.settings = settings

    def verify(self, path: Path) -> str:
        return verify_bundle(path, self.settings.trusted_keys, __version__).version

    def state(self) -> LocalState | None:
        st = self.upgrade.state()
        return None if st is None else LocalState(st.phase, st.to_version, st.reason)

    def begin(self, path: Path) -> None:
        self.upgrade.begin(path)


def listeners(cfg: Config) -> list[Listener]:
    """Every address this agent will listen on (the proxy's only when it runs one)."""
    found = [Listener("api", cfg.api_listen), Listener("gossip", cfg.gossip_listen)]
    if cfg.proxy_image:
        found += [Listener("proxy", cfg.proxy_listen), Listener("proxy https", cfg.proxy.https_listen),
                  Listener("proxy admin", cfg.proxy.admin_listen)]
        if cfg.proxy.activator_listen:
            found.append(Listener("proxy activator", cfg.proxy.activator_listen))
    return found


class Agent:
    def __init__(self, cfg: Config, argv: Sequence[str] | None = None) -> None:
        self.cfg = cfg
        # This node's signed WireGuard key and port for its node record (set with the mesh).
        self._wireguard: dict[str, str] = {}
        self._stop = asyncio.Event()
        # The agent's arguments (after the program name): an upgrade starts the new version
        # with the same ones.
        self.argv = list(sys.argv[1:] if argv is None else argv)
        # Set by request_restart: the command to exec once the agent has stopped (the
        # caller of run() does the exec, after the data dir lock is released).
        self.restart_command: list[str] | None = None
        # This node's upgrades (pleaco/host/trial.py): set while the agent runs.
        self.upgrade: LocalUpgrade | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def request_stop(self) -> None:
        self._stop.set()

    def request_restart(self, command: list[str]) -> None:
        """Stop as on SIGTERM, then run ``command`` in this process (exec). Callable from
        any thread (an upgrade runs in a worker thread)."""
        self.restart_command = command
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        else:
            self._stop.set()

    async def run(self) -> None:
        cfg = self.cfg
        # SIGUSR1 asks for an upgrade (`pleaco release apply`); until the agent handles it,
        # and after, it is ignored rather than fatal (its default), across an exec too.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        lock = DataDirLock(cfg.data_dir)
        addresses = AddressRegistry()
        try:
            cfg.data_dir.mkdir(parents=True, exist_ok=True)
            os.chmod(cfg.data_dir, 0o700)
            lock.acquire()  # before anything in it is read or written
            addresses.claim(listeners(cfg), cfg.data_dir)  # before anything binds
            identity = Identity.load_or_create(cfg.data_dir)
        except (DataDirInUse, AddressInUse) as exc:
            lock.release()
            raise AgentError(str(exc)) from exc
        except OSError as exc:
            addresses.release()
            lock.release()
            raise AgentError(f"data dir {cfg.data_dir}: {exc}") from exc
        try:
            await self._run(cfg, identity)
        finally:
            addresses.release()
            lock.release()

    async def _run(self, cfg: Config, identity: Identity) -> None:
        logs.setup(cfg.log_level, identity.node_id, cfg.name, handler=journal.handler_if_journal())
        token = load_or_create_token(cfg)
        store = Store(cfg.db_path, identity)

        registry = Registry()
        runtime = DockerRuntime(cfg.docker_url, cfg.docker_timeout)
        await asyncio.to_thread(ensure_docker, runtime.ping, cfg.docker_url)  # docker.service, if it is down
        apps = AppStore(store, cfg.max_replicas, cfg.apps)
        cluster = Cluster(cfg, identity, store, registry)
        images = ImageTransfer(cluster, runtime)  # images between nodes, over the cluster's streams
        me = identity.node_id
        runner = LoopRunner(registry)
        owners = Owners(me, cluster.placement_nodes)
        # The drain counts from when this node's proxy stopped routing a replica: its
        # upstream cache (DNS_REFRESH) expires, and, with other nodes, theirs (MESH_DELAY).
        drain = Drain(cfg.rollout.drain_grace, proxy_delay=DNS_REFRESH if cfg.proxy_image else 0.0,
                      mesh=lambda: any(n != me for n in cluster.placement_nodes()))
        view = NodeView(me, apps, drain, advertise_host=hostport.host_of(cluster.addr),
                        configured_publish_host=cfg.publish_host, cluster_network=cfg.network.enabled)
        view.publish_ports = not cfg.network.enabled or cfg.network.publish_ports
        routes = RouteTable(store, me)
        # Secrets are sealed with the cluster key once there is one, with a node-local key
        # before; founding or joining re-seals the local ones, and so does this start
        # (plain ones from earlier versions, local ones a crash left behind).
        secretbox = SecretBox(cfg.data_dir, lambda: cluster.state)
        app_secrets = AppSecrets(store, apps, secretbox, cfg.data_dir)
        node_labels = NodeLabels(store)
        volumes = Volumes(store, apps, cfg.volumes.claim_settle)

        def volume_pin(spec: AppSpec, live: Sequence[str]) -> tuple[frozenset[str] | None, str]:
            found = volumes.pin(spec, live)
            return found.only, found.why

        reconciler = AppReconciler(cfg, view, routes, runtime, registry, live_nodes=cluster.placement_nodes,
                                   weights=cluster.weights, memory=cluster.memory, fetch_image=images.fetch_image,
                                   secrets=app_secrets, labels=node_labels.all, pins=volume_pin)
        runner.add(reconciler)
        volume_loop = VolumeLoop(cfg.volumes, volumes, runtime, owners, cluster.placement_nodes, node_labels.all,
                                 cluster.weights, on_claim=reconciler.wake)
        runner.add(volume_loop)
        drain.on_request = reconciler.wake  # publish the drain at once
        network: NetworkLoop | None = None
        if cfg.network.enabled:
            try:
                await self._check_network(cfg, runtime, store)
            except AgentError:
                runtime.close()
                store.close()
                raise
            # Service names: a DNS server on the network's gateway, once the network is there.
            names = NameServerLoop(cfg.network, view, lambda: network.subnet if network is not None else None,
                                   service_lookup(view, routes, cluster.placement_nodes, cfg.network.cidr), registry,
                                   stack_app=stack_app(apps))

            def network_ready() -> None:
                reconciler.wake()
                names.wake()

            network = NetworkLoop(
                cfg.network, store, view, runtime, self._mesh(cfg, identity), advertised=lambda: cluster.addr,
                live_members=lambda: [LiveMember(m.node_id, m.addr) for m in cluster.live_peers()],
                ready=lambda: bool(cluster.placement_nodes()), on_ready=network_ready)
            runner.add(network)
            runner.add(names)
        else:
            log.info("network.disabled")

        def cluster_changed() -> None:
            reconciler.wake()
            if network is not None:
                network.wake()  # a member came or went: the mesh's peers

        cluster.on_change = cluster_changed
        proxy = ProxyReconciler(cfg, cfg.data_dir, view, routes, runtime, registry, live_nodes=cluster.placement_nodes)
        if proxy.enabled:
            runner.add(proxy)
        else:
            log.info("proxy.disabled")
        activator = proxy.activator if proxy.enabled else None
        load_reporter = LoadReporter(cfg.proxy.load_interval, view,
                                     proxy.traffic if proxy.enabled and cfg.proxy.access_metrics else None,
                                     cluster.publish_load, cluster.loads, registry,
                                     held=activator.held if activator is not None else None,
                                     autoscaled=lambda: bool(apps.autoscaled()),
                                     autoscale_interval=cfg.proxy.autoscale_load_interval)
        runner.add(load_reporter)
        if activator is not None:
            activator.on_wake = load_reporter.wake  # the held demand reported before the wake is written
        runner.add(RolloutGuard(cfg.rollout, view, routes, owners, registry, cluster.placement_nodes,
                                on_rollback=reconciler.wake))
        runner.add(TombstoneCollector(store, cfg.tombstone_ttl))
        autoscaler = Autoscaler(cfg.autoscale, apps, cluster.loads.all, owners, registry)
        runner.add(autoscaler)
        cluster.loads.on_news = autoscaler.wake  # a new figure is sampled at once, not at the next tick
        upgrade = LocalUpgrade(cfg.data_dir, cfg.upgrade, node_id=me, engine=runtime,
                               live_nodes=cluster.placement_nodes, restart=self.request_restart, argv=self.argv,
                               api_url=local_url(cfg.api_listen))
        upgrade.recover()  # an upgrade interrupted here: resolved before anything runs
        self.upgrade = upgrade
        # This node's record, with its version and upgrade state as recovered.
        local = HostUpgrades(upgrade, cfg.upgrade)
        marks = PlanMarks(cfg.data_dir)
        self._register_node(store, identity, current_upgrade(marks, local))
        # Cluster upgrades: bundles between nodes (channel U), the plan's turns, the API.
        shelf = BundleShelf(cfg.data_dir, cluster)
        upgrades = UpgradeRollout(cfg.upgrade, store, me, lambda: self._node_base(identity), cluster.members,
                                 local, shelf, marks)
        runner.add(upgrades)
        cluster.hold = upgrades.holds  # a node restarting into a release keeps its replicas

        def on_change(rec: Record) -> None:
            if rec.kind in RECONCILE_KINDS:
                reconciler.wake()
            if rec.kind in ("app", "scale", "volume", "node"):
                volume_loop.wake()  # an app's first replicas (a claim), a removal, a node back
            if network is not None and rec.kind in ("subnet", "node"):
                network.wake()  # a claim (maybe on this node's subnet), or a peer's keys
            if rec.kind == "route":
                proxy.wake()  # replicas changed (here or elsewhere): the proxy's upstreams
            if rec.kind in ("upgrade", "node"):
                upgrades.wake()  # a plan, or a node's upgrade state: maybe this node's turn

        store.subscribe(on_change)
        api = ApiServer(
            identity=identity, node_name=cfg.name, store=store, apps=apps, reconciler=reconciler,
            runtime=runtime, registry=registry, token=token, max_body_bytes=cfg.max_body_bytes, limits=cfg.api,
            app_load=lambda name: (load.to_json() if (load := cluster.loads.cluster(name)) else None),
            app_scaling=lambda name: (f.to_json() if (f := autoscaler.figures(name)) else None),
        )
        def node_load() -> dict[str, Any]:
            return {"containers": len(view.observed.containers)}

        add_cluster_routes(api.app, cluster, node_load, node_labels.of)
        add_label_routes(api.app, node_labels, cluster.members, reconciler.wake)
        # The dashboard (pleaco/ui): its pages, live events and the apps' history, all from
        # what the API's own handlers answer.
        history = HistorySampler(cfg.ui, api.apps_json)
        runner.add(history)
        UiRoutes(token, cfg.name, history.history, lambda name: apps.get(name) is not None,
                 cfg.ui.history_interval).add_to(api.app)
        add_proxy_routes(api.app, proxy)
        UpgradeRoutes(cfg.upgrade, store, me, shelf, local, cluster.members, upgrades.wake).add_to(api.app)
        build_engine = BuildEngine(cfg.docker_url, cfg.docker_timeout, identity.node_id)
        cluster.on_cluster = lambda: secretbox.reseal(store)
        secretbox.reseal(store)
        builds = BuildService(cfg.build, cfg.data_dir, identity.node_id, store, apps, build_engine, registry,
                              secretbox, owners,
                              on_release=lambda app, manifest: ScheduleStore(store).replace_from_manifest(
                                  app, manifest.jobs))
        runner.add(builds)
        if cfg.build.poll_interval > 0:
            runner.add(RepoPoller(builds, owners))
        add_build_routes(api.app, builds, BuildLogs(cluster, builds))  # logs from the building node
        add_secret_routes(api.app, app_secrets, reconciler.wake)
        def node_address(node_id: str) -> tuple[str, str]:
            return node_api(node_id, store.value("node", node_id))

        jobs = OneOffJobs(view, apps, AppSecrets(store, apps, secretbox, cfg.data_dir, JOB_FILES_DIR), runtime,
                          volumes, cluster.placement_nodes, node_address)
        add_job_routes(api.app, jobs)

        def app_running(name: str) -> int:
            spec = apps.get(name)
            return 0 if spec is None else app_status(view, routes, cluster.placement_nodes(), spec,
                                                     apps.replicas(name)).running

        VolumeRoutes(volumes, VolumeContent(cfg.volumes, runtime, me), runtime, store, me, cluster.placement_nodes,
                     app_running, cfg.data_dir / "volume-restores", volume_loop.wake, cfg.volumes).add_to(api.app)
        scheduler = Scheduler(cfg.jobs, me, store, apps, owners, cluster.placement_nodes, jobs,
                              RunLogs(cfg.data_dir, cfg.jobs.log_bytes), fetch_image=images.fetch_image)
        runner.add(scheduler)

        add_schedule_routes(api.app, scheduler, apps, node_address)
        add_exec_routes(api.app, ReplicaLocator(me, apps, runtime, routes, cluster.placement_nodes, node_address))
        # The dashboard's live topics: each the JSON of its own endpoint (GET /v1/nodes,
        # /v1/apps, /v1/jobs?limit=5), from the same functions.
        LiveEvents(cfg.ui.live_interval, {"nodes": lambda: nodes_json(cluster, node_load, node_labels.of),
                                          "apps": api.apps_json,
                                          "jobs": lambda: scheduler.listing(None, JOB_RUNS_SHOWN)}).add_to(api.app)

        def all_healthy(name: str) -> bool:
            shown = api.app_json(name)
            return int(shown["healthy"]) >= int(shown["replicas"])

        stacks = StackService(apps, app_secrets, ScheduleStore(store), all_healthy, reconciler.wake)
        add_stack_routes(api.app, stacks, api.app_json)
        # A connected repository's compose file: its pushes deploy it as a stack.
        builds.stack_check = RepoStacks(stacks, asyncio.get_running_loop()).check

        supervision = Supervision(
            Notifier(),
            status=lambda: status_line(apps.count(), sum(c.running for c in view.observed.containers),
                                       max(1, len(cluster.placement_nodes()))),
            stuck=lambda now: runner.stuck(now, cfg.loop_stuck_after),
        )
        loop = self._loop = asyncio.get_running_loop()
        upgrade_tasks: set[asyncio.Task[None]] = set()

        def upgrade_task(coro: Any) -> None:
            task = asyncio.create_task(coro)
            upgrade_tasks.add(task)
            task.add_done_callback(upgrade_tasks.discard)

        try:
            try:
                await cluster.start()
            except (ClusterError, TrustError) as exc:
                raise AgentError(str(exc)) from exc
            await asyncio.to_thread(jobs.sweep)  # jobs an earlier life of this agent left behind
            host, port = cfg.api_host_port
            try:
                await api.start(host, port)
            except OSError as exc:
                raise AgentError(f"cannot listen on {cfg.api_listen} for the API: {exc.strerror or exc}") from exc
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            runner.start()
            upgrade_task(upgrade.confirm())  # a trial of this version: confirmed once healthy
            loop.add_signal_handler(signal.SIGUSR1, lambda: upgrade_task(upgrade.apply_request()))
            supervision.ready()  # the API answers and the loops run
            supervision.start()
            log.info(
                "agent.started", version=__version__, name=cfg.name, data_dir=str(cfg.data_dir),
                api=cfg.api_listen, docker=cfg.docker_url, loops=",".join(lp.name for lp in runner.loops),
            )
            await self._stop.wait()
        finally:
            log.info("agent.stopping")
            await supervision.stop()
            for task in upgrade_tasks:
                task.cancel()
            # Each step on its own: whatever one raises, the others still run, and the
            # store (the durable state) is always closed last.
            leave = not self._restarting()
            for what, close in (("loops", runner.stop), ("cluster", lambda: cluster.stop(leave)), ("api", api.stop)):
                try:
                    await close()
                except Exception:
                    log.error("agent.stop_failed", exc_info=True, part=what)
            for what, sync_close in (("network", network.close if network is not None else lambda: None),
                                     ("build_engine", build_engine.close), ("runtime", runtime.close),
                                     ("store", store.close)):
                try:
                    sync_close()
                except Exception:
                    log.error("agent.stop_failed", exc_info=True, part=what)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            log.info("agent.stopped")

    def _mesh(self, cfg: Config, identity: Identity) -> KernelMesh:
        """Routes and WireGuard to the other nodes, and the app network's isolation: its
        containers may open the DNS and the proxy's public ports on the hosts, nothing else.
        The node record announces the WireGuard key, signed (pleaco.net.wireguard)."""
        ports = [DNS_PORT]
        if cfg.proxy_image:
            ports += [hostport.split(cfg.proxy_listen)[1], hostport.split(cfg.proxy.https_listen)[1]]
        mesh = KernelMesh(cfg.network, cfg.data_dir, Isolation(BRIDGE, ports))
        self._wireguard = wireguard.record_fields(identity, mesh.key.public, cfg.network.wireguard_port)
        return mesh

    async def _check_network(self, cfg: Config, runtime: DockerRuntime, store: Store) -> None:
        """Refuse to start, before anything is made, with a cluster CIDR that overlaps the
        host's networks or Docker's, or that is too small for the nodes this one knows."""
        try:
            tables = await asyncio.to_thread(read_host_tables)
            docker_subnets = await asyncio.to_thread(runtime.network_subnets)
        except (OSError, PleacoError) as exc:
            raise AgentError(f"network: cannot read the host's or Docker's networks: {exc}") from exc
        nodes = max(1, sum(1 for rec in store.records("node")
                           if "/" not in rec.key and store.revoked_at(rec.key) is None))
        problems = check_host(cfg.network, tables, docker_subnets, nodes)
        if problems:
            raise AgentError("; ".join(problems))

    def _restarting(self) -> bool:
        """Whether this stop is a restart into another release (an upgrade, or its
        rollback): by exec, or by systemd during the trial. The node is back within a
        second or two, so it does not leave the cluster: the others would start its
        replicas elsewhere at once and stop them again when it is back."""
        if self.restart_command is not None:
            return True
        state = self.upgrade.state() if self.upgrade is not None else None
        if state is None:
            return False
        return state.phase == "trial" or (state.phase == "rolled_back" and time.time() - state.updated < RESTART_WINDOW)

    def _node_base(self, identity: Identity) -> dict[str, str]:
        return {
            "name": self.cfg.name,
            "public_key": identity.public_key.hex(),
            "address": self.cfg.api_listen,
            "gossip": advertise_address(self.cfg),
            "version": __version__,
            **self._wireguard,
        }

    def _register_node(self, store: Store, identity: Identity, upgrade: NodeUpgrade) -> None:
        """Write this node's ``node`` record (its admitted key, how to reach it, its version
        and upgrade state) if changed."""
        current = store.value("node", identity.node_id)
        value = node_record_value(current, self._node_base(identity), upgrade)
        if current != value:
            store.put("node", identity.node_id, value)
