"""Scheduled jobs on a real three-node cluster: a schedule runs exactly once per tick
across the cluster (one run record and one container per tick), also when the app's owner
is killed between ticks; runs' logs are served by the node that ran them, and a bad cron
expression is refused naming its field, with nothing written. The runs of an app with a
volume are made on the node that holds it, whichever node owns the app, with the volume
mounted; while that node is down they fail naming it. A repository's [jobs.NAME]
is scheduled by its release (a real build), and unscheduled by a release without it.

Ticks are 2 s here ([jobs] tick_seconds): "* * * * *" runs every 2 s."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agentproc import REPO, AgentProcess, docker_client, form_cluster, wait_for
from conftest import BUSYBOX, HELLO
from gitserver import GitServer
from test_build import BuildEnv, stop_and_clean
from test_volumes import one_running, sh

from pleaco.api.errors import ApiError

ENV = {"PLEACO_JOBS_TICK_SECONDS": "2", "PLEACO_JOBS_CLAIM_SETTLE": "0.3"}


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pleaco", "--api", agent.url, "--token", agent.token, *args],
                          capture_output=True, timeout=60, cwd=REPO)


def runs(agent: AgentProcess, app: str = "cron") -> list[dict[str, Any]]:
    return list(agent.client.request("GET", f"/v1/jobs?app={app}&limit=1000")["runs"])


def containers_created(since: int) -> int:
    """Job containers of the app the engine created since ``since`` (its own event log)."""
    events = docker_client().api.events(since=since, until=int(time.time()) + 1, decode=True,
                                        filters={"type": "container", "event": "create",
                                                 "label": ["pleaco.role=job", "pleaco.job.app=cron"]})
    return sum(1 for _ in events)


def started(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that started a container (not those refused before, e.g. no image)."""
    return [r for r in rs if not r["reason"].startswith("not started")]


def test_a_schedule_runs_once_per_tick_across_owner_death(agent_factory: Callable[..., AgentProcess]) -> None:
    since = int(time.time())
    agents = form_cluster(agent_factory, 3, env=ENV)
    first = agents[0]
    first.client.deploy("cron", {"image": BUSYBOX, "replicas": 0})

    bad = cli(first, "jobs", "schedule", "cron", "tick", "--cron", "* 25 * * *", "--", "true")
    assert bad.returncode == 1 and b"cron hour: 25 is out of range 0-23" in bad.stderr, bad.stderr
    assert first.client.request("GET", "/v1/jobs")["schedules"] == []

    done = cli(first, "jobs", "schedule", "cron", "tick", "--cron", "* * * * *", "--", "sh", "-c", "echo ran-once")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: len([r for r in runs(first) if r["state"] == "succeeded"]) >= 2, 40, "two runs")
    owner_id = first.client.request("GET", "/v1/jobs?app=cron")["schedules"][0]["owner"]
    owner = next(a for a in agents if a.node_id == owner_id)
    assert {r["node"] for r in runs(first)} == {owner_id}, "only the owner runs the schedule"

    # Killed between ticks: right after one of its runs finished.
    last = runs(first)[0]["tick"]
    wait_for(lambda: any(r["tick"] == last and r["state"] == "succeeded" for r in runs(first)), 20, "a run finished")
    owner.kill()
    a, b = [x for x in agents if x is not owner]
    wait_for(lambda: len([r for r in runs(a) if r["tick"] > last and r["state"] == "succeeded"]) >= 2, 40,
             "runs on the new owner")
    # Quiesce: the next tick far away (a virtual 1 January), then wait for every run to end.
    assert cli(a, "jobs", "schedule", "cron", "tick", "--cron", "0 0 1 1 *", "--", "true").returncode == 0
    wait_for(lambda: all(r["state"] in ("succeeded", "failed") for r in runs(a) + runs(b))
             and runs(a) == runs(b), 30, "every run ended, seen alike by both nodes")
    history = runs(a)
    ticks = [r["tick"] for r in history]
    assert len(ticks) == len(set(ticks))
    assert {r["node"] for r in history if r["tick"] > last} <= {a.node_id, b.node_id}
    succeeded = [r for r in history if r["state"] == "succeeded"]
    # One container per run at most: a tick run twice would show two creates for one record.
    created = containers_created(since)
    assert len(succeeded) <= created <= len(started(history)), (created, history)

    # The log is on the node that ran the run; another node names it (409) instead.
    run = next(r for r in succeeded if r["tick"] > last)
    ran = a if run["node"] == a.node_id else b
    other = b if ran is a else a
    shown = cli(ran, "jobs", "logs", run["id"])
    assert shown.returncode == 0 and shown.stdout == b"ran-once\n", shown
    elsewhere = cli(other, "jobs", "logs", run["id"])
    assert elsewhere.returncode == 1
    assert f"ran on node {ran.data_dir.name}".encode() in elsewhere.stderr, elsewhere.stderr
    assert f"{ran.host}:{ran.port}".encode() in elsewhere.stderr
    try:
        other.client.request("GET", f"/v1/jobs/runs/{run['id']}/logs")
        raise AssertionError("expected 409")
    except ApiError as exc:
        assert exc.status == 409 and exc.code == "job_run_elsewhere"

    listed = cli(a, "jobs", "ls", "cron")
    assert listed.returncode == 0 and b"0 0 1 1 *" in listed.stdout and run["id"].encode() in listed.stdout
    assert cli(a, "jobs", "unschedule", "cron", "tick").returncode == 0
    wait_for(lambda: runs(b) == [] and b.client.request("GET", "/v1/jobs")["schedules"] == [], 20,
             "the schedule and its runs removed everywhere")


