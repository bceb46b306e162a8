"""App secrets end to end: `pleaco secrets set|ls|rm` against a real agent and Docker Engine.
The value reaches the app's container (as an environment variable or a read-only file) and
nowhere else: not the store file, the agent's log, any API answer, nor another app's
container; a change rolls the replicas; bad input changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from agentproc import REPO, AgentProcess, docker_client, form_cluster, node_containers, wait_for
from conftest import HELLO

from pleaco.api.errors import ApiError
from pleaco.stacks.secrets import MAX_SECRET_BYTES


def cli(agent: AgentProcess, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "pleaco", "--api", agent.url, "--token", agent.token, *args],
                          input=stdin, capture_output=True, timeout=60, cwd=REPO)


def raw_get(agent: AgentProcess, path: str) -> bytes:
    req = urllib.request.Request(agent.url + path, headers={"Authorization": f"Bearer {agent.token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return bytes(resp.read())


def running(agent: AgentProcess, app: str, revision: int) -> Any:
    """The app's running container of that release, once there is one."""
    def found() -> Any:
        for c in node_containers(agent.node_id, app, all_states=False):
            c.reload()
            if c.labels.get("pleaco.release") == str(revision) and c.status == "running":
                return c
        return None
    return wait_for(found, 60, f"a running container of {app} release {revision}")


def releases(agent: AgentProcess, app: str) -> list[str]:
    rows = docker_client().api.containers(all=True, filters={"label": [f"pleaco.node={agent.node_id}",
                                                                       f"pleaco.app={app}"]})
    return sorted(row["Labels"]["pleaco.release"] for row in rows)


def exec_out(container: Any, *cmd: str) -> tuple[int, str]:
    code, out = container.exec_run(list(cmd))
    return int(code), out.decode()


def test_secrets_reach_the_container_and_nothing_else(agent: AgentProcess) -> None:
    env_value = "env-" + uuid.uuid4().hex
    file_value = "file-" + uuid.uuid4().hex + "\nsecond line"
    agent.client.deploy("sec", {"image": HELLO, "replicas": 1, "port": 8080})
    agent.client.deploy("other", {"image": HELLO, "replicas": 1, "port": 8080})
    running(agent, "sec", 1)

    done = cli(agent, "secrets", "set", "sec", "DB_PASS", stdin=env_value.encode() + b"\n")
    assert done.returncode == 0, done.stderr
    done = cli(agent, "secrets", "set", "sec", "TLS_KEY", "--mount", "file", stdin=file_value.encode())
    assert done.returncode == 0, done.stderr
    assert agent.client.app("sec")["revision"] == 3  # each set is a release: the replicas roll

    c = running(agent, "sec", 3)
    code, env = exec_out(c, "env")
    assert code == 0 and f"DB_PASS={env_value}" in env.splitlines()  # echo's newline is not kept
    assert "TLS_KEY" not in env
    assert exec_out(c, "cat", "/run/secrets/TLS_KEY") == (0, file_value)
    assert exec_out(c, "stat", "-c", "%a", "/run/secrets/TLS_KEY") == (0, "400\n")
    code, _ = exec_out(c, "sh", "-c", "echo x > /run/secrets/NEW")
    assert code != 0  # mounted read-only
    # The old release's container is gone, and its secret files with it.
    wait_for(lambda: releases(agent, "sec") == ["3"], 60, "only release 3 of sec")
    files = agent.data_dir / "run-secrets"
    wait_for(lambda: sorted(p.name for p in files.iterdir()) == [c.name], 30, "only release 3's secret files")

    listed = cli(agent, "secrets", "ls", "sec", "--json")
    assert listed.returncode == 0
    assert [(s["key"], s["mount"]) for s in json.loads(listed.stdout)] == [("DB_PASS", "env"), ("TLS_KEY", "file")]

    # Nowhere else: every API answer, the metrics, the store file, the agent's log, another app.
    answers = [raw_get(agent, p) for p in ("/v1/apps", "/v1/apps/sec", "/v1/apps/sec/secrets", "/v1/status",
                                           "/v1/nodes", "/metrics", "/v1/apps/sec/logs?tail=all")]
    answers += [listed.stdout, cli(agent, "apps", "show", "sec").stdout,
                cli(agent, "apps", "show", "sec", "--json").stdout]
    store = b"".join(p.read_bytes() for p in agent.data_dir.glob("state.db*"))
    other = node_containers(agent.node_id, "other")[0]
    inspected = json.dumps(docker_client().api.inspect_container(other.id)).encode()
    for secret in (env_value.encode(), file_value.encode(), file_value.split("\n")[0].encode()):
        for where, text in [*enumerate(answers), ("store", store), ("log", agent.log_path.read_bytes()),
                            ("other app", inspected)]:
            assert secret not in text, f"secret found in {where}"

    # Removing one rolls again; the file is gone from the new container.
    assert cli(agent, "secrets", "rm", "sec", "TLS_KEY").returncode == 0
    c = running(agent, "sec", 4)
    assert exec_out(c, "cat", "/run/secrets/TLS_KEY")[0] != 0
    assert f"DB_PASS={env_value}" in exec_out(c, "env")[1].splitlines()
    wait_for(lambda: not any(files.iterdir()), 60, "the removed release's secret files to go")


