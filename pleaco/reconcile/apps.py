"""The app reconcile loop: desired replicas (store) against labelled containers (engine).

Each pass reads the desired state, lists this node's containers, computes the actions that
close the difference and runs them, then returns. It keeps no plan between passes: an agent
killed mid-pass and started again computes the same actions from what is real, and the
deterministic container names (app, release, replica, node) mean a replica that was already
created is found, not created twice.

What a pass does, per app and replica this node owns:
- no container of the current release: start one (unless the image is missing, or the
  replica is backing off after crashes);
- a container that was created but never started (agent died in between): start it;
- a container that exited: count a crash, wait out the back-off, start it again;
- a running container failing its health probe ``health_failures`` times in a row: restart;
- a container of an older release: removed once the current release's replica runs and is
  healthy (start-first, so an update never leaves the replica without a container);
- containers of deleted apps, of replicas beyond the desired count, or duplicates: removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from pleaco import logs
from pleaco.apps import AppSpec, AppStore
from pleaco.config import Config
from pleaco.metrics import Counter, Gauge, Histogram, Registry
from pleaco.placement import owned_replicas
from pleaco.reconcile.backoff import Backoff
from pleaco.reconcile.publish import local_dial_host, mesh_address, publish_host
from pleaco.runtime import Conflict, ContainerInfo, DockerRuntime, EngineUnavailable, NotFound, RunSpec
from pleaco.runtime.docker import container_name
from pleaco.runtime.health import probe

log = logs.get("pleaco.reconcile.apps")

ReplicaKey = tuple[str, int]  # (app, replica index)


@dataclass
class ReplicaState:
    """What this node remembers about one replica between passes (lost on restart by design:
    a restarted agent gives every replica a fresh start)."""

    backoff: Backoff
    restarts: int = 0
    last_exit_code: int | None = None
    last_error: str = ""
    crash_seen: str = ""  # id of the exited container already counted as a crash
    stop_reason: str = ""  # why pleaco itself stopped the container, if it did
    healthy: bool = False
    health_failures: int = 0
    running_since: float = 0.0
    container_id: str = ""


@dataclass
class ImageState:
    present: bool
    checked: float


@dataclass
class Observation:
    """The last pass's view of this node, for the API and metrics."""

    engine_ok: bool = False
    engine_error: str = "not checked yet"
    containers: list[ContainerInfo] = field(default_factory=list)
    at: float = 0.0

    @functools.cached_property
    def by_app(self) -> dict[str, list[ContainerInfo]]:
        """The containers per app, so one app's status does not sort every container (an
        Observation is replaced each pass, never changed)."""
        out: dict[str, list[ContainerInfo]] = {}
        for c in self.containers:
            out.setdefault(c.app, []).append(c)
        return out


