"""Scheduled jobs: a command of an app's current release run on a cron schedule, once per
tick across the cluster.

Records (kind ``job``):

- ``APP/schedule/NAME``: ``{"cron", "command", "source"}`` (``source``: ``api`` for
  ``jobs schedule``, ``manifest`` for the repository's ``[jobs]``, which a release replaces,
  ``stack`` for a compose service's ``x-pleaco-jobs``, which a stack deploy replaces);
- ``APP/run/NAME/TICK``: one run: ``{"node", "state", "exit_code", "started_ms",
  "ended_ms", "reason"}``, state ``claimed`` -> ``running`` -> ``succeeded`` | ``failed``.

Once per tick: only the app's owner (pleaco.placement.Owners) starts a tick's run (for an
app with volumes, the live node holding them instead: a run mounts them, as the app's
replicas do, pleaco.stacks.jobs), and it writes the run record, the claim, BEFORE starting
anything, and only when the tick has no record yet. A second node that believed itself
owner at the same moment (the live nodes changing) writes a claim too; the store keeps one
of the two (last writer wins by HLC, the same on every node), and each claimer waits
``claim_settle`` and runs only if the kept claim is its own. A tick whose record exists is
never started again: when its runner dies mid-run, the new owner marks the run failed (its
node is gone), and an agent that restarts marks its own unfinished runs failed (the
start's sweep removed their containers); neither re-runs it. The limit: two nodes that
disagree on who is alive for longer than ``claim_settle`` (a false death under load) both
run the tick; the store keeps one record, and the other runner logs
``schedule.double_run`` rather than writing over it. Exactly once beyond that would take
consensus, which pleaco does without.

Catch-up: a tick is started only during its own tick (cron's rule too). A tick missed
while no node was alive, or while the owner's death was still being detected, is not
replayed: a late backup at a random hour is worse than the next one on time.

Logs: a run's output is written, bounded (``[jobs] log_bytes``), under
``DATA_DIR/job-logs/`` on the node that ran it, and served by that node only: asked
elsewhere, the API answers 409 naming the node and its API address. Shipping the log
(as build logs are) would copy every run's output across the cluster for the rare look
at it; the record already says where it is.

Time is counted in ticks of ``[jobs] tick_seconds`` (pleaco/cron.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pleaco import cron, errors, logs
from pleaco.apps import DNS_LABEL, AppSpec, AppStore, validate_name
from pleaco.placement import Owners
from pleaco.reconcile.loop import Loop
from pleaco.stacks.config import JobsConfig
from pleaco.stacks.jobs import JobInputError, JobNotFound, OneOffJobs, validate_command
from pleaco.store import Store

log = logs.get("pleaco.stacks.schedule")

KIND = "job"
LOG_DIR = "job-logs"
UNFINISHED = ("claimed", "running")
# A run's reason is cut to this many characters: an engine's error can be long, and a run
# record stays small enough for one gossip packet.
REASON_CHARS = 300


class ScheduleNotFound(errors.NotFound, LookupError):
    pass


class RunElsewhere(errors.Conflict, RuntimeError, code="job_run_elsewhere"):
    """A run's log is on the node that ran it, not this one."""


def schedule_key(app: str, name: str) -> str:
    return f"{app}/schedule/{name}"


def run_key(app: str, name: str, tick: int) -> str:
    return f"{app}/run/{name}/{tick}"


def validate_job_name(name: Any) -> str:
    # As an app's name (a DNS label): safe in keys, paths and URLs.
    if not isinstance(name, str) or not DNS_LABEL.fullmatch(name):
        raise JobInputError(f"job name: {name!r} is not a DNS label (1-63 lower-case letters, digits and '-', "
                            "starting and ending with a letter or digit)")
    return name


@dataclass(frozen=True)
class Schedule:
    app: str
    name: str
    cron: cron.Cron
    command: tuple[str, ...]
    source: str

    def to_value(self) -> dict[str, Any]:
        return {"cron": self.cron.text, "command": list(self.command), "source": self.source}


