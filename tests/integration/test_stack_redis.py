"""A real stack from a compose file written for Docker Compose (examples/counter: a web
service and Debian's redis-server on a named volume, only ``x-pleaco`` pleaco's own),
end to end on a real agent with its own engine and the network on: the web service reaches
the store by its bare service name (redis-cli, a glibc client, through the container's
resolv.conf and the agent's name server), and the count it keeps there survives a
redeploy that replaces the store, an agent restart with the store's container gone (a node
reboot), and a kill of the store's replica; a snapshot of the volume restored into another
stack's new volume holds the count as it was when the snapshot was taken. The store's
healthcheck is the file's ``redis-cli ping``, run by the engine, and the web service waits
for it (``depends_on: condition: service_healthy``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker.errors
import nethosts
import pytest
from agentproc import REPO, AgentProcess, docker_client, wait_for
from conftest import BUSYBOX

from pleaco.cli import main

POLL = 0.1
EXAMPLE = REPO / "examples" / "counter" / "compose.yaml"
# Made by scripts/images.sh; the busybox image is the agent's volume helper (snapshots).
IMAGES = (BUSYBOX, "pleaco/redis:latest", "pleaco/counter-web:latest")
Factory = Callable[..., AgentProcess]


def cli(agent: AgentProcess, *args: str) -> int:
    return main(["--api", agent.url, "--token", agent.token, *args])


def replica(h: nethosts.EngineHost, app: str) -> Any:
    """The one running container of ``app`` on the host's engine, or None."""
    found = h.docker().containers.list(filters={"label": f"pleaco.app={app}"})
    return found[0] if len(found) == 1 else None


def hits(h: nethosts.EngineHost, stack: str, method: str = "GET") -> tuple[int, str]:
    """The web service's answer (status, body) at /cgi-bin/hits, over HTTP to its replica's
    address on the pleaco network, from the host it runs on."""
    web = replica(h, f"{stack}-web")
    if web is None:
        return 0, "no web replica"
    ip = web.attrs["NetworkSettings"]["Networks"]["pleaco"]["IPAddress"]
    done = h.sh("curl", "-sS", "--max-time", "10", "-X", method, "-w", "\n%{http_code}",
                f"http://{ip}:8080/cgi-bin/hits", check=False)
    body, _, code = done.stdout.rpartition("\n")
    return (int(code) if code.isdigit() else 0), body.strip() or done.stderr.strip()


def count(h: nethosts.EngineHost, stack: str) -> str:
    """The count, once the web service answers with one: it answers 502 while it cannot
    reach the store (the store restarting, its name not yet at its new address)."""
    return wait_for(lambda: (got := hits(h, stack))[0] == 200 and got[1], 60, f"{stack}'s count", interval=POLL)


def add_one(h: nethosts.EngineHost, stack: str) -> str:
    status, body = hits(h, stack, "POST")
    assert status == 200, body
    return body


def store_running(agent: AgentProcess, stack: str) -> bool:
    app = agent.client.app(f"{stack}-store")
    return app["state"] == "running" and int(app["healthy"]) >= 1