def test_bad_secret_requests_change_nothing(agent: AgentProcess) -> None:
    agent.client.deploy("sec", {"image": HELLO, "replicas": 0, "port": 8080})
    assert agent.client.request("PUT", "/v1/apps/sec/secrets/GOOD", {"value": "v1"})["key"] == "GOOD"
    before = agent.client.app("sec")["revision"]

    def refused(path: str, body: Any, method: str = "PUT") -> ApiError:
        try:
            agent.client.request(method, path, body)
        except ApiError as exc:
            return exc
        raise AssertionError(f"{method} {path} was accepted")

    bad_key = refused("/v1/apps/sec/secrets/1BAD-KEY", {"value": "v"})
    assert bad_key.status == 400 and "1BAD-KEY" in bad_key.message and "key" in bad_key.message
    large = refused("/v1/apps/sec/secrets/BIG", {"value": "x" * (MAX_SECRET_BYTES + 1)})
    assert large.status == 400 and str(MAX_SECRET_BYTES) in large.message
    mount = refused("/v1/apps/sec/secrets/K", {"value": "v", "mount": "disk"})
    assert mount.status == 400 and "mount" in mount.message
    extra = refused("/v1/apps/sec/secrets/K", {"value": "v", "colour": "red"})
    assert extra.status == 400 and "colour" in extra.message
    missing = refused("/v1/apps/nope/secrets/K", {"value": "v"})
    assert missing.status == 404 and "nope" in missing.message
    gone = refused("/v1/apps/sec/secrets/NOT_THERE", None, "DELETE")
    assert gone.status == 404 and "NOT_THERE" in gone.message

    # The CLI says so before sending anything too large (exit 2), and passes on the server's errors.
    done = cli(agent, "secrets", "set", "sec", "BIG", stdin=b"x" * (MAX_SECRET_BYTES + 1))
    assert done.returncode == 2 and str(MAX_SECRET_BYTES).encode() in done.stderr
    done = cli(agent, "secrets", "set", "sec", "bad-key", stdin=b"v")
    assert done.returncode == 1 and b"bad-key" in done.stderr

    assert agent.client.app("sec")["revision"] == before
    assert [s["key"] for s in agent.client.request("GET", "/v1/apps/sec/secrets")] == ["GOOD"]
    try:
        raw_get(agent, "/v1/apps/nope/secrets")
    except urllib.error.HTTPError as exc:
        assert exc.code == 404
    else:
        raise AssertionError("secrets of a missing app were listed")


def test_a_secret_set_on_one_node_reaches_the_replicas_on_every_node(
        agent_factory: Callable[..., AgentProcess]) -> None:
    a, b = form_cluster(agent_factory, 2)
    value = "cluster-" + uuid.uuid4().hex
    a.client.deploy("sec", {"image": HELLO, "replicas": 2, "port": 8080})
    done = cli(a, "secrets", "set", "sec", "API_KEY", stdin=value.encode())
    assert done.returncode == 0, done.stderr
    # Sealed under the cluster's key, opened by b; each node's replica of release 2 has it.
    for node in (a, b):
        c = running(node, "sec", 2)
        assert f"API_KEY={value}" in exec_out(c, "env")[1].splitlines()
        assert value.encode() not in b"".join(p.read_bytes() for p in node.data_dir.glob("state.db*"))
        assert value.encode() not in node.log_path.read_bytes()
