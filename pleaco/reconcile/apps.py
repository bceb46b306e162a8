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
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import aiohttp

from pleaco import logs
from pleaco.apps import AppSpec, AppStore, format_memory
from pleaco.constraints import eligible
from pleaco.metrics import Counter, Gauge, Registry
from pleaco.placement import Demand, plan
from pleaco.reconcile.backoff import Backoff
from pleaco.reconcile.config import ReconcileSettings
from pleaco.reconcile.container import release_container
from pleaco.reconcile.loop import Loop
from pleaco.reconcile.provision import NotProvisioned, Provisioner
from pleaco.reconcile.routes import RouteTable
from pleaco.reconcile.status import local_instances
from pleaco.reconcile.view import ImageState, NodeView, Observation, ReplicaKey, ReplicaState
from pleaco.runtime import Conflict, ContainerInfo, EngineUnavailable, NotFound
from pleaco.runtime.docker import container_name
from pleaco.runtime.engine import Engine
from pleaco.runtime.health import Probe, probe

log = logs.get("pleaco.reconcile.apps")

# A replica's exit code when it was killed by SIGKILL (tini, its PID 1, exits 128 + 9).
SIGKILL_EXIT_CODE = 137


class AppReconciler(Loop):
    name = "apps"

    def __init__(
        self,
        cfg: ReconcileSettings,
        view: NodeView,
        routes: RouteTable,
        runtime: Engine,
        registry: Registry,
        live_nodes: Callable[[], Sequence[str]] | None = None,
        weights: Callable[[], dict[str, float]] | None = None,
        memory: Callable[[], dict[str, int]] | None = None,
        fetch_image: Callable[[str], Awaitable[bool]] | None = None,
        probe: Probe = probe,
        secrets: Provisioner | None = None,
        labels: Callable[[], dict[str, dict[str, str]]] | None = None,
        pins: Callable[[AppSpec, Sequence[str]], tuple[frozenset[str] | None, str]] | None = None,
    ) -> None:
        super().__init__()
        # Where an app's replicas may run, and why nowhere: the node holding its volumes
        # (pleaco.stacks.volumes). None: anywhere.
        self.pins = pins
        # What each replica gets at its start beside its spec: the app's secrets
        # (pleaco.stacks.secrets). None: nothing.
        self.secrets = secrets
        # Each node's labels, for the apps' placement constraints; none when not given.
        self.labels = labels or dict
        self.cfg = cfg
        self.interval = cfg.reconcile_interval
        # Coalesce a burst of wake-ups (50 finished starts) into one pass (wants_settle).
        self.settle = 0.05
        self.view = view
        self.routes = routes
        self.node_id = view.node_id
        self.apps: AppStore = view.apps
        self.runtime = runtime
        # The replicas' HTTP health probe; unit tests answer it from the engine's twin.
        self.probe = probe
        self.live_nodes = live_nodes or (lambda: [self.node_id])
        # Placement weight per node (its capacity); equal when not given.
        self.weights = weights or dict
        # Each node's memory in bytes, which the replicas' memory limits placed on it may
        # add up to; a node missing is not limited (nor is any when not given).
        self.memory = memory or dict
        # Gets a missing image from another node (pleaco.builds.transfer); None: no cluster.
        self.fetch_image = fetch_image
        self._next_fetch: dict[str, float] = {}
        self._limit = asyncio.Semaphore(cfg.start_concurrency)
        # Actions run as tasks that outlive the pass that decided them, so a pass never
        # waits for 50 container starts: the view stays fresh, and a scale to 0 during a
        # scale to 50 acts at once. Keyed by what they act on, so no pass doubles one up.
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._busy_when_observed: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
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
                collect=lambda: {(): 1.0 if self.view.observed.engine_ok else 0.0},
            )
        )

    def _containers_by_state(self) -> dict[tuple[str, ...], float]:
        counts: dict[tuple[str, ...], float] = {}
        for c in self.view.observed.containers:
            counts[(c.state,)] = counts.get((c.state,), 0.0) + 1
        return counts

    # -- loop ----------------------------------------------------------------------------

    async def setup(self) -> None:
        self._session = aiohttp.ClientSession()
        if self.secrets is not None:  # secret files of containers removed while the agent was down
            names = {c.name for c in await self.blocking(self.runtime.list_managed, self.node_id)}
            await self.blocking(self.secrets.sweep, names)

    async def teardown(self) -> None:
        await self.wait_actions(cancel=True)
        if self._session is not None:
            await self._session.close()

    def wants_settle(self) -> bool:
        # Nothing in flight (a new release was written): no burst to wait for, pass at once.
        return bool(self._inflight)

    def _spawn(self, key: str, action: Coroutine[Any, Any, None]) -> bool:
        """Run ``action`` in the background unless one is already running for ``key``, or ran
        while this pass looked at the engine (then the pass's view of it may be stale: a
        container seen "created" just before its start finished would be started again)."""
        if key in self._inflight or key in self._busy_when_observed:
            action.close()
            return False

        def done(_: asyncio.Task[None]) -> None:
            self._inflight.pop(key, None)
            self.wake()

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

    async def wait_actions(self, cancel: bool = False) -> None:
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

    async def step(self) -> str | None:
        """One pass. The engine being down is a result, not an error: it is reported in
        ``apps show`` and the pass is tried again at the next interval."""
        try:
            await self._pass()
        except EngineUnavailable as exc:
            obs = self.view.observed
            if obs.engine_ok or obs.at == 0.0:
                log.warning("engine.unreachable", error=str(exc))
            self.view.observed = Observation(engine_ok=False, engine_error=str(exc), at=time.time())
            return "engine_unreachable"
        return None

    async def _pass(self) -> None:
        self._busy_when_observed = set(self._inflight)
        containers: list[ContainerInfo] = await self.blocking(self.runtime.list_managed, self.node_id)
        view = self.view
        if not view.observed.engine_ok:
            log.info("engine.reachable")
        view.observed = Observation(engine_ok=True, engine_error="", containers=containers, at=time.time())
        now = time.monotonic()

        desired: dict[ReplicaKey, AppSpec] = {}
        nodes = list(self.live_nodes())
        if not nodes:
            # The cluster layer does not know yet where replicas belong (this node is
            # still joining): observe, but neither start nor remove anything.
            return
        # The apps that want replicas, and those this node has containers of (to replace or
        # remove them): a pass costs what runs here, not every app there is.
        specs = {spec.name: spec for spec in self.apps.wanted_specs()}
        for name in {c.app for c in containers} - set(specs):
            if (other := self.apps.get(name)) is not None:
                specs[name] = other
        # Every node plans every app alike (pleaco.placement.plan) and runs its own part.
        labels = self.labels()
        pins = {s.name: self.pins(s, nodes) for s in specs.values() if s.volumes and self.pins is not None}
        placed = plan([Demand(s.name, self.apps.replicas(s.name), s.memory, s.placement_constraints(),
                              pins[s.name][0] if s.name in pins else None)
                       for s in specs.values()], nodes, self.weights(), self.memory(), labels)
        view.volume_waits = {name: why for name, (_, why) in pins.items() if why}
        view.unplaced = {}
        view.unschedulable = {
            s.name: f"no live node meets {' and '.join(s.constraints)}" for s in specs.values()
            if s.constraints and not eligible(s.placement_constraints(), nodes, labels)}
        for spec in specs.values():
            for idx, node in enumerate(placed[spec.name]):
                if node == self.node_id:
                    desired[(spec.name, idx)] = spec
                elif node is None:
                    view.unplaced[spec.name] = view.unplaced.get(spec.name, 0) + 1

        by_replica: dict[ReplicaKey, list[ContainerInfo]] = {}
        for c in containers:
            by_replica.setdefault((c.app, c.replica), []).append(c)

        removals: list[tuple[ContainerInfo, str]] = []
        crashed: list[tuple[ContainerInfo, ReplicaState, AppSpec]] = []
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
                view.drain.cancel(keep)  # if it was being drained: wanted again, it serves again
                # A start of this replica in flight while the engine was listed: the listing
                # may predate it (an exit already counted would be counted again).
                stale = _run_key(*key) in self._busy_when_observed
                if self._observe_replica(key, keep, state, now, spec, stale):
                    crashed.append((keep, state, spec))
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

        # A wanted replica without any container (its old one was stopped first, and its
        # replacement is not made yet) is as unavailable as one whose replacement is not
        # serving yet: else each pass would stop another old one.
        for key, spec in desired.items():
            if key not in by_replica:
                unavailable[spec.name] = unavailable.get(spec.name, 0) + 1

        # Old release only: start the replacement within the surge budget; beyond it, stop
        # the old one first within the unavailable budget; else wait for a later pass.
        rollout = self.cfg.rollout
        for spec, idx, old in replace:
            # An app with volumes rolls stop-first, a replica at a time (Swarm's default
            # order): a database's new process must not open the data its old one holds.
            surge, down = (0, max(1, rollout.max_unavailable)) if spec.volumes else (
                rollout.max_surge, rollout.max_unavailable)
            if surging.get(spec.name, 0) < surge:
                surging[spec.name] = surging.get(spec.name, 0) + 1
                starts.append((spec, idx))
            elif unavailable.get(spec.name, 0) < down:
                unavailable[spec.name] = unavailable.get(spec.name, 0) + 1
                removals.extend((c, "stopped first to replace it (surge budget spent)") for c in old)

        for key, spec in desired.items():
            if key not in by_replica and self._state(key).backoff.ready(now):
                starts.append((spec, key[1]))

        # Forget replicas that are neither wanted nor present.
        for key in list(view.replicas):
            if key not in desired and key not in by_replica:
                del view.replicas[key]

        await self._explain_exits(crashed)
        await self._probe_health(desired, now)
        drain = view.drain
        removals = [(c, reason) for c, reason in removals if not c.running or drain.may_remove(c, reason, now)]

        # Check images of wanted-but-missing replicas before trying to start them.
        starts = [s for s in starts if await self._image_present(s[0].image, now)]
        if starts and view.cluster_network and not view.network:
            # Replicas run on the node's own network only: the network loop makes it once
            # this node holds a subnet, and wakes this loop.
            log.debug("replicas.waiting_for_network", starts=len(starts))
            starts = []

        self.publish(specs, containers, now)
        view.passes += 1
        # Only when no action ran since the containers were listed: a start that finished
        # meanwhile made a container this pass's list does not hold, and its files stay.
        if self.secrets is not None and not self._inflight and not self._busy_when_observed:
            await self.blocking(self.secrets.sweep, {c.name for c in containers})
        for c, reason in removals:
            self._spawn(f"remove/{c.id}", self._remove(c, reason))
        for spec, idx in starts:
            self._spawn(_run_key(spec.name, idx), self._start(spec, idx))
        for c, spec in restarts:
            self._spawn(_run_key(c.app, c.replica), self._restart(c, spec))

    # -- what other nodes see -------------------------------------------------------------

    def publish(self, specs: dict[str, AppSpec], containers: list[ContainerInfo], now: float) -> None:
        """This node's replicas, as its ``route`` records (one write per app that changed:
        a health change and the serving change it makes are one write), and what it serves
        for the drain: its proxy routes to the same (NodeView.serving)."""
        view = self.view
        present = {c.id for c in containers}
        view.proven &= present
        serving = set()
        for c in containers:
            spec = specs.get(c.app)
            if view.healthy(c, spec):
                view.proven.add(c.id)
            if view.serving(c, spec):
                serving.add(c.id)
        view.drain.observe_serving(serving, present, now)
        apps = {c.app for c in containers}
        self.routes.publish({a: local_instances(view, specs[a]) for a in apps if a in specs}, view.publish_host)

    # -- per-replica bookkeeping -----------------------------------------------------------

    def _state(self, key: ReplicaKey) -> ReplicaState:
        state = self.view.replicas.get(key)
        if state is None:
            state = ReplicaState(Backoff(self.cfg.backoff_base, self.cfg.backoff_max))
            self.view.replicas[key] = state
        return state

    def _observe_replica(self, key: ReplicaKey, c: ContainerInfo, st: ReplicaState, now: float, spec: AppSpec,
                         stale: bool = False) -> bool:
        """Update the replica's state from its container; True when it has just crashed.
        ``stale``: a start of it ran while the engine was listed, so a stopped container in
        the listing may already be running again; it is not taken as a (new) exit."""
        if c.id != st.container_id:
            st.container_id = c.id
            st.healthy = False
            st.health_failures = 0
            st.running_since = now if c.running else 0.0
        if c.running:
            if st.running_since == 0.0:
                st.running_since = now
            if spec.health_cmd is not None:
                self._observe_health_cmd(c, st)
            elif not spec.health:
                st.healthy = True
            if st.backoff.failures and now - st.running_since >= self.cfg.backoff_reset_after:
                st.backoff.reset()
            return False
        if stale:
            return False
        st.healthy = False
        st.running_since = 0.0
        if c.state in ("exited", "dead") and st.crash_seen != c.id + str(st.restarts):
            st.crash_seen = c.id + str(st.restarts)
            st.last_exit_code = c.exit_code
            delay = st.backoff.fail(now)
            crashed = not st.stop_reason  # else pleaco stopped it, and says why
            st.last_error = st.stop_reason or f"exited with code {c.exit_code}"
            st.stop_reason = ""
            log.warning(
                "replica.crashed", app=key[0], replica=key[1], container=c.id[:12],
                exit_code=c.exit_code, failures=st.backoff.failures, backoff_s=round(delay, 1),
            )
            return crashed
        return False

    async def _explain_exits(self, crashed: list[tuple[ContainerInfo, ReplicaState, AppSpec]]) -> None:
        """Ask the engine why replicas that just exited on their own did (one inspect per
        crash, not per pass): one killed for its memory limit says so in ``apps show``,
        rather than crash-looping with only an exit code to go by.

        Docker's ``State.OOMKilled`` is set from the kernel's OOM event, which races the
        exit event: Docker 20.10 here leaves it false for most replicas killed within a
        second of their start (containerd#8180). So a replica with a memory limit that
        exits 137 (SIGKILL through tini) without pleaco having stopped it is reported as
        likely out of memory: nothing else in pleaco sends SIGKILL to a replica."""
        for c, st, spec in crashed:
            if spec.memory is None:
                continue  # without a limit the kernel's OOM killer is the host's business
            try:
                info = await self.blocking(self.runtime.exit_info, c.id)
            except NotFound:
                continue
            limit = format_memory(spec.memory)
            if info.oom_killed:
                st.last_error = f"exited: out of memory (limit {limit})"
            elif info.exit_code == SIGKILL_EXIT_CODE:
                st.last_error = f"exited: killed (exit 137), likely out of memory (limit {limit})"
            else:
                continue
            log.warning("replica.out_of_memory", app=c.app, replica=c.replica, container=c.id[:12],
                        limit=spec.memory, oom_killed=info.oom_killed)

    def _observe_health_cmd(self, c: ContainerInfo, st: ReplicaState) -> None:
        """A command-checked replica is healthy while the engine says so (its retries and
        start period are the engine's: see _probe_health for "unhealthy")."""
        healthy = c.health == "healthy"
        if healthy and not st.healthy:
            log.info("replica.healthy", app=c.app, replica=c.replica, container=c.id[:12])
            self.wake()  # as after a passing probe: the next pass acts on it at once
        st.healthy = healthy

    def _serving(self, c: ContainerInfo, st: ReplicaState, spec: AppSpec) -> bool:
        return c.running and (st.healthy or (not spec.health and spec.health_cmd is None))

    async def _image_present(self, image: str, now: float) -> bool:
        known = self.view.images.get(image)
        if known is not None and (known.present or now - known.checked < self.cfg.image_recheck_interval):
            return known.present
        present: bool = await self.blocking(self.runtime.image_exists, image)
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
        self.view.images[image] = ImageState(present, now)
        return present

    async def _fetch(self, image: str) -> None:
        assert self.fetch_image is not None
        if await self.fetch_image(image):
            self.view.images.pop(image, None)  # look again on the next pass

    # -- actions -------------------------------------------------------------------------

    async def _start(self, spec: AppSpec, replica: int) -> None:
        run = release_container(spec, self.view, replica)
        async with self._limit:
            if not self._still_wanted(spec, replica):
                return
            if self.secrets is not None:
                try:
                    run = await self.blocking(self.secrets.give, spec, run)
                except NotProvisioned as exc:  # the next pass tries again
                    st = self._state((spec.name, replica))
                    st.last_error, st.start_error = str(exc), f"release {spec.revision}: {exc}"
                    log.debug("replica.waiting_for_secret", app=spec.name, replica=replica, reason=str(exc))
                    return
            try:
                cid = await self.blocking(self.runtime.run, run)
            except Conflict:
                # Made by an earlier pass or an earlier life of this agent; the next pass
                # sees it and starts it if it is not running.
                self.m_actions.inc(action="start", result="exists")
                return
            except NotFound as exc:
                self.view.images[spec.image] = ImageState(False, time.monotonic())
                self._state((spec.name, replica)).last_error = str(exc)
                self.m_actions.inc(action="start", result="image_missing")
                log.warning("replica.start_failed", app=spec.name, replica=replica, error=str(exc))
                return
            except RuntimeError as exc:
                if isinstance(exc, EngineUnavailable):
                    raise
                st = self._state((spec.name, replica))
                st.last_error = str(exc)
                st.start_error = f"release {spec.revision}: {exc}"
                st.backoff.fail(time.monotonic())
                self.m_actions.inc(action="start", result="error")
                log.warning("replica.start_failed", app=spec.name, replica=replica, error=str(exc))
                return
        self._state((spec.name, replica)).start_error = ""
        self.m_actions.inc(action="start", result="ok")
        log.info("replica.started", app=spec.name, replica=replica, release=spec.revision, container=cid[:12])

    async def _restart(self, c: ContainerInfo, spec: AppSpec) -> None:
        st = self._state((c.app, c.replica))
        async with self._limit:
            try:
                await self.blocking(self.runtime.start, c.id)
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
                await self.blocking(self.runtime.remove, c.id, self.node_id, self.cfg.stop_timeout)
            except NotFound:
                pass
            except RuntimeError as exc:
                if isinstance(exc, EngineUnavailable):
                    raise
                self.m_actions.inc(action="remove", result="error")
                log.warning("replica.remove_failed", app=c.app, replica=c.replica, error=str(exc))
                return
        if self.secrets is not None:  # its secret files go with it
            await self.blocking(self.secrets.remove_files, c.name)
        self.m_actions.inc(action="remove", result="ok")
        log.info(
            "replica.removed", app=c.app, replica=c.replica, release=c.release, container=c.id[:12], reason=reason
        )

    async def _stop_unhealthy(self, c: ContainerInfo, st: ReplicaState) -> None:
        async with self._limit:
            try:
                await self.blocking(self.runtime.stop, c.id, self.node_id, self.cfg.stop_timeout)
            except (NotFound, RuntimeError) as exc:
                if isinstance(exc, EngineUnavailable):
                    raise
                log.warning("replica.stop_failed", app=c.app, replica=c.replica, error=str(exc))

    # -- health --------------------------------------------------------------------------

    async def _probe_health(self, desired: dict[ReplicaKey, AppSpec], now: float) -> None:
        assert self._session is not None
        targets = []
        stops = []
        for c in self.view.observed.containers:
            spec = desired.get((c.app, c.replica))
            if spec is None or c.release != spec.revision or not c.running:
                continue
            if spec.health_cmd is not None:
                # The engine ran the command and counted its retries (after its start
                # period): "unhealthy" is final, and the replica is stopped as one failing
                # its HTTP probe is (the next pass starts another, with backoff).
                st = self._state((c.app, c.replica))
                if c.health == "unhealthy" and not st.stop_reason:
                    st.healthy = False
                    st.last_error = st.stop_reason = (f"health command {spec.health_cmd.describe()!r} failed "
                                                      f"{spec.health_cmd.retries} times")
                    log.warning("replica.unhealthy", app=c.app, replica=c.replica, container=c.id[:12],
                                command=spec.health_cmd.describe())
                    stops.append(self._stop_unhealthy(c, st))
                continue
            if not spec.health:
                continue
            target = self.view.probe_target(c, spec)
            if target is None:
                continue
            targets.append((c, spec, target))
        timeout = self.cfg.health_timeout
        results = await asyncio.gather(
            *(self.probe(self._session, host, port, spec.health or "/", timeout) for _, spec, (host, port) in targets)
        ) if targets else []
        for (c, spec, _), ok in zip(targets, results, strict=True):
            st = self._state((c.app, c.replica))
            if ok:
                if not st.healthy:
                    log.info("replica.healthy", app=c.app, replica=c.replica, container=c.id[:12])
                    # This pass decided its actions before the probe: the next one, at once,
                    # acts on it (an old release's replica replaced is drained now, not a
                    # reconcile interval later).
                    self.wake()
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


def _run_key(app: str, replica: int) -> str:
    """The background action key of a replica's start or restart (one at a time each)."""
    return f"run/{app}/{replica}"
