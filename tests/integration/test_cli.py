"""The `pleaco` command against a real agent: tables, --json, errors and exit codes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import REPO, AgentProcess, free_port, node_containers, shared_agent, wait_for
from conftest import HELLO


def cli(agent: AgentProcess | None, *args: str, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PLEACO_")}
    if agent is not None:
        base_env |= {"PLEACO_API": agent.url, "PLEACO_TOKEN": agent.token}
    return subprocess.run([sys.executable, "-m", "pleaco", *args], capture_output=True, text=True,
                          env=base_env | (env or {}), cwd=REPO, timeout=timeout)


@pytest.fixture(scope="module")
def idle_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent, named "node", for the tests that only read or are refused (each checks
    that nothing changed where it matters), so they share it rather than start one each."""
    with shared_agent(tmp_path_factory.mktemp("idle") / "node", "idle") as agent:
        yield agent


def test_status_json_names_the_answering_node(idle_agent: AgentProcess) -> None:
    agent = idle_agent
    out = cli(agent, "status", "--json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["node_id"] == agent.node_id and st["node_name"] == "node"
    assert st["engine"]["reachable"] is True
    human = cli(agent, "status")
    assert agent.node_id in human.stdout and "reachable" in human.stdout


def test_nodes_lists_this_node(idle_agent: AgentProcess) -> None:
    agent = idle_agent
    nodes = json.loads(cli(agent, "nodes", "--json").stdout)
    assert [(n["id"], n["name"], n["state"]) for n in nodes] == [(agent.node_id, "node", "alive")]
    table = cli(agent, "nodes").stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "NAME", "STATE"] and "alive" in table[1]


def test_deploy_show_scale_logs_rm(agent: AgentProcess) -> None:
    out = cli(agent, "apps", "deploy", "web", "--image", HELLO, "--replicas", "3", "--port", "8080",
              "--health", "/healthz", "--env", "GREETING=cli", "--env", "EMPTY=")
    assert out.returncode == 0, out.stderr
    assert "deployed web revision 1" in out.stdout

    def shown() -> dict[str, object] | None:
        app = json.loads(cli(agent, "apps", "show", "web", "--json").stdout)
        return app if app["running"] == 3 and app["healthy"] == 3 else None

    app = wait_for(shown, 30, "3 running replicas in apps show --json")
    assert app["env"] == {"GREETING": "cli", "EMPTY": ""}
    assert len(node_containers(agent.node_id, "web", all_states=False)) == 3

    table = cli(agent, "apps", "ls").stdout.splitlines()
    assert table[0].split() == ["NAME", "IMAGE", "REV", "READY", "STATE", "MESSAGE"]
    assert table[1].split()[:5] == ["web", HELLO, "1", "3/3", "running"]
    show = cli(agent, "apps", "show", "web").stdout
    assert "3 healthy, 3 running, 3 desired" in show and "GREETING=cli" in show

    logs = cli(agent, "apps", "logs", "web")
    assert logs.returncode == 0
    for i in range(3):
        assert f"[web.{i} r1] serving on :8080" in logs.stdout

    assert cli(agent, "apps", "scale", "web", "1").stdout.strip() == "scaled web to 1 replicas"
    wait_for(lambda: len(node_containers(agent.node_id, "web")) == 1, 30, "scale down to 1")

    assert cli(agent, "apps", "rm", "web").returncode == 0
    wait_for(lambda: not node_containers(agent.node_id, "web"), 30, "containers removed")
    assert json.loads(cli(agent, "apps", "ls", "--json").stdout) == []