class AppReconciler:
    def __init__(
        self,
        cfg: Config,
        node_id: str,
        apps: AppStore,
        runtime: DockerRuntime,
        registry: Registry,
        live_nodes: Callable[[], Sequence[str]] | None = None,
        weights: Callable[[], dict[str, float]] | None = None,
        fetch_image: Callable[[str], Awaitable[bool]] | None = None,
        advertise_host: str = "127.0.0.1",
    ) -> None:
        self.cfg = cfg
        self.advertise_host = advertise_host
        self.publish_host = publish_host(cfg.publish_host, advertise_host)
        self.node_id = node_id
        self.apps = apps
        self.runtime = runtime
        self.live_nodes = live_nodes or (lambda: [node_id])
        # Placement weight per node (its capacity); equal when not given.
        self.weights = weights or dict
        # Gets a missing image from another node (pleaco.cluster.images); None: no cluster.
        self.fetch_image = fetch_image
        self._next_fetch: dict[str, float] = {}
        self.observed = Observation()
        self.replicas: dict[ReplicaKey, ReplicaState] = {}
        self.images: dict[str, ImageState] = {}
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Engine calls block; a pool of our own so a slow engine cannot starve the
        # default executor (used by aiohttp's resolver and others).
        self._pool = ThreadPoolExecutor(cfg.start_concurrency + 2, thread_name_prefix="docker")
        self._limit = asyncio.Semaphore(cfg.start_concurrency)
        # Actions run as tasks that outlive the pass that decided them, so a pass never
        # waits for 50 container starts: the view stays fresh, and a scale to 0 during a
        # scale to 50 acts at once. Keyed by what they act on, so no pass doubles one up.
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._busy_when_observed: set[str] = set()
        self._published: dict[str, list[dict[str, Any]]] = {}
        self._session: aiohttp.ClientSession | None = None
        # Asked before a running container is stopped; False defers it to a later pass. The
        # proxy sets it to drain replicas (out of its routes, a grace period, then stop).
        self.may_remove: Callable[[ContainerInfo, str], bool] = lambda c, reason: True
        # Whether a container of this node takes traffic: published in the ``route`` records,
        # so other nodes' proxies route to exactly what this node's proxy does (which sets it).
        self.serving: Callable[[ContainerInfo], bool] = self.healthy_current

        self.m_runs = registry.register(
            Counter("pleaco_reconcile_runs_total", "Reconcile passes by loop and result.", ("loop", "result"))
        )
        self.m_duration = registry.register(
            Histogram("pleaco_reconcile_duration_seconds", "Duration of reconcile passes.", ("loop",))
        )
        self.m_actions = registry.register(
            Counter("pleaco_reconcile_actions_total", "Container actions taken.", ("action", "result"))
        )
        self.m_restarts = registry.register(
            Counter("pleaco_container_restarts_total", "Replica restarts after crashes or failed health.", ("app",))
        )
        registry.register(
            Gauge(
                "pleaco_containers",
                "This node's pleaco containers by state, as last observed.",
                ("state",),
                collect=self._containers_by_state,
            )
        )
        registry.register(
            Gauge(
                "pleaco_engine_up",
                "1 when Docker Engine answered the last reconcile pass.",
                collect=lambda: {(): 1.0 if self.observed.engine_ok else 0.0},
            )
        )

    def _containers_by_state(self) -> dict[tuple[str, ...], float]:
        counts: dict[tuple[str, ...], float] = {}
        for c in self.observed.containers:
            counts[(c.state,)] = counts.get((c.state,), 0.0) + 1
        return counts

    # -- loop ----------------------------------------------------------------------------

    def wake(self) -> None:
        """Ask for a pass soon; safe to call from any thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession()
        try:
            while True:
                self._wake.clear()
                await self.reconcile_once()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.cfg.reconcile_interval)
                # Coalesce a burst of wake-ups (50 finished starts) into one pass. Nothing in
                # flight (a new release was written): no burst to wait for, pass at once.
                if self._inflight:
                    await asyncio.sleep(0.05)
        finally:
            await self.drain(cancel=True)
            await self._session.close()
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, key: str, action: Coroutine[Any, Any, None]) -> bool:
        """Run ``action`` in the background unless one is already running for ``key``, or ran
        while this pass looked at the engine (then the pass's view of it may be stale: a
        container seen "created" just before its start finished would be started again)."""
        if key in self._inflight or key in self._busy_when_observed:
            action.close()
            return False

        def done(_: asyncio.Task[None]) -> None:
            self._inflight.pop(key, None)
            self._wake.set()

        task = asyncio.create_task(self._guarded(key, action), name=f"reconcile {key}")
        self._inflight[key] = task
        task.add_done_callback(done)
        return True

    async def _guarded(self, key: str, action: Coroutine[Any, Any, None]) -> None:
        """Run a background action; its failure is logged, and the next pass retries."""
        try:
            await action
        except EngineUnavailable as exc:
            log.debug("reconcile.action_engine_unreachable", action=key, error=str(exc))
        except Exception as exc:
            log.error("reconcile.action_failed", exc_info=True, action=key, error=str(exc))

    async def drain(self, cancel: bool = False) -> None:
        """Wait for (or cancel) the actions still running."""
        tasks = list(self._inflight.values())
        if cancel:
            for t in tasks:
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _still_wanted(self, spec: AppSpec, replica: int) -> bool:
        """Checked just before a queued start runs: the app may have changed meanwhile."""
        current = self.apps.get(spec.name)
        return current is not None and current.revision == spec.revision and replica < self.apps.replicas(spec.name)

    async def _engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    async def reconcile_once(self) -> bool:
        """One pass. Returns True when it acted (so another pass soon is worthwhile)."""
        started = time.monotonic()
        try:
            acted = await self._pass()
        except EngineUnavailable as exc:
            if self.observed.engine_ok or self.observed.at == 0.0:
                log.warning("engine.unreachable", error=str(exc))
            self.observed = Observation(engine_ok=False, engine_error=str(exc), at=time.time())
            self.m_runs.inc(loop="apps", result="engine_unreachable")
            return False
        except Exception as exc:
            log.error("reconcile.failed", exc_info=True, error=str(exc))
            self.m_runs.inc(loop="apps", result="error")
            return False
        finally:
            self.m_duration.observe(time.monotonic() - started, loop="apps")
        self.m_runs.inc(loop="apps", result="ok")
        return acted

    async def _pass(self) -> bool:
        self._busy_when_observed = set(self._inflight)
        containers: list[ContainerInfo] = await self._engine(self.runtime.list_managed, self.node_id)
        if not self.observed.engine_ok:
            log.info("engine.reachable")
        self.observed = Observation(engine_ok=True, engine_error="", containers=containers, at=time.time())
        now = time.monotonic()

        desired: dict[ReplicaKey, AppSpec] = {}
        nodes = list(self.live_nodes())
        if not nodes:
            # The cluster layer does not know yet where replicas belong (this node is
            # still joining): observe, but neither start nor remove anything.
            return False
        specs = {spec.name: spec for spec in self.apps.specs()}
        weights = self.weights()
        for spec in specs.values():
            for idx in owned_replicas(spec.name, self.apps.replicas(spec.name), nodes, self.node_id, weights):
                desired[(spec.name, idx)] = spec

        by_replica: dict[ReplicaKey, list[ContainerInfo]] = {}
        for c in containers:
            by_replica.setdefault((c.app, c.replica), []).append(c)

        removals: list[tuple[ContainerInfo, str]] = []
        starts: list[tuple[AppSpec, int]] = []
        restarts: list[tuple[ContainerInfo, AppSpec]] = []
        # Rollout pace per app: replacements started and not serving yet (the surge), and
        # replicas without a serving container (the unavailable); see rollout settings.
        surging: dict[str, int] = {}
        unavailable: dict[str, int] = {}
        replace: list[tuple[AppSpec, int, list[ContainerInfo]]] = []

        for key, group in by_replica.items():
            wanted = desired.get(key)
            if wanted is None:
                reason = "app deleted" if key[0] not in specs else "replica not wanted here"
                removals.extend((c, reason) for c in group)
                continue
            spec = wanted
            current = [c for c in group if c.release == spec.revision]
            old = [c for c in group if c.release != spec.revision]
            # Duplicates of the current release cannot come from pleaco's deterministic
            # names, but a hand-made one must not linger: keep pleaco's own if it runs,
            # else the oldest running one, and drop the rest.
            own = container_name(spec.name, spec.revision, key[1], self.node_id)
            current.sort(key=lambda c: (not c.running, c.name != own, c.created))
            removals.extend((c, "duplicate") for c in current[1:])
            state = self._state(key)
            if current:
                keep = current[0]
                self._observe_replica(key, keep, state, now, spec)
                if not keep.running and (keep.state == "created" or state.backoff.ready(now)):
                    restarts.append((keep, spec))
                if self._serving(keep, state, spec):
                    removals.extend((c, "replaced by new release") for c in old)
                elif old:
                    surging[spec.name] = surging.get(spec.name, 0) + 1
                else:
                    unavailable[spec.name] = unavailable.get(spec.name, 0) + 1
            elif state.backoff.ready(now):
                replace.append((spec, key[1], old))

        # Old release only: start the replacement within the surge budget; beyond it, stop
        # the old one first within the unavailable budget; else wait for a later pass.
        rollout = self.cfg.rollout
        for spec, idx, old in replace:
            if surging.get(spec.name, 0) < rollout.max_surge:
                surging[spec.name] = surging.get(spec.name, 0) + 1
                starts.append((spec, idx))
            elif unavailable.get(spec.name, 0) < rollout.max_unavailable:
                unavailable[spec.name] = unavailable.get(spec.name, 0) + 1
                removals.extend((c, "stopped first to replace it (surge budget spent)") for c in old)

        for key, spec in desired.items():
            if key not in by_replica and self._state(key).backoff.ready(now):
                starts.append((spec, key[1]))

        # Forget replicas that are neither wanted nor present.
        for key in list(self.replicas):
            if key not in desired and key not in by_replica:
                del self.replicas[key]

        await self._probe_health(desired, now)
        removals = [(c, reason) for c, reason in removals if not c.running or self.may_remove(c, reason)]

        # Check images of wanted-but-missing replicas before trying to start them.
        starts = [s for s in starts if await self._image_present(s[0].image, now)]

        self._publish()
        acted = False
        for c, reason in removals:
            acted |= self._spawn(f"remove/{c.id}", self._remove(c, reason))
        for spec, idx in starts:
            acted |= self._spawn(f"run/{spec.name}/{idx}", self._start(spec, idx))
        for c, spec in restarts:
            acted |= self._spawn(f"run/{c.app}/{c.replica}", self._restart(c, spec))
        return acted

    # -- what other nodes see -------------------------------------------------------------

    def _publish(self) -> None:
        """Write this node's replicas of each app as a ``route`` record (APP/NODE) when they
        changed, so every node can show (and route to) the whole app. Only changes are
        written: a steady app costs nothing."""
        current: dict[str, list[dict[str, Any]]] = {}
        here = self.observed.by_app
        for spec in self.apps.specs():
            if spec.name not in here:
                continue  # no instance here: nothing to publish (and no status to work out)
            status = app_status(self, spec, self.apps.replicas(spec.name), remote=False)
            if status.instances:
                # Without the back-off countdown, which changes every pass.
                current[spec.name] = [{**i.to_json(), "backoff_s": 0.0} for i in status.instances]
        for app in set(self._published) | set(current):
            instances = current.get(app)
            if self._published.get(app) == instances:
                continue
            key = f"{app}/{self.node_id}"
            if instances is None:
                if self.apps.store.value("route", key) is not None:
                    self.apps.store.delete("route", key)
                self._published.pop(app, None)
            else:
                value = {"app": app, "node": self.node_id, "host": self.publish_host, "instances": instances}
                self.apps.store.put("route", key, value)
                self._published[app] = instances

    def remote_instances(self, app: str) -> list[InstanceStatus]:
        """The app's replicas on other live nodes, from their ``route`` records."""
        # Route keys are APP/NODE: this app's alone, not every app's (O(apps x records) per listing).
        found = self.apps.store.peek_records("route", prefix=app + "/")
        if not found:
            return []
        live = set(self.live_nodes())
        out = []
        for rec in found:
            value = rec.value or {}
            node = value.get("node")
            if value.get("app") != app or node == self.node_id or node not in live:
                continue
            for raw in value.get("instances") or []:
                try:
                    out.append(InstanceStatus.from_json(raw, str(node)))
                except (KeyError, TypeError, ValueError):
                    continue
        return out

    # -- per-replica bookkeeping -----------------------------------------------------------

    def _state(self, key: ReplicaKey) -> ReplicaState:
        state = self.replicas.get(key)
        if state is None:
            state = ReplicaState(Backoff(self.cfg.backoff_base, self.cfg.backoff_max))
            self.replicas[key] = state
        return state

    def _observe_replica(self, key: ReplicaKey, c: ContainerInfo, st: ReplicaState, now: float, spec: AppSpec) -> None:
        if c.id != st.container_id:
            st.container_id = c.id
            st.healthy = False
            st.health_failures = 0
            st.running_since = now if c.running else 0.0
        if c.running:
            if st.running_since == 0.0:
                st.running_since = now
            if not spec.health:
                st.healthy = True
            if st.backoff.failures and now - st.running_since >= self.cfg.backoff_reset_after:
                st.backoff.reset()
            return
        st.healthy = False
        st.running_since = 0.0
        if c.state in ("exited", "dead") and st.crash_seen != c.id + str(st.restarts):
            st.crash_seen = c.id + str(st.restarts)
            st.last_exit_code = c.exit_code
            delay = st.backoff.fail(now)
            st.last_error = st.stop_reason or f"exited with code {c.exit_code}"
            st.stop_reason = ""
            log.warning(
                "replica.crashed", app=key[0], replica=key[1], container=c.id[:12],
                exit_code=c.exit_code, failures=st.backoff.failures, backoff_s=round(delay, 1),
            )

    def _serving(self, c: ContainerInfo, st: ReplicaState, spec: AppSpec) -> bool:
        return c.running and (st.healthy or not spec.health)

    async def _image_present(self, image: str, now: float) -> bool:
        known = self.images.get(image)
        if known is not None and (known.present or now - known.checked < self.cfg.image_recheck_interval):
            return known.present
        present: bool = await self._engine(self.runtime.image_exists, image)
        if not present and self.fetch_image is not None and now >= self._next_fetch.get(image, 0.0):
            # Another node may have it (built there): fetch in the background and look
            # again when that is done; a failed fetch is retried after a while, not at once.
            self._next_fetch[image] = now + max(10.0, self.cfg.image_recheck_interval)
            self._spawn(f"fetch/{image}", self._fetch(image))
        if known is None or known.present != present:
            if present:
                log.info("image.present", image=image)
            else:
                log.warning("image.missing", image=image)
        self.images[image] = ImageState(present, now)
        return present

    async def _fetch(self, image: str) -> None:
        assert self.fetch_image is not None
        if await self.fetch_image(image):
            self.images.pop(image, None)  # look again on the next pass

    def healthy_current(self, c: ContainerInfo) -> bool:
        """Without a proxy to say otherwise: a running, healthy replica of the current release."""
        spec = self.apps.get(c.app)
        st = self.replicas.get((c.app, c.replica))
        return bool(c.running and spec and c.release == spec.revision and st and st.container_id == c.id
                    and st.healthy)

    def image_missing(self, image: str) -> bool:
        known = self.images.get(image)
        return known is not None and not known.present

    # -- actions -------------------------------------------------------------------------

    async def _start(self, spec: AppSpec, replica: int) -> None:
        run = RunSpec(
            app=spec.name, node=self.node_id, release=spec.revision, replica=replica,
            image=spec.image, port=spec.port, env=spec.env, publish_host=self.publish_host,
        )
        async with self._limit:
            if not self._still_wanted(spec, replica):
                return
            try:
                cid = await self._engine(self.runtime.run, run)
            except Conflict:
                # Made by an earlier pass or an earlier life of this agent; the next pass
                # sees it and starts it if it is not running.
                self.m_actions.inc(action="start", result="exists")
                return
            except NotFound as exc:
                self.images[spec.image] = ImageState(False, time.monotonic())
                self._state((spec.name, replica)).last_error = str(exc)
                self.m_actions.inc(action="start", result="image_missing")
                log.warning("replica.start_failed", app=spec.name, replica=replica, error=str(exc))
                return
            except RuntimeError as exc:
                if isinstance(exc, EngineUnavailable):
                    raise
                st = self._state((spec.name, replica))
                st.last_error = str(exc)
                st.backoff.fail(time.monotonic())
                self.m_actions.inc(action="start", result="error")
                log.warning("replica.start_failed", app=spec.name, replica=replica, error=str(exc))
                return
        self.m_actions.inc(action="start", result="ok")
        log.info("replica.started", app=spec.name, replica=replica, release=spec.revision, container=cid[:12])

    async def _restart(self, c: ContainerInfo, spec: AppSpec) -> None:
        st = self._state((c.app, c.replica))
        async with self._limit:
            try:
                await self._engine(self.runtime.start, c.id)
            except NotFound:
                return  # removed meanwhile; the next pass starts a new one
            except RuntimeError as exc:
                if isinstance(exc, EngineUnavailable):
                    raise
                st.last_error = str(exc)
                st.backoff.fail(time.monotonic())
                log.warning("replica.restart_failed", app=c.app, replica=c.replica, error=str(exc))
                return
        if c.state != "created":
            st.restarts += 1
            self.m_restarts.inc(app=c.app)
        self.m_actions.inc(action="restart" if c.state != "created" else "start", result="ok")
        log.info(
            "replica.restarted" if c.state != "created" else "replica.started",
            app=c.app, replica=c.replica, release=c.release, container=c.id[:12], restarts=st.restarts,
        )

    async def _remove(self, c: ContainerInfo, reason: str) -> None:
        async with self._limit:
            try:
                await self._engine(self.runtime.remove, c.id, self.node_id, self.cfg.stop_timeout)
            except NotFound:
                pass
            except RuntimeError as exc:
                if isinstance(exc, EngineUnavailable):
                    raise
                self.m_actions.inc(action="remove", result="error")
                log.warning("replica.remove_failed", app=c.app, replica=c.replica, error=str(exc))
                return
        self.m_actions.inc(action="remove", result="ok")
        log.info(
            "replica.removed", app=c.app, replica=c.replica, release=c.release, container=c.id[:12], reason=reason
        )

    async def _stop_unhealthy(self, c: ContainerInfo, st: ReplicaState) -> None:
        async with self._limit:
            try:
                await self._engine(self.runtime.stop, c.id, self.node_id, self.cfg.stop_timeout)
            except (NotFound, RuntimeError) as exc:
                if isinstance(exc, EngineUnavailable):
                    raise
                log.warning("replica.stop_failed", app=c.app, replica=c.replica, error=str(exc))

    # -- health --------------------------------------------------------------------------

    async def _probe_health(self, desired: dict[ReplicaKey, AppSpec], now: float) -> None:
        assert self._session is not None
        targets = []
        for c in self.observed.containers:
            spec = desired.get((c.app, c.replica))
            if spec is None or c.release != spec.revision or not c.running or not spec.health:
                continue
            if c.host_port is None:
                continue
            targets.append((c, spec))
        if not targets:
            return
        host = local_dial_host(self.publish_host)
        timeout = self.cfg.health_timeout
        results = await asyncio.gather(
            *(probe(self._session, host, c.host_port or 0, spec.health or "/", timeout) for c, spec in targets)
        )
        stops = []
        for (c, spec), ok in zip(targets, results, strict=True):
            st = self._state((c.app, c.replica))
            if ok:
                if not st.healthy:
                    log.info("replica.healthy", app=c.app, replica=c.replica, container=c.id[:12])
                st.healthy, st.health_failures = True, 0
                continue
            st.health_failures += 1
            in_grace = not st.healthy and now - st.running_since < self.cfg.health_grace
            if st.health_failures >= self.cfg.health_failures and not in_grace:
                st.healthy = False
                st.last_error = st.stop_reason = f"health check {spec.health} failed {st.health_failures} times"
                log.warning("replica.unhealthy", app=c.app, replica=c.replica, container=c.id[:12], path=spec.health)
                st.health_failures = 0
                stops.append(self._stop_unhealthy(c, st))
        if stops:
            await asyncio.gather(*stops)


