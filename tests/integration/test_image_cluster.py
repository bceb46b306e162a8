"""The system test: three nodes booted from the golden image (``make image``), configured
the way cloud-init configures a VM and nothing else, find each other over mDNS, form one
cluster, build an app pushed to a git server (standing in for GitHub), test it, scan it,
run it with three replicas behind every node's proxy; a node stopped leaves the app
answering; started again, it rejoins with the same identity."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agentproc import wait_for
from gitserver import AppRepo, GitServer, deliver, push_payload
from imagenodes import Node, image_nodes, image_present

from pleaco.api.errors import ApiError

# What cloud-init/mdns-lan.yaml writes, per node (its name; one secret for all).
SECRET = "system-test-bootstrap-secret"
HOOK_SECRET = "system-test-webhook-secret"
POLL = 0.5


def mdns_config(index: int, ip: str) -> str:
    return (f'name = "node{index + 1}"\ndiscovery = "mdns"\nbootstrap = "auto"\n'
            f'bootstrap_secret = "{SECRET}"\n')


def alive(node: Node) -> set[str]:
    try:
        return {n["id"] for n in node.client().nodes() if n["state"] == "alive"}
    except (OSError, ApiError):
        return set()


def through_proxy(node: Node, host: str) -> str | None:
    req = urllib.request.Request(f"http://{node.ip}/", headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.read().decode() if resp.status == 200 else None
    except (OSError, urllib.error.HTTPError):
        return None


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[Node], str]]:
    assert image_present(), "no pleaco/node image: `make image` builds it (`make test` does)"
    with image_nodes(3, "sy", 80, mdns_config) as (nodes, gateway):
        try:
            yield nodes, gateway
        except BaseException:
            for node in nodes:
                print(f"==== journal of {node.name} ====\n{node.journal(120)}")
            raise


def test_three_image_nodes_form_a_cluster_build_serve_and_survive_a_stop(
        cluster: tuple[list[Node], str], tmp_path: Path) -> None:
    nodes, gateway = cluster
    ids = wait_for(lambda: s if len(s := alive(nodes[0])) == 3 else None, 120,
                   "three image nodes in one cluster (mDNS, bootstrap = auto)", interval=POLL)
    wait_for(lambda: all(alive(n) == ids for n in nodes), 60, "every node seeing all three alive", interval=POLL)
    first_ids = {n.name: n.client().status()["node_id"] for n in nodes}

    git = GitServer(tmp_path / "git", host=gateway).start()
    try:
        app = f"s{uuid.uuid4().hex[:6]}"
        url = git.create(app)
        repo = AppRepo.from_example("hello", tmp_path / "work", url)
        client = nodes[1].client()
        client.connect(app, {"repo": url, "branch": "main", "webhook_secret": HOOK_SECRET})
        commit = repo.commit_and_push("first")
        # GitHub's webhook, to one node's API.
        hook = deliver(nodes[1].url, HOOK_SECRET, "push", push_payload(url, repo.before, commit))
        assert hook.status == 202, hook.body
        build = wait_for(lambda: (b := client.build(f"{app}-{commit[:12]}"))["state"] in ("succeeded", "failed")
                         and b, 240, f"the build of {app}", interval=POLL)
        assert build["state"] == "succeeded", build.get("reason")
        assert set(build["steps"]) >= {"fetch", "build", "test", "scan"}
        client.scale(app, 3)
        host = f"{app}.pleaco.internal"
        for node in nodes:
            body = wait_for(lambda node=node: through_proxy(node, host), 120,  # type: ignore[misc]
                            f"{app} answering through {node.name}'s proxy", interval=POLL)
            assert "hello from" in body
        wait_for(lambda: client.app(app)["healthy"] == 3, 60, "three healthy replicas", interval=POLL)

        # One node stops (a VM shut down): the app keeps answering through the others.
        stopped = nodes[2]
        stopped.container.stop(timeout=30)
        for node in nodes[:2]:
            wait_for(lambda node=node: through_proxy(node, host), 60,  # type: ignore[misc]
                     f"{app} answering through {node.name} with {stopped.name} down", interval=POLL)
        # Started again, it rejoins with the identity it made on its first boot.
        stopped.container.start()
        wait_for(lambda: alive(nodes[0]) == ids and alive(stopped) == ids, 120,
                 f"{stopped.name} back in the cluster", interval=POLL)
        assert stopped.client().status()["node_id"] == first_ids[stopped.name]
        wait_for(lambda: through_proxy(stopped, host), 120, f"{app} answering through {stopped.name} again",
                 interval=POLL)
    finally:
        git.stop()