@dataclass(frozen=True)
class Run:
    app: str
    name: str
    tick: int
    node: str
    state: str
    exit_code: int | None = None
    started_ms: int = 0
    ended_ms: int | None = None
    reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.app}/{self.name}/{self.tick}"

    def to_value(self) -> dict[str, Any]:
        return {"node": self.node, "state": self.state, "exit_code": self.exit_code, "started_ms": self.started_ms,
                "ended_ms": self.ended_ms, "reason": self.reason[:REASON_CHARS]}


def check_job(name: Any, body: Any) -> tuple[str, cron.Cron, tuple[str, ...]]:
    """A job's name, cron and command from ``{"cron": "...", "command": [...]}`` (an API
    body, or a repository's [jobs.NAME] table); JobInputError or CronError naming what is
    wrong."""
    name = validate_job_name(name)
    if not isinstance(body, dict) or set(body) != {"cron", "command"}:
        raise JobInputError('body: expected {"cron": "*/5 * * * *", "command": ["CMD", "ARG", ...]}')
    command = validate_command({"command": body["command"]})
    return name, cron.parse(body["cron"]), command


def parse_schedule(app: str, name: str, body: Any, source: str = "api") -> Schedule:
    """A schedule from an API body ``{"cron": "...", "command": [...]}``."""
    app = validate_name(app)
    return Schedule(app, *check_job(name, body), source)


def decide_claim(existing: dict[str, Any] | None, starts: bool, matches: bool) -> bool:
    """Whether this node claims a tick: it starts the app's runs (its owner, or the node
    holding its volumes), the tick is one of the schedule's, and no node has claimed it (a
    tick with a record is never started again)."""
    return starts and matches and existing is None


def is_orphan(run: Run, me: str, live: Sequence[str], mine_active: bool) -> str | None:
    """Why an unfinished run will never finish (None: it may): its node is gone, or it is
    this node's and this node is not running it (the agent restarted: the sweep removed it)."""
    if run.state not in UNFINISHED:
        return None
    if run.node == me:
        return None if mine_active else "the agent running it restarted"
    if run.node not in live:
        return f"node {run.node[:12]} running it is gone"
    return None


