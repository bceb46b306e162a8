"""The HTTP API of a real agent process: auth, deploys, errors that change nothing."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from agentproc import AgentProcess, ProxyPorts, node_containers, shared_agent, wait_for
from conftest import HELLO

from pleaco.api.builds import sign
from pleaco.api.errors import ApiError


def raw(agent: AgentProcess, method: str, path: str, body: bytes | None = None,
        token: str | None = "default") -> tuple[int, Any]:
    req = urllib.request.Request(agent.url + path, data=body, method=method)
    if token == "default":
        token = agent.token
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            data = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        data, status = exc.read(), exc.code
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data.decode()


def test_deploy_three_replicas_gives_three_labelled_containers(agent: AgentProcess) -> None:
    app = agent.client.deploy("web", {"image": HELLO, "replicas": 3, "port": 8080, "health": "/healthz"})
    assert app["revision"] == 1 and app["replicas"] == 3

    shown = wait_for(lambda: (a := agent.client.app("web"))["healthy"] == 3 and a, 30, "3 healthy replicas")
    assert shown["running"] == 3 and shown["state"] == "running"
    assert sorted(i["replica"] for i in shown["instances"]) == [0, 1, 2]
    containers = node_containers(agent.node_id, "web", all_states=False)
    assert len(containers) == 3
    for c in containers:
        labels = c.attrs["Labels"]
        assert labels["pleaco.app"] == "web"
        assert labels["pleaco.node"] == agent.node_id
        assert labels["pleaco.release"] == "1"
        assert labels["pleaco.replica"] in {"0", "1", "2"}
    # Every replica answers on its published address, each with its own host name.
    answers = set()
    for inst in shown["instances"]:
        with urllib.request.urlopen(f"http://127.0.0.1:{inst['host_port']}/", timeout=5) as resp:
            answers.add(resp.read().decode())
    assert len(answers) == 3 and all(a.startswith("hello from ") for a in answers)


@pytest.fixture(scope="module")
def refusing_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    """One agent for the tests of refusals: each request is refused and changes nothing
    (each test checks that it did not), so they share it rather than start one each."""
    with shared_agent(tmp_path_factory.mktemp("refusals") / "node", "refusing") as agent:
        yield agent


def test_healthz_needs_no_token_but_everything_else_does(refusing_agent: AgentProcess) -> None:
    agent = refusing_agent
    assert raw(agent, "GET", "/healthz", token=None) == (200, {"ok": True, "node_id": agent.node_id})
    for path in ("/v1/status", "/v1/apps", "/metrics"):
        status, body = raw(agent, "GET", path, token=None)
        assert status == 401 and body["error"]["code"] == "unauthorized", path
        status, body = raw(agent, "GET", path, token="wrong-token")
        assert status == 401 and body["error"]["message"] == "invalid token", path
    status, body = raw(agent, "PUT", "/v1/apps/x", json.dumps({"image": HELLO}).encode(), token="nope")
    assert status == 401
    assert agent.client.apps() == []


BAD_DEPLOYS = [
    ("Web", {"image": HELLO}, "name"),
    ("web_1", {"image": HELLO}, "name"),
    ("-web", {"image": HELLO}, "name"),
    ("a" * 64, {"image": HELLO}, "name"),
    ("web", {"image": HELLO, "replicas": -1}, "replicas"),
    ("web", {"image": HELLO, "replicas": 101}, "replicas"),
    ("web", {"image": HELLO, "replicas": "3"}, "replicas"),
    ("web", {"image": HELLO, "port": 0}, "port"),
    ("web", {"image": HELLO, "port": 65536}, "port"),
    ("web", {"image": HELLO, "env": {"1BAD": "x"}}, "env"),
    ("web", {"image": HELLO, "env": {"OK": 1}}, "env"),
    ("web", {"image": HELLO, "env": ["A=B"]}, "env"),
    ("web", {"image": HELLO, "env": {"A": "\ud800"}}, "env"),
    ("web", {"image": HELLO, "env": []}, "env"),
    ("web%0A", {"image": HELLO}, "name"),  # a trailing newline, URL-encoded
    ("web", {"image": HELLO, "colour": "blue"}, "colour"),
    ("web", {"image": HELLO, "port": 8080, "health": "healthz"}, "health"),
    ("web", {"image": HELLO, "host": "not a host"}, "host"),
    ("web", {"image": "has space"}, "image"),
    ("web", {}, "image"),
    ("web", ["image", HELLO], "body"),
]


@pytest.mark.parametrize(("name", "body", "field"), BAD_DEPLOYS)
def test_bad_deploy_is_refused_and_changes_nothing(refusing_agent: AgentProcess, name: str, body: Any,
                                                   field: str) -> None:
    agent = refusing_agent
    before = agent.client.status()["records"]
    status, resp = raw(agent, "PUT", f"/v1/apps/{name}", json.dumps(body).encode())
    assert status == 400, resp
    assert resp["error"]["code"] == "invalid"
    assert resp["error"]["message"].startswith(f"{field}:"), resp
    assert agent.client.status()["records"] == before
    assert agent.client.apps() == []


def test_malformed_and_oversized_bodies(refusing_agent: AgentProcess) -> None:
    agent = refusing_agent
    status, resp = raw(agent, "PUT", "/v1/apps/web", b"{not json")
    assert status == 400 and resp["error"]["code"] == "invalid_json"
    status, resp = raw(agent, "PUT", "/v1/apps/web", b"")
    assert status == 400 and "empty" in resp["error"]["message"]
    big = json.dumps({"image": HELLO, "env": {"BIG": "x" * (2 << 20)}}).encode()
    status, resp = raw(agent, "PUT", "/v1/apps/web", big)
    assert status == 413 and resp["error"]["code"] == "body_too_large"
    status, resp = raw(agent, "GET", "/v1/nope")
    assert status == 404 and resp["error"]["code"] == "not_found"
    status, resp = raw(agent, "PATCH", "/v1/apps/web", b"{}")
    assert status == 405 and resp["error"]["code"] == "method_not_allowed"
    assert agent.client.apps() == []


def test_scale_and_remove_errors(agent: AgentProcess) -> None:
    with pytest.raises(ApiError) as err:
        agent.client.scale("ghost", 2)
    assert err.value.status == 404 and "ghost" in err.value.message
    agent.client.deploy("web", {"image": HELLO, "replicas": 0})
    for body in ({"replicas": -1}, {"replicas": 1000}, {"replicas": 2, "x": 1}, {"n": 2}):
        status, _resp = raw(agent, "POST", "/v1/apps/web/scale", json.dumps(body).encode())
        assert status == 400, body
    assert agent.client.app("web")["replicas"] == 0
    with pytest.raises(ApiError) as err:
        agent.client.remove("ghost")
    assert err.value.status == 404
    with pytest.raises(ApiError) as err:
        agent.client.app("ghost")
    assert err.value.status == 404 and err.value.message == "app 'ghost' does not exist"


def test_app_list_is_whole_by_default_and_pages_on_request(agent: AgentProcess) -> None:
    status, empty = raw(agent, "GET", "/v1/apps")
    assert status == 200 and empty == []
    names = [f"app{i:03d}" for i in range(205)]  # more than one chunk of the streamed list
    for name in reversed(names):
        agent.client.deploy(name, {"image": HELLO, "replicas": 0, "port": 8080})
    listed = agent.client.apps()
    assert [a["name"] for a in listed] == names
    assert listed[0] == agent.client.app("app000")  # each entry is what `apps show` says
    status, page = raw(agent, "GET", "/v1/apps?limit=2")
    assert status == 200 and [a["name"] for a in page] == ["app000", "app001"]
    status, page = raw(agent, "GET", "/v1/apps?limit=2&after=app001")
    assert [a["name"] for a in page] == ["app002", "app003"]
    status, page = raw(agent, "GET", "/v1/apps?after=app202")
    assert [a["name"] for a in page] == ["app203", "app204"]
    for bad in ("0", "-1", "two", "1.5", ""):
        status, err = raw(agent, "GET", f"/v1/apps?limit={bad}")
        assert status == 400 and err["error"]["code"] == "invalid" and "limit" in err["error"]["message"], bad


def test_two_apps_cannot_claim_one_host(agent: AgentProcess) -> None:
    agent.client.deploy("one", {"image": HELLO, "replicas": 0, "host": "shop.example.com"})
    with pytest.raises(ApiError) as err:
        agent.client.deploy("two", {"image": HELLO, "replicas": 0, "host": "shop.example.com"})
    assert err.value.status == 400 and "already used by app 'one'" in err.value.message
    assert [a["name"] for a in agent.client.apps()] == ["one"]


def test_update_is_a_new_release_and_replaces_containers(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 2, "port": 8080, "health": "/healthz"})
    first = wait_for(lambda: (a := agent.client.app("web"))["healthy"] == 2 and a, 30, "v1 healthy")
    old_ids = {i["container"] for i in first["instances"]}
    # The same spec again is not a new release.
    assert agent.client.deploy("web", {"image": HELLO, "port": 8080, "health": "/healthz"})["revision"] == 1
    v2 = {"image": HELLO, "port": 8080, "health": "/healthz", "env": {"GREETING": "v2"}}
    updated = agent.client.deploy("web", v2)
    assert updated["revision"] == 2 and updated["replicas"] == 2

    def rolled() -> dict[str, Any] | None:
        app = agent.client.app("web")
        insts = app["instances"]
        done = app["healthy"] == 2 and len(insts) == 2 and all(i["release"] == 2 for i in insts)
        return app if done else None

    app = wait_for(rolled, 30, "release 2 to replace release 1")
    assert not old_ids & {i["container"] for i in app["instances"]}
    with urllib.request.urlopen(f"http://127.0.0.1:{app['instances'][0]['host_port']}/", timeout=5) as resp:
        assert "(v2)" in resp.read().decode()


def test_metrics_expose_reconcile_containers_and_requests(agent_factory: Callable[..., AgentProcess]) -> None:
    ports = ProxyPorts()
    agent = agent_factory(extra_args=ports.args(), env=ports.env())  # with a proxy: its loop shows too
    agent.client.deploy("web", {"image": HELLO, "replicas": 1, "port": 8080})
    wait_for(lambda: agent.client.app("web")["running"] == 1, 30, "1 running replica")
    raw(agent, "GET", "/v1/apps/ghost")
    status, text = raw(agent, "GET", "/metrics")
    assert status == 200
    lines = text.splitlines()
    # Every loop of the agent runs on the one runner, and shows.
    for loop in ("apps", "proxy", "rollouts", "builds", "tombstones"):
        assert any(line.startswith(f'pleaco_reconcile_runs_total{{loop="{loop}",result=') for line in lines), loop
    assert any(line.startswith('pleaco_reconcile_runs_total{loop="apps",result="ok"}') for line in lines)
    assert any(line.startswith('pleaco_reconcile_duration_seconds_bucket{loop="apps",le="+Inf"}') for line in lines)
    assert 'pleaco_containers{state="running"} 1' in lines
    assert "pleaco_engine_up 1" in lines
    assert 'pleaco_api_requests_total{route="/v1/apps/{name}",method="PUT",status="201"} 1' in lines
    assert 'pleaco_api_requests_total{route="/v1/apps/{name}",method="GET",status="404"} 1' in lines


def test_deeply_nested_bodies_are_refused_naming_the_limit(agent: AgentProcess, tmp_path: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for method, path in (("PUT", "/v1/apps/web"), ("POST", "/v1/apps/web/scale"), ("POST", "/v1/apps/web/connect")):
        status, resp = raw(agent, method, path, deep)
        assert status == 400 and resp["error"]["code"] == "invalid_json", (path, resp)
        assert "deeper than 64 levels" in resp["error"]["message"], path
    # Just within the limit is parsed (and refused for what it says, not for its depth).
    status, resp = raw(agent, "PUT", "/v1/apps/web", b"[" * 64 + b"]" * 64)
    assert status == 400 and resp["error"]["code"] == "invalid", resp
    # The webhook parses its payload, once signed, with the same limit.
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", str(repo)], check=True)
    secret = "s3cret-for-the-depth-test"
    agent.client.connect("built", {"repo": str(repo), "webhook_secret": secret})
    req = urllib.request.Request(agent.url + "/v1/hooks/github", data=deep, method="POST",
                                 headers={"X-Hub-Signature-256": sign(secret, deep), "X-GitHub-Event": "push"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    body = json.loads(err.value.read())
    assert err.value.code == 400 and body["error"]["code"] == "invalid_json"
    assert body["error"]["message"] == "payload nests deeper than 64 levels (the limit)"
    assert [a["name"] for a in agent.client.apps()] == ["built"]
