"""One-off jobs (`pleaco run APP -- CMD`) against a real agent and Docker Engine: the job
runs the app's current release with its environment and secrets, its output streams to
the CLI, the CLI exits with the job's code, and its container is removed afterwards, also
when the client goes away mid-job, and when an agent killed mid-job starts again. A job runs
as a replica of the release does: the app's volumes (what the replica writes, the job reads,
and back), its entrypoint, and, with the network on, the `pleaco` network and its names."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from typing import Any

import nethosts
from agentproc import REPO, AgentProcess, docker_client, wait_for
from conftest import BUSYBOX, HELLO
from test_volumes import one_running, sh

from pleaco.api.errors import ApiError


def cli(agent: AgentProcess, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pleaco", "--api", agent.url, "--token", agent.token, *args],
                          input=stdin, capture_output=True, timeout=120, cwd=REPO)


def jobs_of(agent: AgentProcess) -> list[dict[str, Any]]:
    return list(docker_client().api.containers(all=True, filters={"label": ["pleaco.role=job",
                                                                           f"pleaco.node={agent.node_id}"]}))


def test_run_streams_output_and_exits_with_the_code(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 0, "port": 8080, "env": {"GREETING": "hi"}})
    assert cli(agent, "secrets", "set", "web", "TOKEN", "--mount", "file", stdin=b"s3cret").returncode == 0
    assert cli(agent, "secrets", "set", "web", "DB_URL", stdin=b"db://x").returncode == 0
    done = cli(agent, "run", "web", "--", "sh", "-c",
               'echo "$GREETING $DB_URL"; cat /run/secrets/TOKEN; echo; echo oops >&2; exit 7')
    assert done.returncode == 7, done.stderr
    # stdout and stderr both, merged (the engine keeps them apart, so their order between them may vary).
    assert sorted(done.stdout.decode().splitlines()) == ["hi db://x", "oops", "s3cret"]
    assert wait_for(lambda: jobs_of(agent) == [], 30, "the job's container removed") is True
    assert not any((agent.data_dir / "job-secrets").iterdir())
    # The replicas' loop never saw it: the app still has no container.
    assert agent.client.app("web")["instances"] == []
    assert cli(agent, "run", "web", "--", "true").returncode == 0


def test_a_client_gone_mid_job_leaves_no_container(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 0, "port": 8080})
    proc = subprocess.Popen([sys.executable, "-m", "pleaco", "--api", agent.url, "--token", agent.token,
                             "run", "web", "--", "sh", "-c", "echo started; sleep 600"],
                            stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"
        assert len(jobs_of(agent)) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    wait_for(lambda: jobs_of(agent) == [], 30, "the job's container removed after the client went away")


def test_an_agent_restart_sweeps_jobs_left_behind(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 0, "port": 8080})
    assert cli(agent, "secrets", "set", "web", "K", "--mount", "file", stdin=b"v").returncode == 0
    req = urllib.request.Request(agent.url + "/v1/apps/web/run", method="POST",
                                 data=json.dumps({"command": ["sleep", "600"]}).encode(),
                                 headers={"Authorization": f"Bearer {agent.token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert "job" in json.loads(resp.readline())
        wait_for(lambda: len(jobs_of(agent)) == 1, 30, "the job running")
        agent.kill()  # mid-job: nobody left to remove it
    assert len(jobs_of(agent)) == 1 and any((agent.data_dir / "job-secrets").iterdir())
    agent.start()
    assert jobs_of(agent) == [] and not any((agent.data_dir / "job-secrets").iterdir())


def test_bad_job_requests(agent: AgentProcess) -> None:
    def refused(name: str, body: Any) -> ApiError:
        try:
            agent.client.request("POST", f"/v1/apps/{name}/run", body)
        except ApiError as exc:
            return exc
        raise AssertionError("accepted")

    assert refused("nope", {"command": ["true"]}).status == 404
    assert refused("nope", {"command": []}).status == 400
    agent.client.deploy("ghost", {"image": "pleaco/not-there:1", "replicas": 0})
    missing = refused("ghost", {"command": ["true"]})
    assert missing.status == 409 and "pleaco/not-there:1" in missing.message
    done = cli(agent, "run", "ghost")
    assert done.returncode == 2 and b"--" in done.stderr
    assert jobs_of(agent) == []


def test_a_job_has_the_apps_volumes_and_entrypoint(agents: Callable[..., AgentProcess]) -> None:
    agent = agents()
    # The entrypoint sets MARK: a job that prints it ran through the entrypoint.
    agent.client.deploy("db", {"image": HELLO, "port": 8080, "volumes": ["data:/data"],
                               "entrypoint": ["env", "MARK=entrypoint"], "command": ["/bin/sh", "/serve.sh"]})
    replica = one_running(agent, "db")
    sh(replica, "echo from-replica > /data/r")
    done = cli(agent, "run", "db", "--", "sh", "-c", 'cat /data/r; echo "$MARK"; echo from-job > /data/j')
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == "from-replica\nentrypoint\n"
    assert sh(replica, "cat /data/j") == "from-job\n"
    assert wait_for(lambda: jobs_of(agent) == [], 30, "the job's container removed") is True


def test_a_job_resolves_the_apps_by_name(agent_factory: Callable[..., AgentProcess]) -> None:
    """On a host of its own with the network on: a job of one app finds another app's
    serving replica as ``web.internal`` and reaches it there."""
    with nethosts.engine_hosts(1, "jb", 77) as [h]:
        agent = agent_factory("n0", host=h.ip, prefix=h.prefix, env={**h.env, "PLEACO_NETWORK_ENABLED": "true"})
        agent.client.deploy("web", {"image": HELLO, "port": 8080, "health": "/healthz"})
        agent.client.deploy("tool", {"image": BUSYBOX, "replicas": 0})

        def serving() -> str | None:
            found = [i["address"] for i in agent.client.app("web")["instances"] if i.get("serving")]
            return found[0].rpartition(":")[0] if found else None

        ip = wait_for(serving, 60, "web serving")
        done = cli(agent, "run", "tool", "--", "sh", "-c", "nslookup -type=a web.internal && "
                   "wget -q -O- http://web.internal:8080/")
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout.decode()
        assert ip in out and "hello from" in out, out