class ScheduleStore:
    """The ``job`` records: schedules and runs."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def schedules(self, app: str | None = None) -> list[Schedule]:
        out = []
        for rec in self.store.records(KIND, prefix=f"{app}/" if app else ""):
            parts = rec.key.split("/", 2)
            if len(parts) != 3 or parts[1] != "schedule" or rec.value is None:
                continue
            try:
                out.append(Schedule(parts[0], parts[2], cron.parse(rec.value["cron"]), tuple(rec.value["command"]),
                                    str(rec.value.get("source", "api"))))
            except (KeyError, TypeError, cron.CronError):
                log.warning("schedule.invalid_record", key=rec.key)
        return sorted(out, key=lambda s: (s.app, s.name))

    def put(self, schedule: Schedule) -> None:
        self.store.put(KIND, schedule_key(schedule.app, schedule.name), schedule.to_value())

    def remove(self, app: str, name: str) -> None:
        """Delete a schedule and its runs' records; ScheduleNotFound when there is none."""
        app, name = validate_name(app), validate_job_name(name)
        if self.store.value(KIND, schedule_key(app, name)) is None:
            raise ScheduleNotFound(f"app {app!r} has no scheduled job {name!r}")
        self.store.delete(KIND, schedule_key(app, name))
        for run in self.runs(app, name):
            self.store.delete(KIND, run_key(app, name, run.tick))

    def replace_from_manifest(self, app: str, jobs: Sequence[tuple[str, cron.Cron, tuple[str, ...]]]) -> None:
        """A release's [jobs] (pleaco/builds/manifest.py) as the app's ``manifest`` schedules."""
        self.replace_from(app, jobs, "manifest")

    def replace_from(self, app: str, jobs: Sequence[tuple[str, cron.Cron, tuple[str, ...]]], source: str) -> None:
        """The app's schedules of ``source`` (``manifest``: a release's [jobs]; ``stack``: its
        service's ``x-pleaco-jobs``, pleaco.stacks.compose) made these: new and changed ones
        written, ones it no longer has removed; other sources' (``api``) stay. Each is
        checked as ``jobs schedule`` checks one first (JobInputError, nothing written)."""
        schedules = [parse_schedule(app, name, {"cron": c.text, "command": list(command)}, source)
                     for name, c, command in jobs]
        wanted = {s.name: s for s in schedules}
        for old in self.schedules(app):
            if old.source == source and old.name not in wanted:
                self.remove(app, old.name)
        for s in schedules:
            if self.store.value(KIND, schedule_key(app, s.name)) != s.to_value():
                self.put(s)

    def runs(self, app: str | None = None, name: str | None = None) -> list[Run]:
        """Runs, newest tick first."""
        out = []
        for rec in self.store.records(KIND, prefix=f"{app}/run/" if app else ""):
            parts = rec.key.split("/")
            if len(parts) != 4 or parts[1] != "run" or rec.value is None or (name and parts[2] != name):
                continue
            v = rec.value
            try:
                out.append(Run(parts[0], parts[2], int(parts[3]), str(v["node"]), str(v["state"]),
                               v.get("exit_code"), int(v.get("started_ms") or 0), v.get("ended_ms"),
                               str(v.get("reason", ""))))
            except (KeyError, TypeError, ValueError):
                log.warning("schedule.invalid_run", key=rec.key)
        return sorted(out, key=lambda r: (-r.tick, r.app, r.name))

    def run(self, app: str, name: str, tick: int) -> Run | None:
        return next((r for r in self.runs(app, name) if r.tick == tick), None)

    def write_run(self, run: Run) -> None:
        self.store.put(KIND, run_key(run.app, run.name, run.tick), run.to_value())


class RunLogs:
    """Runs' output on the node that ran them, each cut at ``limit`` bytes."""

    def __init__(self, data_dir: Path, limit: int) -> None:
        self.dir = data_dir / LOG_DIR
        self.limit = limit

    def path(self, app: str, name: str, tick: int) -> Path:
        return self.dir / app / name / f"{tick}.log"

    def write(self, app: str, name: str, tick: int, chunks: Iterator[bytes]) -> None:
        path = self.path(app, name, tick)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = 0
        with open(path, "wb") as f:
            for chunk in chunks:
                room = self.limit - kept
                if room > 0:
                    f.write(chunk[:room])
                    f.flush()
                    kept += min(room, len(chunk))
                    if len(chunk) > room:
                        f.write(f"\n[pleaco: output cut at {self.limit} bytes]\n".encode())
                        f.flush()

    def read(self, app: str, name: str, tick: int) -> bytes | None:
        try:
            return self.path(app, name, tick).read_bytes()
        except FileNotFoundError:
            return None

    def prune(self, keep: set[tuple[str, str, int]]) -> int:
        """Remove the logs of runs whose record is gone."""
        removed = 0
        for path in self.dir.glob("*/*/*.log"):
            with contextlib.suppress(ValueError):
                key = (path.parent.parent.name, path.parent.name, int(path.stem))
                if key not in keep:
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed


