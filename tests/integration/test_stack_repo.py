"""A connected repository holding compose.yaml: each push deploys it as a stack, building its
``build:`` service with the build pipeline (a real git server, signed GitHub deliveries,
real Docker builds and containers), and redeploys only the services that changed."""

from __future__ import annotations

import contextlib
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from agentproc import AgentProcess, docker_client, node_containers, wait_for
from conftest import BUSYBOX
from gitserver import AppRepo, GitServer, deliver, git, push_payload

SECRET = "s3cret-for-stacks"
STACK = "shop"
POLL = 0.2

COMPOSE = f"""
services:
  web:
    build: ./web
    ports: ["8080"]
    x-pleaco: {{health: /index.html}}
  kv:
    image: {BUSYBOX}
    entrypoint: [httpd]
    command: -f -p 7000 -h /etc
    expose: [7000]
"""
DOCKERFILE = f"""FROM {BUSYBOX}
COPY index.html /www/index.html
CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]
"""
# Beside compose.yaml, pleaco.toml says how the built services are tested and scanned.
MANIFEST = """[test]
command = ["cat", "/www/index.html"]
[scan]
fail_on = "critical"
"""


def push(agent: AgentProcess, repo: AppRepo, message: str, change: dict[str, str]) -> dict[str, Any]:
    """Commit and push ``change``, deliver GitHub's webhook, and wait for the build to finish."""
    commit = repo.commit_and_push(message, change=change)
    d = deliver(agent.url, SECRET, "push", push_payload(repo.url, repo.before, commit))
    assert d.status == 202, d.body

    def done() -> dict[str, Any] | None:
        b = agent.client.build(f"{STACK}-{commit[:12]}")
        return b if b["state"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, 120, f"the build of {commit[:12]}", interval=POLL)


def replicas(agent: AgentProcess) -> dict[str, str]:
    """The running container of each service (by service), once each runs exactly one
    replica of its current revision, healthy."""
    shown = agent.client.request("GET", f"/v1/stacks/{STACK}")
    found: dict[str, str] = {}
    for svc in shown["services"]:
        if svc["state"] != "running" or svc["healthy"] != svc["replicas"]:
            return {}
        running = [c for c in node_containers(agent.node_id, svc["name"], all_states=False)
                   if (c.attrs.get("Labels") or {}).get("pleaco.release") == str(svc["revision"])]
        others = node_containers(agent.node_id, svc["name"], all_states=True)
        if len(running) != 1 or len(others) != 1:
            return {}
        found[svc["service"]] = running[0].id
    return found


def web_page(agent: AgentProcess) -> str:
    app = agent.client.app(f"{STACK}-web")
    ports = [i["host_port"] for i in app["instances"] if i["healthy"] and i["release"] == app["revision"]]
    if not ports:
        return ""
    with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/index.html", timeout=5) as resp:
        return resp.read().decode()


@pytest.fixture
def repo(tmp_path: Path) -> Any:
    server = GitServer(tmp_path / "git").start()
    work = tmp_path / "work"
    (work / "web").mkdir(parents=True)
    (work / "compose.yaml").write_text(COMPOSE)
    (work / "pleaco.toml").write_text(MANIFEST)
    (work / "web" / "Dockerfile").write_text(DOCKERFILE)
    (work / "web" / "index.html").write_text("hello v1\n")
    url = server.create(STACK)
    git("init", "-q", "-b", "main", cwd=work)
    git("remote", "add", "origin", url, cwd=work)
    try:
        yield AppRepo(work, url)
    finally:
        server.stop()


@pytest.fixture
def agent(agent_factory: Callable[..., AgentProcess]) -> Iterator[AgentProcess]:
    """An agent; after the test it is stopped, its containers removed, and then the images
    its builds made (an image is only removed once no container uses it)."""
    node = agent_factory()
    try:
        yield node
    finally:
        images: set[str] = set()
        with contextlib.suppress(Exception):
            images = {s["image"] for b in node.client.builds() for s in b["services"].values() if "image" in s}
        node.cleanup()
        client = docker_client()
        for ref in images:
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(ref, force=True)


