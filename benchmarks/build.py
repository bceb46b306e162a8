"""Build: push-to-serving for the sample app, against plain ``docker build`` + ``docker run``.

One pleaco agent (a process on a temporary data dir) with the sample app (examples/hello)
connected to a repository served by a local ``git daemon`` on 127.0.0.1, which stands in
for GitHub. A measurement:

- **pleaco**: the clock starts before ``git push``; then the webhook delivery (signed as
  GitHub signs it), and pleaco fetches the commit, builds the image (Docker Engine's build
  API), runs the app's tests in a container, scans the image, writes the release and the
  reconciler starts it. The clock stops when the new release's container answers ``GET /``
  with the text only this commit serves (the engine's events say when a container of the
  app starts; from then its published port is polled every 0.05 s).
- **baseline**: the same commit's files (``git archive``) built with ``docker build`` (the
  same classic builder, ``DOCKER_BUILDKIT=0``) and started with ``docker run -d -p``, the
  clock stopping the same way (its port read from the engine's API, then polled every
  0.05 s). No tests, no scan, no release bookkeeping.

"cold" is the app's first build: no per-app cache, no fetched history, and a serve.sh no
build has seen. "warm" is a later push changing serve.sh: the app's cache repository and
build cache exist. Each commit changes the served text (a nonce), so the last layer is
always rebuilt on both sides. pleaco and the baseline take turns within each round.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from benchmarks.common import (
    LOOPBACK,
    REPO,
    Agent,
    BenchError,
    Row,
    docker_cli,
    engine,
    free_port,
    log,
    median,
    require_image,
    wait_until,
)

GOAL = 1.3
SECRET = "bench-webhook-secret"
GIT_ENV = {"GIT_AUTHOR_NAME": "Bench", "GIT_AUTHOR_EMAIL": "bench@example.com", "GIT_COMMITTER_NAME": "Bench",
           "GIT_COMMITTER_EMAIL": "bench@example.com", "GIT_CONFIG_NOSYSTEM": "1"}


def git(*args: str, cwd: Path) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **GIT_ENV})
    if proc.returncode != 0:
        raise BenchError(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def answer(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/", timeout=1) as resp:
            return str(resp.read().decode())
    except OSError:
        return ""


def deliver(agent: Agent, url: str, before: str, after: str) -> None:
    payload = {"ref": "refs/heads/main", "before": before, "after": after, "created": False, "deleted": False,
               "repository": {"full_name": "bench/hello", "clone_url": url, "html_url": "https://github.com/bench/hello"}}
    body = json.dumps(payload, separators=(",", ":")).encode()
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    req = urllib.request.Request(agent.url + "/v1/hooks/github", data=body, method="POST", headers={
        "Content-Type": "application/json", "X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": sig})
    with urllib.request.urlopen(req, timeout=30) as resp:
        if resp.status != 202:
            raise BenchError(f"webhook answered {resp.status}: {resp.read()!r}")


class Bench:
    def __init__(self, workdir: Path, agent: Agent, git_port: int) -> None:
        self.workdir = workdir
        self.agent = agent
        self.git_port = git_port
        self.baseline_containers: list[str] = []
        self.baseline_images: list[str] = []
        self.pleaco_images: list[str] = []  # from the build records (images carry no node label)

    def new_repo(self, app: str) -> tuple[Path, str]:
        bare = self.workdir / "git" / f"{app}.git"
        subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True)
        url = f"git://{LOOPBACK}:{self.git_port}/{app}.git"
        work = self.workdir / "work" / app
        shutil.copytree(REPO / "examples" / "hello", work)
        git("init", "-q", "-b", "main", cwd=work)
        git("remote", "add", "origin", url, cwd=work)
        self.agent.client.connect(app, {"repo": url, "webhook_secret": SECRET})
        return work, url

    @staticmethod
    def change(work: Path) -> str:
        """Make serve.sh answer with a new nonce, and commit it."""
        nonce = uuid.uuid4().hex[:12]
        serve = work / "serve.sh"
        greeting = f'echo "hello from $(hostname) ({nonce})" > /www/index.html'
        lines = [greeting if line.startswith('echo "hello from') else line for line in serve.read_text().splitlines()]
        serve.write_text("\n".join(lines) + "\n")
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", f"nonce {nonce}", cwd=work)
        return nonce

    def pleaco(self, app: str, work: Path, url: str) -> dict[str, Any]:
        head = work / ".git" / "refs" / "heads" / "main"
        before = git("rev-parse", "HEAD", cwd=work) if head.exists() else "0" * 40
        nonce = self.change(work)
        commit = git("rev-parse", "HEAD", cwd=work)
        # The engine's events say when a container of the app starts (asked of the engine,
        # not the API, whose view lags by one reconcile pass); only then is its published
        # port polled, as the baseline polls its container's once `docker run` returns. No
        # polling of the engine while the pipeline runs: it would load the engine that is
        # building, which the baseline's build does not suffer.
        events = engine().events(decode=True, filters={
            "type": "container", "event": "start", "label": [f"pleaco.app={app}", f"pleaco.node={self.agent.node_id}"]})
        started: list[str] = []

        def read() -> None:
            with contextlib.suppress(Exception):  # closing the stream ends it with an error
                started.extend(str(e["id"]) for e in events)

        threading.Thread(target=read, daemon=True).start()
        ports: dict[str, int | None] = {}

        def serving() -> bool:
            for cid in list(started):
                if cid not in ports:
                    bound = (engine().inspect_container(cid)["NetworkSettings"]["Ports"] or {}).get("8080/tcp")
                    ports[cid] = int(bound[0]["HostPort"]) if bound else None
            return any(nonce in answer(p) for p in ports.values() if p)

        t0 = time.monotonic()
        try:
            git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=work)
            deliver(self.agent, url, before, commit)
            wait_until(serving, 180, f"{app} at {commit[:12]} to serve", interval=0.05)
            total = time.monotonic() - t0
        finally:
            with contextlib.suppress(Exception):
                events.close()
        b = self.agent.client.build(f"{app}-{commit[:12]}")
        if b["image"]:
            self.pleaco_images.append(b["image"])
        if b["state"] != "succeeded":
            raise BenchError(f"build {b['id']} {b['state']}: {b['reason']}")
        pipeline = (b["finished_ms"] - b["started_ms"]) / 1000
        return {"total_s": total, "steps": b["steps"], "pipeline_s": pipeline, "commit": commit}

    def baseline(self, work: Path) -> dict[str, Any]:
        nonce = self.change(work)
        ctx = self.workdir / f"ctx-{nonce}"
        ctx.mkdir()
        subprocess.run(f"git -C {work} archive HEAD | tar -x -C {ctx}", shell=True, check=True)
        tag = f"pleaco-bench-build/plain:{nonce}"
        t0 = time.monotonic()
        proc = subprocess.run(["docker", "build", "-q", "-t", tag, str(ctx)], capture_output=True, text=True,
                              env={**os.environ, "DOCKER_BUILDKIT": "0"}, timeout=300)
        if proc.returncode != 0:
            raise BenchError(f"docker build: {proc.stderr.strip()}")
        self.baseline_images.append(tag)
        built = time.monotonic() - t0
        cid = docker_cli("run", "-d", "--init", "-p", f"{LOOPBACK}::8080", tag).strip()
        self.baseline_containers.append(cid)
        # Its port asked of the engine's API, as the pleaco side does (not `docker port`, a
        # process start that would add some 0.04 s to the baseline).
        port = int(engine().inspect_container(cid)["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"])
        wait_until(lambda: nonce in answer(port), 60, "the plain container to serve", interval=0.05)
        total = time.monotonic() - t0
        shutil.rmtree(ctx, ignore_errors=True)
        return {"total_s": total, "build_s": built}

    def cleanup(self) -> None:
        for cid in self.baseline_containers:
            docker_cli("rm", "-f", cid, check=False)
        for tag in self.baseline_images:
            docker_cli("rmi", "-f", tag, check=False)
        for image in self.pleaco_images:  # by id, with force: every tag of it goes too
            with contextlib.suppress(Exception):
                engine().remove_image(image, force=True)


def run(opts: argparse.Namespace) -> list[Row]:
    require_image("pleaco/busybox:latest")
    workdir = Path(tempfile.mkdtemp(prefix="pleaco-bench-build-"))
    (workdir / "git").mkdir()
    git_port = free_port()
    daemon = subprocess.Popen(
        ["git", "daemon", "--reuseaddr", "--export-all", "--enable=receive-pack", f"--listen={LOOPBACK}",
         f"--port={git_port}", f"--base-path={workdir / 'git'}", str(workdir / "git")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples: dict[str, dict[str, list[dict[str, Any]]]] = {"cold": {"pleaco": [], "baseline": []},
                                                           "warm": {"pleaco": [], "baseline": []}}
    errors: list[str] = []
    bench: Bench | None = None
    try:
        with Agent(workdir, "bench-build") as agent:
            bench = Bench(workdir, agent, git_port)
            for rnd in range(opts.rounds):
                app = f"bench-build-{rnd}"
                try:
                    work, url = bench.new_repo(app)
                    base_work = workdir / "work" / f"plain-{rnd}"
                    shutil.copytree(REPO / "examples" / "hello", base_work)
                    git("init", "-q", "-b", "main", cwd=base_work)
                    order = ["pleaco", "baseline"] if rnd % 2 == 0 else ["baseline", "pleaco"]
                    for kind in ("cold", "warm"):
                        for system in order:
                            m = bench.pleaco(app, work, url) if system == "pleaco" else bench.baseline(base_work)
                            samples[kind][system].append(m)
                            log(f"build round {rnd + 1} {kind} {system}: {m['total_s']:.2f} s")
                    agent.client.remove(app)
                except BenchError as exc:
                    errors.append(str(exc))
                    log(f"build round {rnd + 1} FAILED: {exc}")
    finally:
        if bench is not None:
            bench.cleanup()
        daemon.terminate()
        with contextlib.suppress(Exception):
            daemon.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    rows = []
    for kind in ("cold", "warm"):
        p = median(m["total_s"] for m in samples[kind]["pleaco"])
        b = median(m["total_s"] for m in samples[kind]["baseline"])
        ratio = p / b if p and b else None
        rows.append(Row(
            benchmark=f"push to serving, {kind}", unit="s", pleaco=p, baseline=b,
            baseline_name="docker build + run", goal=f"<= {GOAL:.2f}x docker build + run",
            met=None if ratio is None else ratio <= GOAL,
            details={"samples": samples[kind], "errors": errors},
        ))
    return rows
