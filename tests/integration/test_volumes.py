"""Persistent volumes against real agents and Docker Engine: data written into an app's
volume survives a redeploy, an agent restart with its replicas gone (a node reboot) and a
replica kill; on two nodes every replica runs where the volume is, the other node's API
names the holding node, and the app says why it waits while that node is down; a snapshot
restored into another app's volume holds the data; ``apps rm`` keeps the volume, ``apps rm
--volumes`` removes it; bad input is refused and changes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from agentproc import REPO, AgentProcess, docker_client, form_cluster, node_containers, wait_for
from conftest import HELLO

from pleaco.api.errors import ApiError

Factory = Callable[..., AgentProcess]


def cli(agent: AgentProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pleaco", "--api", agent.url, "--token", agent.token, *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


def running(agent: AgentProcess, app: str) -> list[Any]:
    return node_containers(agent.node_id, app, all_states=False)


def sh(container_id: str, script: str) -> str:
    code, out = docker_client().containers.get(container_id).exec_run(["sh", "-c", script])
    assert code == 0, out
    return out.decode() if isinstance(out, bytes) else str(out)


def one_running(agent: AgentProcess, app: str, revision: int | None = None) -> str:
    """The id of the app's one running replica of ``revision`` (any, when None) on the agent's node."""
    labels = [f"pleaco.node={agent.node_id}", f"pleaco.app={app}"]
    labels += [f"pleaco.release={revision}"] if revision is not None else []

    def found() -> str | None:
        cs = docker_client().api.containers(filters={"label": labels})  # running ones only
        return str(cs[0]["Id"]) if len(cs) == 1 else None

    return wait_for(found, 60, f"one running replica of {app}" + (f" revision {revision}" if revision else ""))


def docker_volumes(agent: AgentProcess, app: str) -> list[str]:
    return [v.name for v in docker_client().volumes.list(filters={"label": [f"pleaco.node={agent.node_id}",
                                                                            f"pleaco.app={app}"]})]


def test_data_survives_redeploy_agent_restart_and_kill(agents: Factory) -> None:
    a = agents()
    done = cli(a, "apps", "deploy", "db", "--image", HELLO, "--port", "8080", "--volume", "data:/data")
    assert done.returncode == 0, done.stderr
    cid = one_running(a, "db", 1)
    sh(cid, "echo one >> /data/log")
    assert docker_volumes(a, "db") == [f"pleaco-db.data.{a.node_id[:12]}"]
    rec = json.loads(cli(a, "volumes", "ls", "--json").stdout)
    assert [(v["app"], v["volume"], v["node"], v["path"], v["state"]) for v in rec] == [
        ("db", "data", a.node_id, "/data", "in_use")]

    # A redeploy (a new revision): the new replica has the data.
    a.client.deploy("db", {"image": HELLO, "port": 8080, "env": {"V": "2"}, "volumes": ["data:/data"]})
    cid = one_running(a, "db", 2)
    assert sh(cid, "cat /data/log") == "one\n"
    sh(cid, "echo two >> /data/log")

    # The agent killed and its replicas gone with it (as after a reboot): made again, same data.
    a.kill()
    docker_client().containers.get(cid).remove(force=True)
    a.start()
    cid = one_running(a, "db", 2)
    assert sh(cid, "cat /data/log") == "one\ntwo\n"

    # A replica killed: restarted, data kept.
    docker_client().containers.get(cid).kill()
    wait_for(lambda: a.client.app("db")["instances"][0]["restarts"] >= 1 and a.client.app("db")["state"] == "running",
             60, "the killed replica restarted")
    assert sh(one_running(a, "db", 2), "cat /data/log") == "one\ntwo\n"


def test_two_nodes_replicas_follow_the_volume(agents: Factory) -> None:
    a, b = form_cluster(agents, 2)
    a.client.deploy("db", {"image": HELLO, "port": 8080, "replicas": 3, "volumes": ["data:/data"]})
    vol = wait_for(lambda: next(iter(a.client.volumes()), None), 30, "the volume claimed")
    holder, other = (a, b) if vol["node"] == a.node_id else (b, a)
    wait_for(lambda: len(running(holder, "db")) == 3, 60, "3 replicas on the holding node")
    assert running(other, "db") == []
    assert docker_volumes(other, "db") == []
    # Every node lists it alike, in use (the other from the holder's route records).
    wait_for(lambda: [v["state"] for v in other.client.volumes()] == ["in_use"], 30, "in use, seen from the other")
    # Snapshot asked of the other node: 409 naming the holder and its API address.
    done = cli(other, "volumes", "snapshot", "db", "data", "--out", str(holder.data_dir.parent / "x.tar"))
    assert done.returncode == 1
    assert f"on node {holder.data_dir.name}" in done.stderr and f"127.0.0.1:{holder.port}" in done.stderr
    assert not (holder.data_dir.parent / "x.tar").exists()

    # The holding node down: not started empty on the other, and it says why.
    holder.kill()
    app = wait_for(lambda: (x := other.client.app("db"))["state"] == "volume_unavailable" and x, 60,
                   "db waiting for its volume's node")
    assert f"on node {holder.node_id[:12]}, which is down" in app["message"]
    assert running(other, "db") == []
    with pytest.raises(ApiError) as info:
        other.client.request("GET", "/v1/volumes/db/data/snapshot")
    assert info.value.status == 409 and "which is down" in info.value.message
    # Back: it runs there again.
    holder.start()
    wait_for(lambda: other.client.app("db")["state"] == "running", 90, "db running again on its node")
    assert running(other, "db") == []


def test_snapshot_restore_rm_and_bad_input(agents: Factory, tmp_path: Path) -> None:
    a = agents()
    a.client.deploy("db", {"image": HELLO, "port": 8080, "volumes": ["data:/data"]})
    sh(one_running(a, "db"), "mkdir -p /data/sub && echo kept > /data/sub/file && echo top > /data/log")
    snap = tmp_path / "db.tar"
    done = cli(a, "volumes", "snapshot", "db", "data", "--out", str(snap))
    assert done.returncode == 0, done.stderr
    with tarfile.open(snap) as t:
        assert {"./log", "./sub/file"} <= set(t.getnames())

    # Restored into a new app's volume, filled before its first replica.
    a.client.deploy("copy", {"image": HELLO, "port": 8080, "replicas": 0, "volumes": ["store:/srv"]})
    not_tar = tmp_path / "notes.txt"
    not_tar.write_text("these are not the files you are looking for\n" * 50)
    done = cli(a, "volumes", "restore", "copy", "store", "--from", str(snap))
    assert done.returncode == 0, done.stderr
    # A file that is not a tar: a 400, and the content restored before stays as it was.
    done = cli(a, "volumes", "restore", "copy", "store", "--from", str(not_tar))
    assert done.returncode == 1 and "not a valid tar archive" in done.stderr, done.stderr
    a.client.scale("copy", 1)
    cid = one_running(a, "copy")
    assert sh(cid, "cat /srv/log /srv/sub/file") == "top\nkept\n"
    # Refused while a replica runs, and nothing changed.
    with pytest.raises(ApiError) as info:
        a.client.volume_restore("copy", "store", snap)
    assert info.value.status == 409 and "scale it to 0" in info.value.message

    # Bad input: nothing deployed, clear errors.
    done = cli(a, "apps", "deploy", "bad", "--image", HELLO, "--volume", "Data:/x")
    assert done.returncode == 1 and "volume name 'Data' is not valid" in done.stderr
    done = cli(a, "apps", "deploy", "bad", "--image", HELLO, "--volume", "data:relative")
    assert done.returncode == 1 and "not an absolute path" in done.stderr
    assert "bad" not in {x["name"] for x in a.client.apps()}
    done = cli(a, "volumes", "snapshot", "nope", "data", "--out", str(tmp_path / "n.tar"))
    assert done.returncode == 1 and "no such app" in done.stderr
    done = cli(a, "volumes", "snapshot", "db", "other", "--out", str(tmp_path / "n.tar"))
    assert done.returncode == 1 and "has no volume 'other'" in done.stderr

    # apps rm keeps the volume (orphaned); apps rm --volumes removes it.
    assert cli(a, "apps", "rm", "db").returncode == 0
    wait_for(lambda: running(a, "db") == [], 30, "db's replica removed")
    assert [(v["app"], v["state"]) for v in a.client.volumes() if v["app"] == "db"] == [("db", "orphaned")]
    assert docker_volumes(a, "db") == [f"pleaco-db.data.{a.node_id[:12]}"]
    done = cli(a, "apps", "rm", "copy", "--volumes")
    assert done.returncode == 0 and "removing its volumes: store" in done.stdout, done.stdout + done.stderr
    wait_for(lambda: docker_volumes(a, "copy") == [] and all(v["app"] != "copy" for v in a.client.volumes()),
             30, "copy's volume removed")
    assert docker_volumes(a, "db") != []
    # The orphan removed by name.
    assert cli(a, "volumes", "rm", "db", "data").returncode == 0
    wait_for(lambda: docker_volumes(a, "db") == [], 30, "db's orphaned volume removed")
    with pytest.raises(docker.errors.NotFound):
        docker_client().volumes.get(f"pleaco-db.data.{a.node_id[:12]}")
