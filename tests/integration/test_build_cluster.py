"""Builds in a cluster: a push to any node is built by the app's owner, and its log is read
from any node (the owner streams it over the cluster's authenticated channel)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from agentproc import AgentProcess, form_cluster, wait_for
from gitserver import AppRepo, GitServer, deliver, push_payload
from test_build import SECRET, stop_and_clean

from pleaco.placement import app_owner

Factory = Callable[..., AgentProcess]


def test_the_owner_builds_and_any_node_shows_the_log(agent_factory: Factory, tmp_path: Path) -> None:
    git = GitServer(tmp_path / "git").start()
    agents = form_cluster(agent_factory, 2)
    try:
        app = f"t{uuid.uuid4().hex[:6]}"
        url = git.create(app)
        repo = AppRepo.from_example("hello", tmp_path / "work" / app, url)
        by_id = {a.node_id: a for a in agents}
        owner = by_id[app_owner(app, sorted(by_id))]
        other = next(a for a in agents if a is not owner)
        other.client.connect(app, {"repo": url, "branch": "main", "webhook_secret": SECRET})
        wait_for(lambda: owner.client.app(app) is not None, 20, "the connection on the owner")
        commit = repo.commit_and_push("first")
        # The push lands on the node that is not the owner.
        d = deliver(other.url, SECRET, "push", push_payload(repo.url, repo.before, commit))
        assert d.status == 202, d.body
        bid = f"{app}-{commit[:12]}"

        def finished() -> dict[str, object] | None:
            b = other.client.build(bid)
            return b if b["state"] in ("succeeded", "failed", "cancelled") else None

        b = wait_for(finished, 120, "the build to finish")
        assert b["node"] == owner.node_id and b["state"] == "succeeded", b
        here = b"".join(owner.client.build_logs(bid)).decode()
        assert "==> succeeded" in here
        # The other node has no log of its own: it streams the owner's, whole and followed.
        assert not (other.data_dir / "build" / "logs" / f"{bid}.log").exists()
        assert b"".join(other.client.build_logs(bid)).decode() == here
        assert b"".join(other.client.build_logs(bid, follow=True)).decode() == here
    finally:
        for a in agents:
            stop_and_clean(a)
        git.stop()
