"""The tick/claim rule of scheduled jobs (pleaco/stacks/schedule.py): who claims a tick,
which unfinished runs are orphans, and schedules' input checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from pleaco.apps import AppSpec, AppStore
from pleaco.cron import CronError
from pleaco.identity import Identity
from pleaco.placement import Owners
from pleaco.stacks.config import JobsConfig
from pleaco.stacks.jobs import Job, JobInputError
from pleaco.stacks.schedule import Run, RunLogs, Scheduler, decide_claim, is_orphan, parse_schedule
from pleaco.store import Store


def test_only_the_owner_claims_a_matching_tick_without_a_record() -> None:
    assert decide_claim(None, starts=True, matches=True)
    assert not decide_claim(None, starts=False, matches=True)
    assert not decide_claim(None, starts=True, matches=False)
    # A tick with a record, whatever its state (a runner that died), is never started again.
    for state in ("claimed", "running", "failed", "succeeded"):
        assert not decide_claim({"node": "a", "state": state}, starts=True, matches=True)


def run(node: str, state: str) -> Run:
    return Run("web", "backup", 7, node, state)


def test_orphans() -> None:
    live = ["me", "b"]
    assert is_orphan(run("gone", "running"), "me", live, False) == "node gone running it is gone"
    assert is_orphan(run("gone", "claimed"), "me", live, False) is not None
    assert is_orphan(run("b", "running"), "me", live, False) is None  # alive: it may finish
    assert is_orphan(run("me", "running"), "me", live, True) is None  # this node runs it now
    assert is_orphan(run("me", "running"), "me", live, False) == "the agent running it restarted"
    assert is_orphan(run("gone", "succeeded"), "me", live, False) is None
    assert is_orphan(run("gone", "failed"), "me", live, False) is None


def test_schedule_input() -> None:
    s = parse_schedule("web", "backup", {"cron": "*/5 * * * *", "command": ["sh", "-c", "echo"]})
    assert s.to_value() == {"cron": "*/5 * * * *", "command": ["sh", "-c", "echo"], "source": "api"}
    with pytest.raises(CronError, match="hour"):
        parse_schedule("web", "backup", {"cron": "0 25 * * *", "command": ["true"]})
    with pytest.raises(JobInputError, match="job name"):
        parse_schedule("web", "Back_up", {"cron": "* * * * *", "command": ["true"]})
    with pytest.raises(JobInputError, match="command"):
        parse_schedule("web", "backup", {"cron": "* * * * *", "command": []})
    with pytest.raises(JobInputError, match="body"):
        parse_schedule("web", "backup", {"cron": "* * * * *"})


# -- the scheduler loop on real stores (SQLite), with the job containers faked -------------

class FakeRuntime:
    def image_exists(self, ref: str) -> bool:
        return True


class FakeJobs:
    """What the scheduler asks of OneOffJobs; records which commands started."""

    def __init__(self) -> None:
        self.runtime = FakeRuntime()
        self.started: list[tuple[str, ...]] = []
        self.holder: str | None = None  # the live node holding the app's volumes

    def volume_holder(self, spec: AppSpec) -> str | None:
        return self.holder

    def start(self, app: str, body: dict[str, Any]) -> Job:
        self.started.append(tuple(body["command"]))
        return Job(str(len(self.started)), app, 1, "c" * 64, "name")

    def output(self, job: Job) -> Iterator[bytes]:
        return iter([b"ran\n"])

    def wait(self, job: Job) -> int:
        return 0

    def remove(self, job: Job, why: str) -> None:
        pass


TICK = 29_000_000  # a minute since the epoch: "* * * * *" matches it
CFG = JobsConfig(tick_seconds=60, claim_settle=0.05)


IDENTITIES = {"a": Identity.generate(), "b": Identity.generate()}


def node(tmp_path: Path, name: str, live: list[str]) -> tuple[Scheduler, FakeJobs, Store]:
    identity = IDENTITIES[name]
    store = Store(tmp_path / f"{name}.db", identity)
    store.put("node", identity.node_id, {"public_key": identity.public_key.hex(), "name": name})
    apps = AppStore(store, 10)
    jobs = FakeJobs()
    me = identity.node_id
    live.append(me)
    scheduler = Scheduler(CFG, me, store, apps, Owners(me, lambda: [me]), lambda: live, cast(Any, jobs),
                          RunLogs(tmp_path / name, 4096), clock=lambda: TICK * 60 + 1.0)
    return scheduler, jobs, store


def exchange(a: Store, b: Store) -> None:
    """Anti-entropy by hand: every record of each to the other (LWW merge), node records
    (the keys that verify the rest) first."""
    for src, dst in ((a, b), (b, a)):
        for rec in sorted(src.all(), key=lambda r: r.kind != "node"):
            dst.apply(rec)


async def claimed(s: Scheduler) -> None:
    """Until ``s`` has written its claim of TICK to its own store (its claim task's first
    step), with a deadline."""
    deadline = time.monotonic() + 10
    while s.schedules.run("web", "tick", TICK) is None:
        assert time.monotonic() < deadline, f"{s.me} wrote no claim of the tick"
        await asyncio.sleep(0.001)


async def settle(*schedulers: Scheduler) -> None:
    for s in schedulers:
        if s.active:
            await asyncio.gather(*s.active.values())


def test_two_claimers_of_one_tick_run_it_once(tmp_path: Path) -> None:
    live: list[str] = []
    (a, a_jobs, a_store), (b, b_jobs, b_store) = node(tmp_path, "a", live), node(tmp_path, "b", live)
    try:
        a.apps.deploy("web", {"image": "img", "replicas": 0})
        a.schedules.put(parse_schedule("web", "tick", {"cron": "* * * * *", "command": ["echo"]}))
        exchange(a_store, b_store)

        async def both() -> None:
            # Each believes itself the owner; each claims before seeing the other's claim.
            await a.step()
            await claimed(a)
            await b.step()
            await claimed(b)
            exchange(a_store, b_store)  # within claim_settle: the store keeps one claim
            await settle(a, b)

        asyncio.run(both())
        exchange(a_store, b_store)
        assert len(a_jobs.started) + len(b_jobs.started) == 1
        kept = a.schedules.run("web", "tick", TICK)
        assert kept is not None and kept.state == "succeeded"
        winner = a if a_jobs.started else b
        assert kept.node == winner.me
        assert (tmp_path / ("a" if winner is a else "b") / "job-logs/web/tick" / f"{TICK}.log").read_bytes() == b"ran\n"
        # A later step of either does not start the tick again.
        asyncio.run(a.step())
        asyncio.run(b.step())
        assert len(a_jobs.started) + len(b_jobs.started) == 1
    finally:
        a_store.close()
        b_store.close()


def test_the_node_holding_the_apps_volumes_starts_its_runs_not_its_owner(tmp_path: Path) -> None:
    live: list[str] = []
    (a, a_jobs, a_store), (b, b_jobs, b_store) = node(tmp_path, "a", live), node(tmp_path, "b", live)
    try:
        a.apps.deploy("web", {"image": "img", "replicas": 0})
        a.schedules.put(parse_schedule("web", "tick", {"cron": "* * * * *", "command": ["echo"]}))
        exchange(a_store, b_store)
        a_jobs.holder = b_jobs.holder = b.me  # both believe themselves the owner; b holds the volumes

        async def both() -> None:
            await a.step()
            await b.step()
            await settle(a, b)

        asyncio.run(both())
        assert (a_jobs.started, b_jobs.started) == ([], [("echo",)])
        kept = b.schedules.run("web", "tick", TICK)
        assert kept is not None and kept.node == b.me and kept.state == "succeeded"
    finally:
        a_store.close()
        b_store.close()


def test_an_orphaned_run_is_marked_failed_not_rerun(tmp_path: Path) -> None:
    live: list[str] = []
    a, jobs, store = node(tmp_path, "a", live)
    try:
        a.apps.deploy("web", {"image": "img", "replicas": 0})
        a.schedules.put(parse_schedule("web", "tick", {"cron": "* * * * *", "command": ["echo"]}))
        a.schedules.write_run(Run("web", "tick", TICK, "f" * 32, "running"))  # its node is gone
        a.schedules.write_run(Run("web", "tick", TICK - 1, a.me, "running"))  # this node's, before a restart
        asyncio.run(a.step())
        assert jobs.started == []
        gone, mine = a.schedules.run("web", "tick", TICK), a.schedules.run("web", "tick", TICK - 1)
        assert gone is not None and gone.state == "failed" and "is gone" in gone.reason
        assert mine is not None and mine.state == "failed" and "restarted" in mine.reason
    finally:
        store.close()


def test_removing_an_app_removes_its_schedules_and_runs(tmp_path: Path) -> None:
    live: list[str] = []
    a, _, store = node(tmp_path, "a", live)
    try:
        for app in ("web", "web2"):
            a.apps.deploy(app, {"image": "img", "replicas": 0})
            a.schedules.put(parse_schedule(app, "tick", {"cron": "* * * * *", "command": ["echo"]}))
            a.schedules.write_run(Run(app, "tick", TICK, a.me, "succeeded", exit_code=0))
        a.apps.remove("web")
        assert [(s.app, s.name) for s in a.schedules.schedules()] == [("web2", "tick")]
        assert [r.app for r in a.schedules.runs()] == ["web2"]
    finally:
        store.close()