@dataclass(frozen=True)
class InstanceStatus:
    replica: int
    container: str
    release: int
    state: str
    healthy: bool
    host_port: int | None
    restarts: int
    last_exit_code: int | None
    backoff_s: float
    error: str
    node: str = ""  # the node that runs it
    # Where other nodes' proxies dial it (HOST:PORT), and whether it takes traffic now: what
    # the routing mesh reads from the ``route`` records.
    address: str = ""
    serving: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, raw: dict[str, Any], node: str) -> InstanceStatus:
        return cls(int(raw["replica"]), str(raw["container"]), int(raw["release"]), str(raw["state"]),
                   bool(raw["healthy"]), raw.get("host_port"), int(raw.get("restarts", 0)),
                   raw.get("last_exit_code"), float(raw.get("backoff_s", 0.0)), str(raw.get("error", "")), node,
                   str(raw.get("address", "")), bool(raw.get("serving", False)))


@dataclass(frozen=True)
class AppStatus:
    """An app as this node sees it: the spec, the desired count and its own replicas."""

    spec: AppSpec
    replicas: int
    running: int
    healthy: int
    state: str  # running | starting | degraded | stopped | image_missing | crashloop | engine_unreachable
    message: str
    instances: list[InstanceStatus]
    # Set when this release is a rollback: {"from": revision, "to": revision, "reason": why}.
    rollback: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "image": self.spec.image,
            "revision": self.spec.revision,
            "port": self.spec.port,
            "env": self.spec.env,
            "health": self.spec.health,
            "host": self.spec.host,
            "https": self.spec.https or "on",
            "rollback": self.rollback,
            "replicas": self.replicas,
            "running": self.running,
            "healthy": self.healthy,
            "state": self.state,
            "message": self.message,
            "instances": [i.to_json() for i in self.instances],
        }