class Scheduler(Loop):
    """Starts the ticks of the schedules of the apps this node owns; marks failed the runs
    that will never finish; keeps each schedule's last ``history`` runs."""

    name = "schedule"

    def __init__(self, cfg: JobsConfig, me: str, store: Store, apps: AppStore, owners: Owners,
                 live_nodes: Callable[[], Sequence[str]], jobs: OneOffJobs, logs_: RunLogs,
                 fetch_image: Callable[[str], Awaitable[bool]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.cfg = cfg
        # Four looks per tick: a tick's run starts within a quarter tick (1 s at most).
        self.interval = min(1.0, cfg.tick_seconds / 4)
        self.me = me
        self.schedules = ScheduleStore(store)
        self.apps = apps
        self.owners = owners
        self.live_nodes = live_nodes
        self.jobs = jobs
        self.run_logs = logs_
        self.fetch_image = fetch_image
        self.clock = clock
        self.active: dict[tuple[str, str, int], asyncio.Task[None]] = {}
        self._next_prune = 0.0

    def tick_now(self) -> int:
        return int(self.clock() // self.cfg.tick_seconds)

    async def step(self) -> str | None:
        tick = self.tick_now()
        live = list(self.live_nodes())
        runs = self.schedules.runs()
        for run in runs:
            why = is_orphan(run, self.me, live, (run.app, run.name, run.tick) in self.active)
            if why and (run.node == self.me or self.owners.owns(run.app)):
                self.schedules.write_run(replace(run, state="failed", reason=why,
                                                 ended_ms=int(self.clock() * 1000)))
                log.warning("schedule.run_orphaned", app=run.app, job=run.name, tick=run.tick, node=run.node,
                            reason=why)
        for s in self.schedules.schedules():
            spec = self.apps.get(s.app)
            if spec is None:
                continue  # the app was removed (or has not arrived yet)
            key = (s.app, s.name, tick)
            if key in self.active:
                continue
            existing = self.schedules.store.value(KIND, run_key(*key))
            if decide_claim(existing, self._starts_runs(spec), s.cron.matches(tick)):
                self.active[key] = asyncio.create_task(self._claim_and_run(s, tick), name=f"job {run_key(*key)}")
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + 10 * self.interval
            self._prune(runs)
        return None

    def _starts_runs(self, spec: AppSpec) -> bool:
        """Whether this node starts the app's runs: the live node holding its volumes (a run
        mounts them, as a replica does), else the app's owner. For volumes on a node that is
        down, the owner's run is refused and recorded failed, naming that node."""
        holder = self.jobs.volume_holder(spec)
        return holder == self.me if holder is not None else self.owners.owns(spec.name)

    async def teardown(self) -> None:
        for task in self.active.values():
            task.cancel()
        self.active.clear()

    def _prune(self, runs: list[Run]) -> None:
        by_schedule: dict[tuple[str, str], list[Run]] = {}
        for run in runs:
            by_schedule.setdefault((run.app, run.name), []).append(run)
        for (app, name), rs in by_schedule.items():
            if not self.owners.owns(app):
                continue
            finished = [r for r in rs if r.state not in UNFINISHED]  # newest first
            for old in finished[self.cfg.history:]:
                self.schedules.store.delete(KIND, run_key(app, name, old.tick))
        kept = {(r.app, r.name, r.tick) for r in self.schedules.runs()}
        self.run_logs.prune(kept | set(self.active))

    async def _claim_and_run(self, s: Schedule, tick: int) -> None:
        key = (s.app, s.name, tick)
        try:
            claim = Run(s.app, s.name, tick, self.me, "claimed", started_ms=int(self.clock() * 1000))
            self.schedules.write_run(claim)
            await asyncio.sleep(self.cfg.claim_settle)
            kept = self.schedules.run(s.app, s.name, tick)
            if kept is None or kept.node != self.me:
                log.info("schedule.claim_lost", app=s.app, job=s.name, tick=tick,
                         winner=kept.node if kept else None)
                return
            await self._run(s, claim)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.error("schedule.run_error", exc_info=True, app=s.app, job=s.name, tick=tick)
        finally:
            self.active.pop(key, None)

    async def _run(self, s: Schedule, claim: Run) -> None:
        spec = self.apps.get(s.app)
        if spec is not None and self.fetch_image is not None and not await self.blocking(
                self.jobs.runtime.image_exists, spec.image):
            await self.fetch_image(spec.image)  # the owner may run no replica of the app
        try:
            job = await self.blocking(self.jobs.start, s.app, {"command": list(s.command)})
        except (errors.PleacoError, JobNotFound) as exc:
            self._finish(claim, None, f"not started: {exc}")
            return
        self._write_own(replace(claim, state="running"))
        log.info("schedule.run_started", app=s.app, job=s.name, tick=claim.tick, container=job.container_id[:12])
        try:
            await self.blocking(self.run_logs.write, s.app, s.name, claim.tick, self.jobs.output(job))
            code = await self.blocking(self.jobs.wait, job)
            self._finish(claim, code, "")
        except errors.PleacoError as exc:
            self._finish(claim, None, f"lost: {exc}")
        finally:
            await asyncio.shield(self.blocking(self.jobs.remove, job, "scheduled run ended"))

    def _finish(self, claim: Run, code: int | None, reason: str) -> None:
        state = "succeeded" if code == 0 else "failed"
        self._write_own(replace(claim, state=state, exit_code=code, reason=reason,
                                ended_ms=int(self.clock() * 1000)))
        log.info("schedule.run_ended", app=claim.app, job=claim.name, tick=claim.tick, state=state, exit_code=code,
                 reason=reason)

    def _write_own(self, run: Run) -> None:
        """Update this node's run record, unless the store now keeps another node's claim
        of the tick: two nodes that disagreed for longer than ``claim_settle`` on who is
        alive both ran it. The record stays the other's, and the double run is logged."""
        kept = self.schedules.run(run.app, run.name, run.tick)
        if kept is not None and kept.node != self.me:
            log.error("schedule.double_run", app=run.app, job=run.name, tick=run.tick, other=kept.node,
                      reason="another node claimed the same tick (the nodes disagreed on who is alive)")
            return
        self.schedules.write_run(run)

    # -- what the API shows ---------------------------------------------------------------

    def listing(self, app: str | None, limit: int) -> dict[str, Any]:
        """Schedules with their next tick, and each schedule's last ``limit`` runs."""
        tick, t = self.tick_now(), self.cfg.tick_seconds
        schedules = []
        for s in self.schedules.schedules(app):
            nxt = s.cron.next_after(tick)
            schedules.append({"app": s.app, "name": s.name, "cron": s.cron.text, "command": list(s.command),
                              "source": s.source, "next_tick": nxt, "next_at": None if nxt is None else nxt * t,
                              "owner": self.owners.owner(s.app)})
        runs: list[dict[str, Any]] = []
        seen: dict[tuple[str, str], int] = {}
        for r in self.schedules.runs(app):
            n = seen[(r.app, r.name)] = seen.get((r.app, r.name), 0) + 1
            if n > limit:
                continue
            duration = None if r.ended_ms is None or not r.started_ms else (r.ended_ms - r.started_ms) / 1000
            runs.append({"id": r.id, "app": r.app, "name": r.name, "tick": r.tick, "at": r.tick * t, "node": r.node,
                         "state": r.state, "exit_code": r.exit_code, "duration": duration, "reason": r.reason})
        return {"tick_seconds": t, "schedules": schedules, "runs": runs}

    def log_of(self, run_id: str, node_address: Callable[[str], tuple[str, str]]) -> bytes:
        """A run's output, when it ran on this node; RunElsewhere naming its node when not."""
        parts = run_id.split("/")
        if len(parts) != 3 or not parts[2].isdigit():
            raise JobInputError(f"run id: {run_id!r} is not APP/NAME/TICK (as `pleaco jobs ls` shows it)")
        app, name, tick = validate_name(parts[0]), validate_job_name(parts[1]), int(parts[2])
        run = self.schedules.run(app, name, tick)
        if run is None:
            raise ScheduleNotFound(f"no run {run_id!r} (older runs than [jobs] history are deleted)")
        if run.node != self.me:
            node_name, api = node_address(run.node)
            raise RunElsewhere(f"run {run_id} ran on node {node_name} ({run.node[:12]}); its log is there: "
                               f"ask that node's API at {api}")
        text = self.run_logs.read(app, name, tick)
        if text is None:
            raise ScheduleNotFound(f"run {run_id}: no log on this node (it did not start, or it was removed)")
        return text