def test_a_volume_apps_runs_are_made_where_its_volume_is(agents: Callable[..., AgentProcess]) -> None:
    nodes = form_cluster(agents, 2, env=ENV)
    first = nodes[0]
    first.client.deploy("vol", {"image": HELLO, "port": 8080, "replicas": 0, "volumes": ["data:/data"]})
    script = ["--", "sh", "-c", "echo tick >> /data/log"]
    # Scheduled for a tick far away (a virtual 1 January) first, to learn the app's owner.
    assert cli(first, "jobs", "schedule", "vol", "stamp", "--cron", "0 0 1 1 *", *script).returncode == 0
    owner_id = first.client.request("GET", "/v1/jobs?app=vol")["schedules"][0]["owner"]
    owner, holder = sorted(nodes, key=lambda a: a.node_id != owner_id)
    # No node holds the volume yet: the node that takes a job claims it (as a restore does).
    done = cli(holder, "run", "vol", "--", "sh", "-c", "echo first > /data/log")
    assert done.returncode == 0, done.stderr
    assert [(v["volume"], v["node"]) for v in first.client.volumes()] == [("data", holder.node_id)]
    first.client.scale("vol", 1)
    replica = one_running(holder, "vol")

    assert cli(first, "jobs", "schedule", "vol", "stamp", "--cron", "* * * * *", *script).returncode == 0
    wait_for(lambda: any(r["state"] == "succeeded" for r in runs(first, "vol")), 40, "a run")
    assert {r["node"] for r in runs(first, "vol")} == {holder.node_id}, "runs are made where the volume is"
    assert sh(replica, "cat /data/log").startswith("first\ntick\n")
    # A one-off job through another node's API is refused, naming the holder and its API.
    done = cli(owner, "run", "vol", "--", "true")
    assert done.returncode == 1, done.stderr
    assert f"node {holder.data_dir.name}".encode() in done.stderr, done.stderr
    assert f"{holder.host}:{holder.port}".encode() in done.stderr

    # The holder down: its ticks fail, naming it; a job is refused, naming it too.
    holder.kill()
    down = f"on node {holder.node_id[:12]}, which is down"
    failed = wait_for(lambda: next((r for r in runs(owner, "vol") if down in r["reason"]), None), 60,
                      "a run failed for the holder down")
    assert failed["state"] == "failed" and failed["node"] == owner.node_id, failed
    done = cli(owner, "run", "vol", "--", "true")
    assert done.returncode == 1 and down.encode() in done.stderr, done.stderr
    assert cli(owner, "jobs", "unschedule", "vol", "stamp").returncode == 0


def test_a_repository_jobs_table_is_scheduled_by_its_release(agent_factory: Callable[..., AgentProcess],
                                                             tmp_path: Path) -> None:
    git = GitServer(tmp_path / "git").start()
    agent = agent_factory(env=ENV)
    env = BuildEnv(agent, git, tmp_path)
    try:
        app, repo = env.repo("hello")
        manifest = (repo.work / "pleaco.toml").read_text()
        bad = manifest + '\n[jobs.ping]\ncron = "0 24 * * *"\ncommand = "echo from-manifest"\n'
        b = env.wait_done(app, env.push(repo, "bad cron", change={"pleaco.toml": bad}))
        assert b["state"] == "failed" and b["reason"].startswith("pleaco.toml: [jobs.ping] cron hour: 24"), b
        assert agent.client.request("GET", "/v1/jobs")["schedules"] == []

        good = manifest + '\n[jobs.ping]\ncron = "* * * * *"\ncommand = "echo from-manifest"\n'
        b = env.wait_done(app, env.push(repo, "a job", change={"pleaco.toml": good}))
        assert b["state"] == "succeeded", b["reason"]
        (schedule,) = agent.client.request("GET", f"/v1/jobs?app={app}")["schedules"]
        assert (schedule["name"], schedule["source"], schedule["command"]) == (
            "ping", "manifest", ["sh", "-c", "echo from-manifest"])
        run = wait_for(lambda: next((r for r in agent.client.request("GET", f"/v1/jobs?app={app}")["runs"]
                                     if r["state"] == "succeeded"), None), 30, "a run of the manifest's job")
        assert agent.client.read_bytes(f"/v1/jobs/runs/{run['id']}/logs") == b"from-manifest\n"

        b = env.wait_done(app, env.push(repo, "no job", change={"pleaco.toml": manifest}))
        assert b["state"] == "succeeded", b["reason"]
        assert agent.client.request("GET", f"/v1/jobs?app={app}")["schedules"] == []
    finally:
        stop_and_clean(agent)
        git.stop()
