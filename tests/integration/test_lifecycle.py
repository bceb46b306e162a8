"""The agent's life: restarts that adopt containers, SIGKILL mid-scale, crashes, a missing
image, an engine that goes away, and writes that survive a crash once acknowledged."""

from __future__ import annotations

import collections
import signal
import subprocess
from typing import Any

from agentproc import AgentProcess, docker_client, node_containers, wait_for
from conftest import BUSYBOX, HELLO
from engineproxy import SocketProxy


def replica_counts(agent: AgentProcess, app: str) -> collections.Counter[tuple[str, str]]:
    return collections.Counter(
        (c.attrs["Labels"]["pleaco.release"], c.attrs["Labels"]["pleaco.replica"])
        for c in node_containers(agent.node_id, app)
    )


def test_sigterm_leaves_containers_and_restart_adopts_them(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 3, "port": 8080, "health": "/healthz"})
    wait_for(lambda: agent.client.app("web")["healthy"] == 3, 30, "3 healthy replicas")
    before = {c.id: c.attrs["State"] for c in node_containers(agent.node_id, "web")}
    assert agent.stop(signal.SIGTERM) == 0
    assert "event=agent.stopped" in agent.log_path.read_text()
    # Containers are state, not children: still running with the agent gone.
    assert {c.id: c.attrs["State"] for c in node_containers(agent.node_id, "web")} == before
    assert set(before.values()) == {"running"}

    node_id = agent.node_id
    agent.start()
    assert agent.node_id == node_id, "the node id survives a restart"
    app = wait_for(lambda: (a := agent.client.app("web"))["healthy"] == 3 and a, 30, "adopted replicas healthy")
    assert {c.id for c in node_containers(agent.node_id, "web")} == set(before)
    assert all(i["restarts"] == 0 for i in app["instances"])
    started = docker_client().api.inspect_container(next(iter(before)))["State"]["StartedAt"]
    assert started == docker_client().api.inspect_container(next(iter(before)))["State"]["StartedAt"]
    log = agent.log_path.read_text().split("--- start 2 ---")[1]
    assert "replica.started" not in log and "replica.removed" not in log and "replica.restarted" not in log


def test_sigkill_while_scaling_to_20_gives_exactly_20(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 0, "port": 8080})
    agent.client.scale("web", 20)
    # Kill once some, but not all, of the replicas exist.
    wait_for(lambda: len(node_containers(agent.node_id, "web")) > 0, 30, "scale-up to begin", interval=0.02)
    agent.kill()
    at_kill = len(node_containers(agent.node_id, "web"))
    agent.start()

    def settled() -> bool:
        counts = replica_counts(agent, "web")
        running = node_containers(agent.node_id, "web", all_states=False)
        return len(counts) == 20 and len(running) == 20 and agent.client.app("web")["running"] == 20

    wait_for(settled, 90, "exactly 20 running replicas after the restart")
    counts = replica_counts(agent, "web")
    assert set(counts) == {("1", str(i)) for i in range(20)}
    assert all(n == 1 for n in counts.values()), f"duplicates: {counts} (killed with {at_kill} made)"
    app = agent.client.app("web")
    assert app["running"] == 20 and len(app["instances"]) == 20


def test_acknowledged_write_survives_sigkill(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 2, "port": 8080})
    agent.client.scale("web", 4)
    agent.kill()  # right after the acknowledgement
    agent.start()
    app = agent.client.app("web")
    assert app["replicas"] == 4 and app["image"] == HELLO


def test_crashing_replica_backs_off_exponentially(agent: AgentProcess) -> None:
    # busybox's default command (sh with no input) exits at once with code 0.
    agent.client.deploy("crash", {"image": BUSYBOX, "replicas": 1})

    def crashlooping() -> dict[str, Any] | None:
        app = agent.client.app("crash")
        inst = app["instances"]
        return app if app["state"] == "crashloop" and inst and inst[0]["restarts"] >= 3 else None

    app = wait_for(crashlooping, 40, "3 restarts with back-off")
    assert "exited with code 0" in app["message"] and "restarted" in app["message"]
    assert app["instances"][0]["last_exit_code"] == 0
    # The waits between attempts double: 1 s, 2 s, 4 s ... (log lines carry backoff_s).
    delays = [float(line.split("backoff_s=")[1].split()[0])
              for line in agent.log_path.read_text().splitlines() if "event=replica.crashed" in line]
    assert delays[:4] == [1.0, 2.0, 4.0, 8.0][: len(delays[:4])] and len(delays) >= 3
    # Only ever one container for the replica, restarted in place.
    assert len(node_containers(agent.node_id, "crash")) == 1


def test_missing_image_is_reported_and_recovers_once_present(agent: AgentProcess) -> None:
    image = f"pleaco-test/late-{agent.node_id[:8]}:1"
    client = docker_client()
    try:
        app = agent.client.deploy("late", {"image": image, "replicas": 2, "port": 8080})
        assert app["revision"] == 1
        shown = wait_for(lambda: (a := agent.client.app("late"))["state"] == "image_missing" and a, 20, "image_missing")
        assert image in shown["message"] and "not present" in shown["message"]
        # It does not spin: no container, and no start attempts beyond the first check.
        text = agent.log_path.read_text()
        assert text.count("event=image.missing") == 1
        assert node_containers(agent.node_id, "late") == []
        client.images.get(HELLO).tag(image)
        wait_for(lambda: agent.client.app("late")["running"] == 2, 30, "recovery once the image exists")
    finally:
        subprocess.run(["docker", "rmi", "--no-prune", image], capture_output=True)


def test_engine_down_api_answers_and_reconciling_resumes(agent_factory: Any, tmp_path: Any) -> None:
    proxy = SocketProxy(tmp_path / "docker.sock", "/var/run/docker.sock")
    proxy.start()
    try:
        agent = agent_factory(extra_args=["--docker-url", f"unix://{proxy.path}"])
        agent.client.deploy("web", {"image": HELLO, "replicas": 1, "port": 8080})
        wait_for(lambda: agent.client.app("web")["running"] == 1, 30, "1 running replica")

        proxy.stop()
        st = wait_for(lambda: (s := agent.client.status())["engine"]["reachable"] is False and s, 30, "unreachable")
        assert "unreachable" in st["engine"]["error"]
        assert agent.client.app("web")["state"] == "engine_unreachable"
        # Writes are still accepted while the engine is away.
        agent.client.scale("web", 2)

        proxy.start()
        wait_for(lambda: agent.client.status()["engine"]["reachable"], 30, "engine reachable again")
        wait_for(lambda: agent.client.app("web")["running"] == 2, 30, "scale applied after the engine returned")
    finally:
        proxy.stop()
