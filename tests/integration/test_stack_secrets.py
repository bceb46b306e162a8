"""A compose file's ``secrets`` and ``x-pleaco-jobs``, end to end: `pleaco stack deploy` (the
CLI, a subprocess) reads a ``file:`` secret and sends it beside the document; a real agent
gives it, and an ``external`` one set beforehand with `pleaco secrets set`, to the service's
container at /run/secrets, and to nothing else (stack show, the store file, the agent's
log, the deploy's answer); an unchanged value does not roll the replicas, a changed one
does. The service's jobs become its app's schedules, and a deploy without them removes them
(a schedule made with `jobs schedule` stays)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from agentproc import REPO, AgentProcess, wait_for
from conftest import HELLO
from test_app_secrets import exec_out, raw_get, running

ENV = {"PLEACO_JOBS_TICK_SECONDS": "2", "PLEACO_JOBS_CLAIM_SETTLE": "0.3"}

WEB = f"""
services:
  web:
    image: {HELLO}
    ports: [8080]
    secrets:
      - db_password
{{more}}
secrets:
  db_password:
    file: ./db.txt
{{declared}}
"""
WITH_EXTERNAL = WEB.format(more="      - source: api\n        target: api_key",
                           declared="  api:\n    external: true")
ONLY_FILE = WEB.format(more="", declared="")


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pleaco", "--api", agent.url, "--token", agent.token, *args],
                          capture_output=True, timeout=120, cwd=REPO, env={**os.environ})


def deploy(agent: AgentProcess, compose: Path) -> dict[str, Any]:
    done = cli(agent, "stack", "deploy", "st", "-f", str(compose), "--json")
    assert done.returncode == 0, done.stderr
    (service,) = json.loads(done.stdout)["services"]
    return dict(service)


def test_file_and_external_secrets_reach_the_container_and_nothing_else(agent: AgentProcess,
                                                                         tmp_path: Path) -> None:
    db_value = "db-" + uuid.uuid4().hex + "\nsecond line"
    api_value = "api-" + uuid.uuid4().hex
    (tmp_path / "db.txt").write_text(db_value)
    compose = tmp_path / "compose.yaml"
    compose.write_text(ONLY_FILE)
    first = deploy(agent, compose)
    assert first["created"] and first["revision"] == 1
    c = running(agent, "st-web", 1)
    assert exec_out(c, "cat", "/run/secrets/db_password") == (0, db_value)

    # An external secret not set yet: an error naming it and the command; nothing deployed.
    compose.write_text(WITH_EXTERNAL)
    refused = cli(agent, "stack", "deploy", "st", "-f", str(compose))
    assert refused.returncode != 0
    assert b"external secret 'api'" in refused.stderr
    assert b"pleaco secrets set st-web api_key --mount file" in refused.stderr
    assert agent.client.app("st-web")["revision"] == 1

    set_ = subprocess.run([sys.executable, "-m", "pleaco", "--api", agent.url, "--token", agent.token,
                           "secrets", "set", "st-web", "api_key", "--mount", "file"],
                          input=api_value.encode(), capture_output=True, timeout=60, cwd=REPO)
    assert set_.returncode == 0, set_.stderr
    assert agent.client.app("st-web")["revision"] == 2  # `secrets set` rolls, as ever
    answer = cli(agent, "stack", "deploy", "st", "-f", str(compose), "--json")
    assert answer.returncode == 0, answer.stderr
    assert not json.loads(answer.stdout)["services"][0]["changed"]  # the stack gives what the app holds
    c = running(agent, "st-web", 2)
    assert exec_out(c, "cat", "/run/secrets/db_password") == (0, db_value)
    assert exec_out(c, "cat", "/run/secrets/api_key") == (0, api_value)
    assert exec_out(c, "stat", "-c", "%a", "/run/secrets/db_password") == (0, "400\n")
    assert db_value not in exec_out(c, "env")[1]

    # The same value again: no new release, the same container.
    again = deploy(agent, compose)
    assert not again["changed"] and again["revision"] == 2
    assert running(agent, "st-web", 2).id == c.id

    # Nowhere else: stack show and ls, apps show, the secrets listing, the deploy's answer,
    # the store file, the agent's log.
    shown = [cli(agent, "stack", "show", "st").stdout, cli(agent, "stack", "show", "st", "--json").stdout,
             cli(agent, "stack", "ls", "--json").stdout, cli(agent, "apps", "show", "st-web", "--json").stdout,
             answer.stdout, refused.stderr, raw_get(agent, "/v1/stacks/st"), raw_get(agent, "/v1/apps/st-web"),
             raw_get(agent, "/v1/apps/st-web/secrets")]
    store = b"".join(p.read_bytes() for p in agent.data_dir.glob("state.db*"))
    for secret in (db_value.split("\n")[0], api_value):
        for where, text in [*enumerate(shown), ("store", store), ("log", agent.log_path.read_bytes())]:
            assert secret.encode() not in text, f"secret found in {where}"

    # A changed value rolls the replicas; the new container has it.
    changed_value = "db-" + uuid.uuid4().hex
    (tmp_path / "db.txt").write_text(changed_value)
    rolled = deploy(agent, compose)
    assert rolled["changed"] and rolled["revision"] == 3
    c = running(agent, "st-web", 3)
    assert exec_out(c, "cat", "/run/secrets/db_password") == (0, changed_value)
    assert changed_value.encode() not in agent.log_path.read_bytes()

    # Dropped from the file: the stack's own secret goes (a roll), the one set by hand stays.
    compose.write_text(f"services:\n  web:\n    image: {HELLO}\n    ports: [8080]\n")
    dropped = deploy(agent, compose)
    assert dropped["changed"] and dropped["revision"] == 4
    assert [s["key"] for s in agent.client.request("GET", "/v1/apps/st-web/secrets")] == ["api_key"]
    c = running(agent, "st-web", 4)
    assert exec_out(c, "cat", "/run/secrets/db_password")[0] != 0
    assert exec_out(c, "cat", "/run/secrets/api_key") == (0, api_value)


def schedules(agent: AgentProcess) -> list[tuple[str, str, str, list[str]]]:
    listed = cli(agent, "jobs", "ls", "st-web", "--json")
    assert listed.returncode == 0, listed.stderr
    return [(s["name"], s["source"], s["cron"], s["command"]) for s in json.loads(listed.stdout)["schedules"]]


def test_a_services_jobs_are_scheduled_by_the_stack(agent_factory: Any, tmp_path: Path) -> None:
    agent = agent_factory(env=ENV)
    compose = tmp_path / "compose.yaml"
    compose.write_text(f"""
