"""``build.registry``: a passed build's image pushed to a real registry (the CNCF
distribution registry, Debian's ``docker-registry``) before its release, and the release
naming the pushed reference; a push that fails fails the build."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from agentproc import AgentProcess, docker_client, free_port, wait_for, wait_listening
from gitserver import AppRepo, GitServer, deliver, push_payload
from test_build import SECRET, stop_and_clean

REGISTRY_BIN = "docker-registry"  # Debian's name for the distribution registry's binary


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A registry process on 127.0.0.1 (plain HTTP: Docker trusts 127.0.0.0/8), storing in
    tmp_path; its HOST:PORT. Stopped after the test, passed or not."""
    binary = shutil.which(REGISTRY_BIN) or shutil.which("registry")
    if binary is None:
        pytest.skip("the registry binary (Debian package docker-registry, in the Makefile's APT_PACKAGES) "
                    "is not installed")
    port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "registry-data")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }))
    log = open(tmp_path / "registry.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_listening(proc, "127.0.0.1", port, 20, "the registry")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        print(f"==== registry log ====\n{(tmp_path / 'registry.log').read_text(errors='replace')[-4000:]}")


def registry_get(registry: str, path: str, accept: str = "") -> tuple[dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(f"http://{registry}{path}", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read()), dict(resp.headers)


def build_app(agent: AgentProcess, tmp_path: Path, app: str) -> tuple[GitServer, str, dict[str, Any]]:
    """Connect ``app`` to a new repository holding examples/hello, push, wait for the build."""
    git = GitServer(tmp_path / "git").start()
    url = git.create(app)
    repo = AppRepo.from_example("hello", tmp_path / "work", url)
    agent.client.connect(app, {"repo": url, "webhook_secret": SECRET})
    commit = repo.commit_and_push("first")
    assert deliver(agent.url, SECRET, "push", push_payload(url, "0" * 40, commit)).status == 202
    b = wait_for(lambda: (b := agent.client.build(f"{app}-{commit[:12]}"))["state"] in ("succeeded", "failed")
                 and b, 90, "the build to finish")
    return git, commit, b


def remove_refs(refs: list[str]) -> None:
    for ref in refs:
        with contextlib.suppress(docker.errors.APIError):
            docker_client().images.remove(ref, force=True)


def test_passed_build_is_pushed_and_released_by_its_reference(
        agent_factory: Callable[..., AgentProcess], tmp_path: Path, registry: str) -> None:
    namespace = f"{registry}/pleacotest"
    agent = agent_factory("pusher", env={"PLEACO_BUILD_REGISTRY": namespace})
    git: GitServer | None = None
    pushed = ""
    others: list[AgentProcess] = []
    try:
        git, commit, b = build_app(agent, tmp_path, "pushed")
        log = b"".join(agent.client.build_logs(b["id"])).decode()
        assert b["state"] == "succeeded", (b["reason"], log)
        pushed = f"{namespace}/pushed:{commit[:12]}"
        assert b["pushed"] == pushed and b["pushed_digest"].startswith("sha256:")
        assert set(b["steps"]) == {"fetch", "build", "test", "scan", "push"}
        assert "==> pushing" in log and f"pushed: {pushed}" in log

        # The registry has it, under that tag and digest.
        tags, _ = registry_get(registry, "/v2/pleacotest/pushed/tags/list")
        assert tags["tags"] == [commit[:12]]
        _, headers = registry_get(registry, f"/v2/pleacotest/pushed/manifests/{commit[:12]}",
                                  "application/vnd.docker.distribution.manifest.v2+json")
        assert headers["Docker-Content-Digest"] == b["pushed_digest"]

        # The release names the pushed reference (what another node would pull), and runs.
        app = agent.client.app("pushed")
        assert app["image"] == pushed and app["revision"] == 1
        wait_for(lambda: any(i["healthy"] and i["release"] == 1 for i in agent.client.app("pushed")["instances"]),
                 30, "the pushed release to run")

        # A node without the image (and no peer to fetch it from) pulls it from the registry.
        docker_client().images.remove(pushed)  # untagged only: the build's own tags keep the image
        other = agent_factory("puller")
        others.append(other)
        other.client.deploy("pulled", {"image": pushed, "replicas": 1, "port": 8080, "health": "/healthz"})
        wait_for(lambda: any(i["healthy"] for i in other.client.app("pulled")["instances"]), 60,
                 "the other node to pull the image from the registry and run it")
        assert docker_client().images.get(pushed).id == b["image"]
        assert "event=image.pulled" in other.log_tail(200)
    finally:
        for other in others:  # its container holds the image: gone first, so the image can go
            other.cleanup()
        stop_and_clean(agent)
        remove_refs([pushed] if pushed else [])
        if git is not None:
            git.stop()


def test_push_failure_fails_the_build_naming_the_registry(
        agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    # Nothing listens there: the engine cannot reach the registry.
    namespace = f"127.0.0.1:{free_port()}/pleacotest"
    agent = agent_factory("nopush", env={"PLEACO_BUILD_REGISTRY": namespace})
    git: GitServer | None = None
    try:
        git, commit, b = build_app(agent, tmp_path, "unpushed")
        assert b["state"] == "failed"
        assert b["reason"].startswith(f"push to registry {namespace} failed: "), b["reason"]
        assert b["pushed"] == "" and b["test"]["exit_code"] == 0  # it passed its tests; the push failed
        app = agent.client.app("unpushed")
        assert app["revision"] == 0 and app["replicas"] == 0  # nothing released
    finally:
        stop_and_clean(agent)
        remove_refs([f"{namespace}/unpushed:{commit[:12]}"] if git is not None else [])
        if git is not None:
            git.stop()