def test_counter_stack_keeps_its_data(agent_factory: Factory, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    for image in IMAGES:
        try:
            docker_client().images.get(image)
        except docker.errors.ImageNotFound:
            pytest.fail(f"{image} is missing: scripts/images.sh makes it from Debian's redis-server and "
                        "redis-tools (make apt installs them)", pytrace=False)
    text = EXAMPLE.read_text()
    assert "x-pleaco" in text and "redis-server --appendonly yes --dir /data" in text  # the file under test
    with nethosts.engine_hosts(1, "rd", 82, images=IMAGES) as [h]:
        agent = agent_factory("n0", host=h.ip, prefix=h.prefix, env={**h.env, "PLEACO_NETWORK_ENABLED": "true"})
        assert cli(agent, "stack", "deploy", "counter", "-f", str(EXAMPLE)) == 0, capsys.readouterr().err
        wait_for(lambda: store_running(agent, "counter") and agent.client.app("counter-web")["state"] == "running",
                 60, "the counter stack running", interval=POLL)
        store, web = replica(h, "counter-store"), replica(h, "counter-web")
        assert "REDIS_HOST=store" in web.attrs["Config"]["Env"]  # the store by its bare service name
        assert store.attrs["HostConfig"]["DnsSearch"] == ["counter.internal"]
        assert [m["Destination"] for m in store.attrs["Mounts"]] == ["/data"]
        # The store's healthcheck (redis-cli ping) is the engine's, and it says healthy.
        assert store.attrs["Config"]["Healthcheck"]["Test"] == ["CMD", "redis-cli", "ping"]
        assert agent.client.app("counter-store")["health_cmd"]["test"] == ["CMD", "redis-cli", "ping"]
        assert h.docker().api.inspect_container(store.id)["State"]["Health"]["Status"] == "healthy"
        # Web -> store by the bare service name: a count kept there.
        assert count(h, "counter") == "0"
        assert [add_one(h, "counter") for _ in range(3)] == ["1", "2", "3"]
        assert count(h, "counter") == "3"

        # A redeploy with the store changed: its container is replaced, web's is kept.
        changed = tmp_path / "compose.yaml"
        changed.write_text(text.replace("    command: redis-server", "    environment: {GEN: \"2\"}\n"
                                        "    command: redis-server", 1))
        capsys.readouterr()
        assert cli(agent, "stack", "deploy", "counter", "-f", str(changed), "--json") == 0
        result = {s["service"]: s for s in json.loads(capsys.readouterr().out)["services"]}
        assert (result["store"]["changed"], result["web"]["changed"]) == (True, False)
        wait_for(lambda: (c := replica(h, "counter-store")) is not None and c.id != store.id
                 and c.labels["pleaco.release"] == "2", 60, "the store replaced", interval=POLL)
        assert count(h, "counter") == "3"
        assert add_one(h, "counter") == "4"
        assert replica(h, "counter-web").id == web.id

        # The agent killed and the store's container gone with it (a node reboot): made
        # again by the agent started again, on the same volume.
        store = replica(h, "counter-store")
        agent.kill()
        store.remove(force=True)
        agent.start()
        wait_for(lambda: (c := replica(h, "counter-store")) is not None and c.id != store.id, 60,
                 "the store made again", interval=POLL)
        assert count(h, "counter") == "4"
        assert add_one(h, "counter") == "5"

        # The store's replica killed: restarted by the agent, the count kept.
        replica(h, "counter-store").kill()
        wait_for(lambda: agent.client.app("counter-store")["instances"][0]["restarts"] >= 1
                 and store_running(agent, "counter"), 60, "the killed store restarted", interval=POLL)
        assert count(h, "counter") == "5"

        # A snapshot, restored into the new volume of another stack's store before its
        # first replica; the first stack counts on, apart.
        snap = tmp_path / "data.tar"
        assert cli(agent, "volumes", "snapshot", "counter-store", "data", "--out", str(snap)) == 0, \
            capsys.readouterr().err
        assert add_one(h, "counter") == "6"
        copy = text.replace("counter.test", "copy.test")
        waiting = tmp_path / "copy-waiting.yaml"
        waiting.write_text(copy.replace("    restart: unless-stopped\n\nvolumes:",
                                        "    restart: unless-stopped\n    deploy: {replicas: 0}\n\nvolumes:", 1))
        assert "replicas: 0" in waiting.read_text()
        assert cli(agent, "stack", "deploy", "copy", "-f", str(waiting)) == 0, capsys.readouterr().err
        assert cli(agent, "volumes", "restore", "copy-store", "data", "--from", str(snap)) == 0, \
            capsys.readouterr().err
        running = tmp_path / "copy.yaml"
        running.write_text(waiting.read_text().replace("replicas: 0", "replicas: 1"))
        assert cli(agent, "stack", "deploy", "copy", "-f", str(running)) == 0, capsys.readouterr().err
        wait_for(lambda: store_running(agent, "copy"), 60, "the copy's store running", interval=POLL)
        assert count(h, "copy") == "5"
        assert count(h, "counter") == "6"
        volumes = {(v["app"], v["volume"]) for v in agent.client.volumes()}
        assert volumes == {("counter-store", "data"), ("copy-store", "data")}