def app_status(rec: AppReconciler, spec: AppSpec, replicas: int, remote: bool = True) -> AppStatus:
    """Summarise an app: this node's replicas as last observed, and (``remote``) the other
    live nodes' replicas as their ``route`` records last said."""
    now = time.monotonic()
    instances = []
    for c in sorted(rec.observed.by_app.get(spec.name, []), key=lambda c: (c.replica, c.release)):
        st = rec.replicas.get((c.app, c.replica))
        current = c.release == spec.revision
        instances.append(
            InstanceStatus(
                replica=c.replica,
                container=c.id[:12],
                release=c.release,
                state=c.state,
                healthy=bool(current and st and st.healthy and c.running),
                host_port=c.host_port,
                restarts=st.restarts if st else 0,
                last_exit_code=st.last_exit_code if st else None,
                backoff_s=round(max(0.0, st.backoff.next_attempt - now), 1) if st and not c.running else 0.0,
                error=st.last_error if st else "",
                node=rec.node_id,
                address=mesh_address(c.host_ip, c.host_port, rec.advertise_host) if c.host_port else "",
                serving=rec.serving(c),
            )
        )
    if remote:
        instances += rec.remote_instances(spec.name)
    instances.sort(key=lambda i: (i.replica, i.release, i.node))
    wanted = [i for i in instances if i.release == spec.revision and i.replica < replicas]
    # Distinct replicas: while a replica moves between nodes both copies may be seen.
    running = len({i.replica for i in wanted if i.state == "running"})
    healthy = len({i.replica for i in wanted if i.healthy})
    crashing = [i for i in wanted if i.state != "running" and i.restarts + (i.last_exit_code is not None) > 0]
    if not rec.observed.engine_ok:
        state, message = "engine_unreachable", rec.observed.engine_error
    elif rec.image_missing(spec.image) and healthy < replicas:
        state = "image_missing"
        message = f"image {spec.image!r} is not present on this node; the app starts once it is"
    elif replicas == 0:
        state, message = "stopped", "scaled to 0"
    elif crashing and healthy < replicas:
        worst = max(crashing, key=lambda i: i.restarts)
        state = "crashloop"
        message = (
            f"replica {worst.replica} {worst.error or 'crashed'}; "
            f"restarted {worst.restarts} times, next try in {worst.backoff_s}s"
        )
    elif healthy >= replicas:
        state, message = "running", ""
    elif healthy > 0:
        state, message = "degraded", f"{healthy} of {replicas} replicas healthy"
    else:
        state, message = "starting", f"0 of {replicas} replicas healthy"
    rollback = None
    release = rec.apps.release(spec.name, spec.revision)
    if release and "rollback_of" in release:
        rollback = {"from": release.get("rolled_back_from"), "to": release["rollback_of"],
                    "reason": release.get("reason", "by hand")}
        if state == "running":
            message = f"rolled back from revision {rollback['from']}: {rollback['reason']}"
    return AppStatus(spec, replicas, running, healthy, state, message, instances, rollback)