def test_logs_follow_streams_new_lines(agent: AgentProcess) -> None:
    cli(agent, "apps", "deploy", "web", "--image", HELLO, "--port", "8080")
    app = wait_for(lambda: (a := agent.client.app("web"))["running"] == 1 and a, 30, "1 running replica")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLEACO_")}
    proc = subprocess.Popen([sys.executable, "-m", "pleaco", "--api", agent.url, "--token", agent.token,
                             "apps", "logs", "web", "--follow"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert "serving on :8080" in proc.stdout.readline()
        port = app["instances"][0]["host_port"]
        import urllib.request

        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
        # httpd -v logs each request: the followed stream shows it.
        assert "web.0" in proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait(10)


def test_errors_exit_nonzero_with_the_servers_message(idle_agent: AgentProcess, tmp_path: Path) -> None:
    agent = idle_agent
    out = cli(agent, "apps", "show", "ghost")
    assert out.returncode == 1 and out.stderr.strip() == "error: app 'ghost' does not exist"
    out = cli(agent, "apps", "deploy", "Bad_Name", "--image", HELLO)
    assert out.returncode == 1 and out.stderr.startswith("error: name: 'Bad_Name' is not a DNS label")
    out = cli(agent, "apps", "deploy", "web", "--image", HELLO, "--env", "NOEQUALS")
    assert out.returncode == 2 and "NAME=VALUE" in out.stderr
    out = cli(agent, "apps", "scale", "web", "3")
    assert out.returncode == 1 and "does not exist" in out.stderr
    out = cli(agent, "status", env={"PLEACO_TOKEN": "wrong"})
    assert out.returncode == 1 and out.stderr.strip() == "error: invalid token"
    out = cli(None, "--api", "http://127.0.0.1:9", "status")
    assert out.returncode == 1 and "cannot reach the pleaco API" in out.stderr
    assert agent.client.apps() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-listen", "nonsense"], "api_listen: expected HOST:PORT"),
        (["--config", "/nonexistent.toml"], "does not exist"),
    ],
)
def test_agent_refuses_bad_config(tmp_path: Path, args: list[str], message: str) -> None:
    out = cli(None, "agent", "--data-dir", str(tmp_path / "d"), *args)
    assert out.returncode == 2 and message in out.stderr


def test_agent_refuses_unknown_config_key(tmp_path: Path) -> None:
    conf = tmp_path / "pleaco.toml"
    conf.write_text('api_listen = "127.0.0.1:1"\ncolour = "blue"\n')
    out = cli(None, "agent", "--config", str(conf), "--data-dir", str(tmp_path / "d"))
    assert out.returncode == 2 and "unknown setting 'colour'" in out.stderr


def test_agent_reports_a_taken_port(idle_agent: AgentProcess, tmp_path: Path) -> None:
    agent = idle_agent
    # Taken by another agent: named from the host's registry of agents' addresses.
    out = cli(None, "agent", "--data-dir", str(tmp_path / "other"), "--api-listen", f"127.0.0.1:{agent.port}")
    assert out.returncode == 1, out.stderr
    assert f"api address 127.0.0.1:{agent.port} is in use by another agent on this host (pid " in out.stderr
    # Taken by something else: the bind's own error.
    with socket.socket() as taker:
        taker.bind(("127.0.0.1", 0))
        taker.listen()
        port = taker.getsockname()[1]
        out = cli(None, "agent", "--data-dir", str(tmp_path / "third"), "--api-listen", f"127.0.0.1:{port}",
                  "--proxy-image=", "--gossip-listen", f"127.0.0.1:{free_port()}")
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr


def test_client_reads_the_token_file_of_the_data_dir(idle_agent: AgentProcess) -> None:
    agent = idle_agent
    # No PLEACO_TOKEN and no --token: the client falls back to DATA_DIR/admin.token.
    out = cli(None, "--api", agent.url, "status", "--json", env={"PLEACO_DATA_DIR": str(agent.data_dir)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["node_id"] == agent.node_id
    out = cli(None, "--api", agent.url, "status", env={"PLEACO_DATA_DIR": str(agent.data_dir.parent)})
    assert out.returncode == 1 and "missing bearer token" in out.stderr


def test_rollback_returns_to_the_previous_release(agent: AgentProcess) -> None:
    out = cli(agent, "apps", "rollback", "web")
    assert out.returncode == 1 and "does not exist" in out.stderr
    cli(agent, "apps", "deploy", "web", "--image", HELLO, "--port", "8080", "--env", "GREETING=one")
    out = cli(agent, "apps", "rollback", "web")
    assert out.returncode == 1 and "no release before revision 1" in out.stderr
    cli(agent, "apps", "deploy", "web", "--image", HELLO, "--port", "8080", "--env", "GREETING=two")
    out = cli(agent, "apps", "rollback", "web")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"rolled back web: revision 3 runs {HELLO}"

    def served() -> str:
        app = agent.client.app("web")
        inst = [i for i in app["instances"] if i["release"] == 3 and i["state"] == "running"]
        if app["healthy"] != 1 or len(app["instances"]) != 1 or not inst:
            return ""
        import urllib.request

        return urllib.request.urlopen(f"http://127.0.0.1:{inst[0]['host_port']}/", timeout=5).read().decode()

    assert "(one)" in wait_for(served, 30, "revision 3 serving revision 1's spec")
    assert agent.client.app("web")["env"] == {"GREETING": "one"}