def test_a_repository_with_compose_yaml_deploys_a_stack_and_redeploys_what_changed(
        agent: AgentProcess, repo: AppRepo) -> None:
    out = agent.client.connect(STACK, {"repo": repo.url, "branch": "main", "webhook_secret": SECRET})
    assert out["webhook_secret"] == SECRET

    # First push: web is built (tested and scanned as pleaco.toml says), kv runs its image.
    b1 = push(agent, repo, "first", {})
    assert b1["state"] == "succeeded", b1["reason"]
    assert b1["compose"] == "compose.yaml"
    web1 = b1["services"]["web"]
    assert web1["app"] == f"{STACK}-web" and web1["image"].startswith("sha256:")
    assert web1["test"]["exit_code"] == 0 and "hello v1" in web1["test"]["output"]
    assert web1["scan"]["scanner"] == "pleaco-osv" and web1["scan"]["blocking"] == 0
    assert (web1["changed"], b1["services"]["kv"]["changed"]) == (True, True)
    assert set(b1["steps"]) == {"fetch", "build", "test", "scan"}
    assert agent.client.app(f"{STACK}-web")["image"] == web1["image"]
    assert agent.client.app(f"{STACK}-kv")["image"] == BUSYBOX
    first = wait_for(lambda: replicas(agent), 60, "both services running", interval=POLL)
    assert wait_for(lambda: web_page(agent), 30, "web serving", interval=POLL) == "hello v1\n"
    # The connected app names the repository and its builds; the services run as STACK-SERVICE.
    assert agent.client.app(STACK)["replicas"] == 0

    # A push that changes neither file of web's context nor the compose file: the same
    # image is built again (the layer cache), so nothing is redeployed.
    b2 = push(agent, repo, "docs", {"README.md": "a stack\n"})
    assert b2["state"] == "succeeded", b2["reason"]
    assert b2["services"]["web"]["image"] == web1["image"]
    assert (b2["services"]["web"]["changed"], b2["services"]["kv"]["changed"]) == (False, False)

    # Web's source changes: web alone is rebuilt into a new image and rolled; kv keeps
    # its revision and its container.
    b3 = push(agent, repo, "web v2", {"web/index.html": "hello v2\n"})
    assert b3["state"] == "succeeded", b3["reason"]
    assert b3["services"]["web"]["image"] != web1["image"]
    assert (b3["services"]["web"]["changed"], b3["services"]["kv"]["changed"]) == (True, False)
    assert (b3["services"]["web"]["revision"], b3["services"]["kv"]["revision"]) == (2, 1)
    third = wait_for(lambda: (r := replicas(agent)) and r["web"] != first["web"] and r, 60, "web rolled",
                     interval=POLL)
    assert third["kv"] == first["kv"]
    assert wait_for(lambda: web_page(agent) == "hello v2\n", 30, "web v2 serving", interval=POLL)
    history = agent.client.request("GET", f"/v1/apps/{STACK}-web/releases")
    assert (history[-1]["commit"], history[-1]["build"]) == (repo.head, b3["id"])

    # A compose file with a key pleaco does not run fails the build, naming the file,
    # the service and the key; nothing that runs changes.
    bad = COMPOSE.replace("    expose: [7000]", "    expose: [7000]\n    privileged: true")
    b4 = push(agent, repo, "bad", {"compose.yaml": bad})
    assert b4["state"] == "failed"
    assert b4["reason"].startswith("compose.yaml: services.kv.privileged: not supported"), b4["reason"]
    assert replicas(agent) == third
    assert agent.client.app(f"{STACK}-web")["revision"] == 2
    assert agent.client.app(f"{STACK}-kv")["revision"] == 1