services:
  web:
    image: {HELLO}
    ports: [8080]
    x-pleaco-jobs:
      ping:
        cron: "* * * * *"
        command: sh -c 'echo from-stack'
""")
    deploy(agent, compose)
    assert schedules(agent) == [("ping", "stack", "* * * * *", ["sh", "-c", "echo from-stack"])]
    done = cli(agent, "jobs", "schedule", "st-web", "by-hand", "--cron", "0 3 * * *", "--", "true")
    assert done.returncode == 0, done.stderr
    run = wait_for(lambda: next((r for r in agent.client.request("GET", "/v1/jobs?app=st-web")["runs"]
                                 if r["name"] == "ping" and r["state"] == "succeeded"), None), 60,
                   "a run of the stack's job")
    assert agent.client.read_bytes(f"/v1/jobs/runs/{run['id']}/logs") == b"from-stack\n"

    # A bad job: an error naming service and job, nothing changed.
    good = compose.read_text()
    compose.write_text(good.replace('"* * * * *"', '"0 24 * * *"'))
    bad = cli(agent, "stack", "deploy", "st", "-f", str(compose))
    assert bad.returncode != 0 and b"services.web.x-pleaco-jobs.ping" in bad.stderr, bad.stderr
    assert [s[0] for s in schedules(agent)] == ["by-hand", "ping"]

    compose.write_text(f"services:\n  web:\n    image: {HELLO}\n    ports: [8080]\n")
    assert not deploy(agent, compose)["changed"]  # jobs are no part of the release
    assert schedules(agent) == [("by-hand", "api", "0 3 * * *", ["true"])]
    assert cli(agent, "stack", "rm", "st").returncode == 0
    assert agent.client.request("GET", "/v1/jobs")["schedules"] == []
