"""The build pipeline end to end: a real git server, signed GitHub deliveries, real Docker
builds, tests in containers, the scan, and the release running and answering."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from agentproc import REPO, AgentProcess, docker_client, wait_for
from gitserver import AppRepo, GitServer, HttpGitServer, deliver, ping_payload, push_payload
from hostprobe import TOKEN, Listeners, host_addresses, probe_script

SECRET = "s3cret-for-tests"


@dataclass
class BuildEnv:
    agent: AgentProcess
    git: GitServer
    tmp: Path

    def repo(self, example: str, name: str | None = None) -> tuple[str, AppRepo]:
        """A fresh app name and a repository holding ``example``, connected to that app."""
        app = name or f"t{uuid.uuid4().hex[:6]}"
        url = self.git.create(app)
        repo = AppRepo.from_example(example, self.tmp / "work" / app, url)
        out = self.agent.client.connect(app, {"repo": url, "branch": "main", "webhook_secret": SECRET})
        assert out["webhook_secret"] == SECRET
        return app, repo

    def push(self, repo: AppRepo, message: str = "change", **kw: Any) -> str:
        commit = repo.commit_and_push(message, **kw)
        d = deliver(self.agent.url, SECRET, "push", push_payload(repo.url, repo.before, commit))
        assert d.status == 202, d.body
        return commit

    def build(self, app: str, commit: str) -> dict[str, Any]:
        return self.agent.client.build(f"{app}-{commit[:12]}")

    def wait_done(self, app: str, commit: str, timeout: float = 90) -> dict[str, Any]:
        def done() -> dict[str, Any] | None:
            b = self.build(app, commit)
            return b if b["state"] in ("succeeded", "failed", "cancelled") else None

        return wait_for(done, timeout, f"build of {app} at {commit[:12]} to finish")

    def log(self, build_id: str) -> str:
        return b"".join(self.agent.client.build_logs(build_id)).decode()


def stop_and_clean(agent: AgentProcess) -> None:
    """Stop the agent and remove its containers, its build containers and the images its
    builds made (found through its build records: images carry no node label)."""
    images: set[str] = set()
    with contextlib.suppress(Exception):
        images = {ref for b in agent.client.builds() for ref in (b["image"], b.get("pushed")) if ref}
    agent.cleanup()
    client = docker_client()
    for c in client.containers.list(all=True, filters={"label": f"pleaco.build-node={agent.node_id}"}):
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True)
    for ref in images:
        with contextlib.suppress(docker.errors.APIError):
            client.images.remove(ref, force=True)


@pytest.fixture
def env(agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> Iterator[BuildEnv]:
    git = GitServer(tmp_path / "git").start()
    agent = agent_factory(env={"PLEACO_BUILD_WEBHOOK_MAX_BODY_BYTES": "65536"})
    try:
        yield BuildEnv(agent, git, tmp_path)
    finally:
        stop_and_clean(agent)
        git.stop()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def test_push_builds_tests_scans_releases_and_serves(env: BuildEnv) -> None:
    app, repo = env.repo("hello")
    shown = env.agent.client.app(app)
    assert shown["replicas"] == 0  # connected, nothing built yet
    ping = deliver(env.agent.url, SECRET, "ping", ping_payload(repo.url))
    assert ping.status == 200 and ping.body["apps"] == [app]

    commit = env.push(repo, "first")
    b = env.wait_done(app, commit)
    assert b["state"] == "succeeded", (b["reason"], env.log(b["id"]))
    assert b["test"]["exit_code"] == 0 and "PASS: 2 tests" in b["test"]["output"]
    assert b["scan"]["scanner"] == "pleaco-osv" and b["scan"]["blocking"] == 0
    assert set(b["steps"]) == {"fetch", "build", "test", "scan"}
    assert b["release"] == 1 and b["image"].startswith("sha256:")
    release = env.agent.client.request("GET", f"/v1/apps/{app}")
    assert release["image"] == b["image"] and release["revision"] == 1

    def serving() -> str | None:
        a = env.agent.client.app(app)
        ports = [i["host_port"] for i in a["instances"] if i["healthy"] and i["release"] == 1]
        return get(f"http://127.0.0.1:{ports[0]}/") if ports else None

    assert "hello from" in wait_for(serving, 30, "the built app to serve")
    log = env.log(b["id"])
    assert "==> building" in log and "PASS: 2 tests" in log and "==> succeeded" in log
    metrics = env.agent.client._open("GET", "/metrics").read().decode()
    assert 'pleaco_builds_total{state="succeeded"} 1' in metrics
    assert 'pleaco_build_step_duration_seconds_count{step="test"} 1' in metrics

    # The same push again (a redelivery: the same signed body, a new delivery id) builds nothing.
    again = deliver(env.agent.url, SECRET, "push", push_payload(repo.url, repo.before, commit))
    assert again.status == 200 and again.body["builds"][0]["outcome"] == "duplicate_delivery"
    # A second commit: a new release with the new image; the first one is kept for rollback.
    second = env.push(repo, "second", change={"serve.sh": (repo.work / "serve.sh").read_text().replace(
        "GREETING:-pleaco", "GREETING:-v2")})
    b2 = env.wait_done(app, second)
    assert b2["state"] == "succeeded" and b2["release"] == 2, b2["reason"]
    assert "(v2)" in wait_for(lambda: (s := serving2(env, app)) and "(v2)" in s and s, 30, "release 2")
    env.agent.client.rollback(app)
    assert env.agent.client.app(app)["image"] == b["image"]


def serving2(env: BuildEnv, app: str) -> str | None:
    a = env.agent.client.app(app)
    ports = [i["host_port"] for i in a["instances"] if i["healthy"] and i["release"] == a["revision"]]
    return get(f"http://127.0.0.1:{ports[0]}/") if ports else None


def test_a_dockerfile_cannot_reach_the_hosts_services(env: BuildEnv) -> None:
    """A pushed Dockerfile whose RUN step connects to services on the host's addresses
    (loopback, the engine's docker0 gateway, where a bridge container reaches the host, the
    node's own): the agent's default build.network refuses it (the step would fail the
    build had it reached one)."""
    listeners = Listeners(host_addresses())
    try:
        app, repo = env.repo("hello")
        dockerfile = (repo.work / "Dockerfile").read_text()
        commit = env.push(repo, "probe", change={"Dockerfile": dockerfile.replace(
            "COPY ", f"RUN {probe_script(listeners.targets())} | tee /probe; ! grep -q reached /probe\nCOPY ", 1)})
        b = env.wait_done(app, commit)
        log = env.log(b["id"])
        assert b["state"] == "succeeded", (b["reason"], log)
        for target in listeners.targets():
            assert f"refused {target}" in log, log
        assert TOKEN not in log and listeners.peers == []
    finally:
        listeners.close()


def test_failing_tests_block_the_release(env: BuildEnv) -> None:
    app, repo = env.repo("failing-tests")
    commit = env.push(repo)
    b = env.wait_done(app, commit)
    assert b["state"] == "failed" and b["reason"] == "tests failed (exit code 3)"
    assert "expected 4, got 5" in b["test"]["output"] and "expected 4, got 5" in env.log(b["id"])
    assert env.agent.client.app(app)["revision"] == 0  # never released
    assert not [c for c in docker_client().containers.list(all=True, filters={"label": "pleaco.build-role"})
                if c.labels.get("pleaco.build-node") == env.agent.node_id]


def test_broken_dockerfile_fails_the_build_and_keeps_the_log(env: BuildEnv) -> None:
    app, repo = env.repo("broken-dockerfile")
    commit = env.push(repo)
    b = env.wait_done(app, commit)
    assert b["state"] == "failed" and "returned a non-zero code: 7" in b["reason"], b["reason"]
    log = env.log(b["id"])
    assert "compiling..." in log and "==> failed" in log
    assert b["image"] == "" and env.agent.client.app(app)["revision"] == 0


def test_scan_blocks_a_vulnerable_image(env: BuildEnv) -> None:
    imported = subprocess.run(
        [sys.executable, "-m", "pleaco", "vulndb", "import", str(REPO / "examples/vulnerable/osv-advisories.json"),
         "--data-dir", str(env.agent.data_dir)], capture_output=True, text=True, cwd=REPO, timeout=30)
    assert imported.returncode == 0 and "imported 3 advisories" in imported.stdout, imported.stderr
    app, repo = env.repo("vulnerable")
    commit = env.push(repo)
    b = env.wait_done(app, commit)
    assert b["state"] == "failed" and "PLEACO-TEST-2026-0001" in b["reason"], b["reason"]
    found = {(f["id"], f["package"], f["installed"], f["fixed"], f["severity"]) for f in b["scan"]["findings"]}
    assert found == {("PLEACO-TEST-2026-0001", "insecure-foo", "1.0", "1.2", "critical"),
                     ("PLEACO-TEST-2026-0002", "libfake1", "1.2.3-1", "1.2.3-2", "low")}
    assert b["scan"]["blocking"] == 1 and env.agent.client.app(app)["revision"] == 0


def test_webhook_rejects_bad_input_and_builds_nothing(env: BuildEnv) -> None:
    app, repo = env.repo("hello")
    commit = repo.commit_and_push("first")
    payload = push_payload(repo.url, repo.before, commit)
    assert deliver(env.agent.url, None, "push", payload).status == 401
    bad = deliver(env.agent.url, "wrong-secret", "push", payload)
    assert bad.status == 401 and bad.body["error"]["code"] == "unauthorized"
    assert deliver(env.agent.url, None, "push", payload, signature="sha256=zz").status == 401
    # Signed, but not even JSON: the signature is checked first, then the parse fails.
    assert deliver(env.agent.url, SECRET, "push", b"{not json").status == 400
    huge = dict(payload, padding="x" * 70000)
    assert deliver(env.agent.url, SECRET, "push", huge).status == 413
    unknown = deliver(env.agent.url, SECRET, "push", push_payload("git://elsewhere/x.git", repo.before, commit))
    assert unknown.status == 404 and unknown.body["error"]["code"] == "unknown_repository"
    assert env.agent.client.builds(app) == []
    # Acknowledged and ignored: another branch, a deleted branch, a tag, another event.
    for p, event in [(push_payload(repo.url, repo.before, commit, branch="dev"), "push"),
                     (push_payload(repo.url, commit, "0" * 40, deleted=True), "push"),
                     (push_payload(repo.url, repo.before, commit, ref="refs/tags/v1"), "push"),
                     (dict(payload, action="opened"), "pull_request")]:
        d = deliver(env.agent.url, SECRET, event, p)
        assert d.status == 200 and "ignored" in d.body, d.body
    assert env.agent.client.builds(app) == []
    # The same delivery twice builds once.
    first = deliver(env.agent.url, SECRET, "push", payload, delivery="d-1")
    assert first.status == 202
    again = deliver(env.agent.url, SECRET, "push", payload, delivery="d-1")
    assert again.status == 200 and again.body["builds"][0]["outcome"] == "duplicate_delivery"
    assert len(env.agent.client.builds(app)) == 1
    env.wait_done(app, commit)


def test_manifest_problems_fail_the_build_naming_the_field(env: BuildEnv) -> None:
    app, repo = env.repo("hello")
    bad = (repo.work / "pleaco.toml").read_text().replace("port = 8080", "port = 80800")
    commit = env.push(repo, change={"pleaco.toml": bad})
    b = env.wait_done(app, commit)
    assert b["state"] == "failed" and b["reason"].startswith("pleaco.toml: [run] port:"), b["reason"]
    (repo.work / "pleaco.toml").unlink()
    commit = env.push(repo, "no manifest")
    b = env.wait_done(app, commit)
    assert b["state"] == "failed" and "no pleaco.toml" in b["reason"]


def test_newest_commit_wins(env: BuildEnv) -> None:
    app, repo = env.repo("hello")
    slow = (repo.work / "Dockerfile").read_text().replace("COPY serve.sh", "RUN sleep 30\nCOPY serve.sh")
    first = env.push(repo, "slow", change={"Dockerfile": slow})
    wait_for(lambda: env.build(app, first)["state"] == "building", 30, "the first build to start building")
    second = env.push(repo, "fast", change={"Dockerfile": slow.replace("RUN sleep 30\n", "")})
    b1 = env.wait_done(app, first, 30)
    assert b1["state"] == "cancelled" and b1["superseded_by"] == f"{app}-{second[:12]}", b1
    b2 = env.wait_done(app, second)
    assert b2["state"] == "succeeded" and b2["release"] == 1, b2["reason"]
    assert env.agent.client.app(app)["image"] == b2["image"]


def test_a_replayed_older_push_does_not_roll_the_app_back(env: BuildEnv) -> None:
    """GitHub signs the body, not the X-GitHub-Delivery header: a captured push of an older
    commit, sent again with a new delivery id, must not release that commit again."""
    app, repo = env.repo("hello")
    first = repo.commit_and_push("first")
    captured = push_payload(repo.url, repo.before, first)
    assert deliver(env.agent.url, SECRET, "push", captured).status == 202
    b1 = env.wait_done(app, first)
    assert b1["state"] == "succeeded", b1["reason"]
    second = env.push(repo, "second", change={"serve.sh": (repo.work / "serve.sh").read_text().replace(
        "GREETING:-pleaco", "GREETING:-v2")})
    b2 = env.wait_done(app, second)
    assert b2["state"] == "succeeded" and b2["release"] == 2 and b2["image"] != b1["image"], b2["reason"]

    replay = deliver(env.agent.url, SECRET, "push", captured, delivery=str(uuid.uuid4()))
    assert replay.status == 200, replay.body
    (result,) = replay.body["builds"]
    assert result["outcome"] == "stale_push" and result["released_commit"] == second, result
    assert f"older than commit {second[:12]}" in result["reason"] and "apps rollback" in result["reason"]
    shown = env.agent.client.app(app)
    assert shown["image"] == b2["image"] and shown["revision"] == 2
    assert env.build(app, first)["release"] == 1  # not released again


def test_build_resumes_after_agent_restart(env: BuildEnv) -> None:
    app, repo = env.repo("hello")
    slow = (repo.work / "Dockerfile").read_text().replace("COPY serve.sh", "RUN sleep 2\nCOPY serve.sh")
    commit = env.push(repo, "slow", change={"Dockerfile": slow})
    wait_for(lambda: env.build(app, commit)["state"] == "building", 30, "the build to start building")
    env.agent.kill()
    # What a dead agent can leave behind: a test container of its build.
    leftover = docker_client().containers.create(
        "pleaco/busybox:latest", ["sleep", "600"], labels={"pleaco.build": f"{app}-{commit[:12]}",
                                                           "pleaco.build-node": env.agent.node_id,
                                                           "pleaco.build-role": "test"})
    env.agent.start()
    b = env.wait_done(app, commit)
    assert b["state"] == "succeeded" and b["attempt"] == 2, b
    log = env.log(b["id"])
    assert log.count("==> build ") == 2 and "attempt 2" in log
    with pytest.raises(docker.errors.NotFound):
        leftover.reload()


def test_polling_fallback_builds_without_a_webhook(agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    git = GitServer(tmp_path / "git").start()
    agent = agent_factory("poller", env={"PLEACO_BUILD_POLL_INTERVAL": "0.5"})
    try:
        url = git.create("polled")
        repo = AppRepo.from_example("hello", tmp_path / "work", url)
        agent.client.connect("polled", {"repo": url})
        commit = repo.commit_and_push("first")
        b = wait_for(lambda: (b := agent.client.build(f"polled-{commit[:12]}"))["state"] == "succeeded" and b,
                     60, "the polled commit to build")
        assert b["trigger"] == "poll" and b["release"] == 1
    finally:
        stop_and_clean(agent)
        git.stop()


def test_cli_connect_builds_and_apps_show(env: BuildEnv, tmp_path: Path) -> None:
    url = env.git.create("clidemo")
    repo = AppRepo.from_example("hello", tmp_path / "cli-work", url)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cli_env = {"PLEACO_API": env.agent.url, "PLEACO_TOKEN": env.agent.token, "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, "-m", "pleaco", *args], capture_output=True, text=True, cwd=REPO,
                              env=cli_env, timeout=60)

    out = cli("apps", "connect", "clidemo", "--repo", url, "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["webhook_url"] == env.agent.url + "/v1/hooks/github" and len(info["webhook_secret"]) >= 20
    assert info["app_created"] is True and info["branch"] == "main"
    bad = cli("apps", "connect", "clidemo", "--repo", url, "--branch", "a..b")
    assert bad.returncode == 1 and "branch" in bad.stderr
    commit = repo.commit_and_push("first")
    d = deliver(env.agent.url, info["webhook_secret"], "push", push_payload(url, repo.before, commit))
    assert d.status == 202
    follow = cli("builds", "logs", f"clidemo-{commit[:12]}", "--follow")
    assert follow.returncode == 0 and "==> succeeded" in follow.stdout, follow.stdout + follow.stderr
    table = cli("builds", "ls", "--app", "clidemo").stdout.splitlines()
    assert table[0].split()[:4] == ["ID", "APP", "COMMIT", "STATE"] and "succeeded" in table[1]
    show = cli("builds", "show", f"clidemo-{commit[:12]}").stdout
    assert "state      succeeded" in show and "exit code 0" in show
    app_show = cli("apps", "show", "clidemo").stdout
    assert f"clidemo-{commit[:12]} succeeded" in app_show
    assert json.loads(cli("apps", "show", "clidemo", "--json").stdout)["build"]["state"] == "succeeded"
    assert cli("builds", "show", "nope-123").returncode == 1


def test_private_repository_over_https_with_a_token(env: BuildEnv) -> None:
    token = "ghp_" + uuid.uuid4().hex
    http = HttpGitServer(env.git.root, token)
    try:
        app = f"t{uuid.uuid4().hex[:6]}"
        env.git.create(app)
        repo = AppRepo.from_example("hello", env.tmp / "work" / app, env.git.url(app))
        commit = repo.commit_and_push("first")  # pushed over git://, fetched over https
        url = http.url(app)
        out = env.agent.client.connect(app, {"repo": url, "webhook_secret": SECRET, "repo_token": token})
        assert out["private"] is True and token not in json.dumps(env.agent.client.builds())
        d = deliver(env.agent.url, SECRET, "push", push_payload(url, "0" * 40, commit))
        assert d.status == 202
        b = env.wait_done(app, commit)
        assert b["state"] == "succeeded", b["reason"]
        assert http.requests and all(ok for _, ok in http.requests)
        # Without the token the same server refuses, and the build says so.
        other = f"t{uuid.uuid4().hex[:6]}"
        env.agent.client.connect(other, {"repo": url, "webhook_secret": SECRET})
        d = deliver(env.agent.url, SECRET, "push", push_payload(url, "0" * 40, commit))
        assert d.status == 202
        failed = env.wait_done(other, commit)
        assert failed["state"] == "failed" and "git fetch failed" in failed["reason"], failed["reason"]
    finally:
        http.stop()


def test_trivy_on_path_is_used_instead(agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    # trivy is not installed here: a stand-in on PATH answers as `trivy image --format json` does.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    report = {"Results": [{"Type": "debian", "Vulnerabilities": [
        {"VulnerabilityID": "CVE-2099-0001", "PkgName": "busybox", "InstalledVersion": "1.35.0",
         "FixedVersion": "1.36.0", "Severity": "CRITICAL", "Title": "stand-in finding"}]}]}
    (bin_dir / "trivy").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/trivy-args\ncat <<'JSON'\n"
                                   f"{json.dumps(report)}\nJSON\n")
    (bin_dir / "trivy").chmod(0o755)
    git = GitServer(tmp_path / "git").start()
    agent = agent_factory("trivy", env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    try:
        url = git.create("scanned")
        repo = AppRepo.from_example("hello", tmp_path / "work", url)
        agent.client.connect("scanned", {"repo": url, "webhook_secret": SECRET})
        commit = repo.commit_and_push("first")
        assert deliver(agent.url, SECRET, "push", push_payload(url, "0" * 40, commit)).status == 202
        b = wait_for(lambda: (b := agent.client.build(f"scanned-{commit[:12]}"))["state"] in ("succeeded", "failed")
                     and b, 60, "the build to finish")
        assert b["state"] == "failed" and "CVE-2099-0001" in b["reason"], b["reason"]
        assert b["scan"]["scanner"] == "trivy" and b["scan"]["findings"][0]["fixed"] == "1.36.0"
        assert (tmp_path / "trivy-args").read_text().split()[-1] == b["image"]
    finally:
        stop_and_clean(agent)
        git.stop()
