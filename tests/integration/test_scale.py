"""Autoscale settings and resource limits against a real agent and Docker Engine: the API,
the CLI, `docker inspect`, and bad input refused with nothing changed."""

from __future__ import annotations

import contextlib
import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import docker.errors
import pytest
from agentproc import AgentProcess, docker_client, form_cluster, node_containers, wait_for
from conftest import BUSYBOX, HELLO
from test_api import raw
from test_cli import cli

from pleaco.cluster.service import total_memory


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# -- autoscale settings -------------------------------------------------------------------

def test_autoscale_through_the_api_set_shown_and_off(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 1})
    status, app = raw(agent, "PUT", "/v1/apps/web/autoscale",
                      body(min_replicas=2, max_replicas=6, metric="rps", target=150, stable_window=30))
    assert status == 200, app
    assert app["autoscale"] == {"min_replicas": 2, "max_replicas": 6, "metric": "rps", "target": 150.0,
                                "stable_window": 30.0, "panic_window": 6.0, "panic_threshold": 2.0,
                                "tolerance": 0.1, "scale_down_rate": 2.0, "scale_to_zero_after": None}
    assert app["replicas"] == 2  # moved into the range at once
    assert agent.client.app("web")["autoscale"]["metric"] == "rps"
    assert [a["autoscale"] for a in agent.client.apps()] == [app["autoscale"]]
    # POST sets too.
    status, app = raw(agent, "POST", "/v1/apps/web/autoscale", body(min_replicas=1, max_replicas=3))
    assert status == 200 and app["autoscale"]["max_replicas"] == 3 and app["replicas"] == 2
    status, app = raw(agent, "DELETE", "/v1/apps/web/autoscale")
    assert status == 200 and app["autoscale"] is None and app["replicas"] == 2


BAD_AUTOSCALE = [
    (body(min_replicas=5, max_replicas=2), "min_replicas: 5 is above max_replicas 2"),
    (body(min_replicas=1, max_replicas=4, target=-1), "target: must be greater than 0"),
    (b'{"min_replicas": 1, "max_replicas": 4, "target": NaN}', "target: must be a finite number"),
    (b'{"min_replicas": 1, "max_replicas": 4, "target": Infinity}', "target: must be a finite number"),
    (body(min_replicas=1, max_replicas=4, metric="memory"), "metric: 'memory' is not one of"),
    (body(min_replicas=1, max_replicas=4, panic_window=120), "panic_window: 120 s is longer"),
    (body(min_replicas=1, max_replicas=101), "max_replicas: 101 is above this cluster's max_replicas"),
    (body(min_replicas=1), "max_replicas: missing"),
    (body(min_replicas=0, max_replicas=3), "min_replicas: 0 scales the app to zero"),
]


@pytest.mark.parametrize(("raw_body", "message"), BAD_AUTOSCALE)
def test_bad_autoscale_is_refused_and_changes_nothing(agent: AgentProcess, raw_body: bytes, message: str) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 1})
    raw(agent, "PUT", "/v1/apps/web/autoscale", body(min_replicas=1, max_replicas=4))
    before = agent.client.app("web")
    status, err = raw(agent, "PUT", "/v1/apps/web/autoscale", raw_body)
    assert status == 400, err
    assert message in err["error"]["message"]
    after = agent.client.app("web")
    assert after["autoscale"] == before["autoscale"] and after["replicas"] == before["replicas"]


def test_a_count_outside_the_autoscale_range_is_400_and_changes_nothing(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 2})
    raw(agent, "PUT", "/v1/apps/web/autoscale", body(min_replicas=2, max_replicas=4))
    before = agent.client.app("web")
    for method, path, fields in [("POST", "/v1/apps/web/scale", {"replicas": 5}),
                                 ("PUT", "/v1/apps/web", {"image": BUSYBOX, "replicas": 1}),
                                 ("PUT", "/v1/apps/web", {"image": BUSYBOX, "replicas": 9})]:
        status, err = raw(agent, method, path, body(**fields))
        assert status == 400, (path, err)
        assert "outside the app's autoscale range 2..4" in err["error"]["message"], err
    after = agent.client.app("web")
    assert (after["replicas"], after["revision"], after["image"]) == (before["replicas"], before["revision"], HELLO)
    cli_out = cli(agent, "apps", "scale", "web", "7")
    assert cli_out.returncode != 0 and "outside the app's autoscale range 2..4" in cli_out.stderr


def test_autoscale_of_a_missing_app_is_404(agent: AgentProcess) -> None:
    status, err = raw(agent, "PUT", "/v1/apps/nope/autoscale", body(min_replicas=1, max_replicas=2))
    assert status == 404 and err["error"]["code"] == "not_found"


def test_autoscale_cli(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 1})
    out = cli(agent, "apps", "autoscale", "web", "--min", "0", "--max", "5", "--metric", "concurrency",
              "--target", "20", "--stable-window", "40", "--panic-window", "4", "--scale-to-zero-after", "300")
    assert out.returncode == 0, out.stderr
    assert "autoscale 0..5 replicas, concurrency target 20 per replica" in out.stdout
    shown = cli(agent, "apps", "show", "web").stdout
    assert "windows 40s stable / 4s panic, to zero after 300s idle\n" in shown
    assert "decisions  (none yet)" in shown
    # Bad input: a clear message, exit code 1 or 2, and the policy as it was.
    for args, message in [
        (["--min", "4", "--max", "2"], "min_replicas: 4 is above max_replicas 2"),
        (["--min", "1", "--max", "2", "--target", "nan"], "target: must be a finite number"),
        (["--min", "1", "--max", "2", "--metric", "memory"], "invalid choice: 'memory'"),
        (["--min", "1"], "--min N and --max N are required"),
        (["--off", "--min", "1"], "--off takes no other option"),
        (["--min", "one", "--max", "2"], "invalid int value: 'one'"),
    ]:
        bad = cli(agent, "apps", "autoscale", "web", *args)
        assert bad.returncode != 0 and message in bad.stderr, (args, bad.stderr)
    assert agent.client.app("web")["autoscale"]["target"] == 20.0
    off = cli(agent, "apps", "autoscale", "web", "--off")
    assert off.returncode == 0 and "autoscaling off" in off.stdout
    assert agent.client.app("web")["autoscale"] is None
    assert "autoscale" not in cli(agent, "apps", "show", "web").stdout


# -- resource limits ----------------------------------------------------------------------

def inspect_limits(agent: AgentProcess, app: str) -> list[tuple[int, int, int]]:
    """(Memory, NanoCpus, PidsLimit) of each of the app's running containers, from Docker."""
    api = docker_client().api
    out = []
    for c in node_containers(agent.node_id, app, all_states=False):
        host = api.inspect_container(c.id)["HostConfig"]
        out.append((host["Memory"], host["NanoCpus"], host["PidsLimit"]))
    return out


def test_limits_reach_docker_and_show(agent: AgentProcess) -> None:
    out = cli(agent, "apps", "deploy", "web", "--image", HELLO, "--replicas", "2", "--port", "8080",
              "--health", "/healthz", "--memory", "64m", "--cpus", "0.5", "--pids", "50")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: agent.client.app("web")["healthy"] == 2, 60, "2 healthy replicas")
    assert inspect_limits(agent, "web") == [(64 << 20, 500_000_000, 50)] * 2
    # No swap on top of the memory limit: over it, the kernel kills, not swaps.
    [c, _] = node_containers(agent.node_id, "web", all_states=False)
    assert docker_client().api.inspect_container(c.id)["HostConfig"]["MemorySwap"] == 64 << 20
    shown = cli(agent, "apps", "show", "web").stdout
    assert "limits     memory 64m, cpus 0.5, pids 50" in shown
    app = agent.client.app("web")
    assert (app["memory"], app["cpus"], app["pids"]) == (64 << 20, 0.5, 50)


def test_default_limits_from_the_config(agent_factory: Any) -> None:
    agent = agent_factory(env={"PLEACO_APPS_MEMORY": "96m", "PLEACO_APPS_PIDS": "77"})
    agent.client.deploy("web", {"image": HELLO, "replicas": 1, "port": 8080})
    wait_for(lambda: inspect_limits(agent, "web"), 60, "a running replica")
    assert inspect_limits(agent, "web") == [(96 << 20, 0, 77)]


@pytest.fixture
def memhog() -> Iterator[str]:
    """An image that takes memory until it is killed (busybox's tail reading a file with
    no line end keeps the whole line)."""
    tag = f"pleaco-test/memhog:{uuid.uuid4().hex[:8]}"
    dockerfile = f'FROM {BUSYBOX}\nCMD ["tail", "/dev/zero"]\n'.encode()
    docker_client().images.build(fileobj=io.BytesIO(dockerfile), tag=tag, rm=True, network_mode="none")
    try:
        yield tag
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client().images.remove(tag, force=True)


def test_a_limit_too_small_for_the_app_says_out_of_memory(agent: AgentProcess, memhog: str) -> None:
    agent.client.deploy("hog", {"image": memhog, "replicas": 1, "memory": "8m"})
    # (The pass that sees the exit asks the engine why just after: poll for the reason.)
    app = wait_for(lambda: "out of memory" in (a := agent.client.app("hog"))["message"] and a, 60, "out of memory")
    assert app["state"] == "crashloop"
    # "exited: out of memory (limit 8m)", or, when Docker's OOMKilled flag lost its race
    # with the exit (most of the time for a replica killed at once), "exited: killed (exit
    # 137), likely out of memory (limit 8m)".
    assert app["message"].startswith("replica 0 exited: "), app["message"]
    assert "out of memory (limit 8m); restarted" in app["message"]
    shown = cli(agent, "apps", "show", "hog").stdout
    assert "out of memory (limit 8m)" in shown


BAD_LIMITS = [
    (["--memory", "-1"], "memory: '-1' is not a size"),
    (["--memory", "garbage"], "memory: 'garbage' is not a size"),
    (["--memory", "0"], "memory: '0' is below Docker's minimum of 6m"),
    (["--cpus", "0"], "cpus: 0.0 is out of range 0.01..1024"),
    (["--cpus", "-2"], "cpus: -2.0 is out of range"),
    (["--cpus", "nan"], "cpus: expected a number"),
    (["--cpus", "half"], "invalid float value: 'half'"),
    (["--pids", "0"], "pids: expected a whole number 1..4194304, got 0"),
    (["--pids", "-5"], "pids: expected a whole number"),
    (["--pids", "many"], "invalid int value: 'many'"),
]


def test_bad_limits_are_refused_and_change_nothing(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 1, "memory": "64m"})
    before = agent.client.app("web")
    for args, message in BAD_LIMITS:
        out = cli(agent, "apps", "deploy", "web", "--image", HELLO, *args)
        assert out.returncode != 0 and message in out.stderr, (args, out.stderr)
    for limits in ({"memory": -1}, {"memory": "0"}, {"cpus": 0}, {"pids": 0}, {"pids": True}):
        status, err = raw(agent, "PUT", "/v1/apps/web", body(image=HELLO, **limits))
        assert status == 400 and err["error"]["code"] == "invalid", (limits, err)
    after = agent.client.app("web")
    assert (after["revision"], after["memory"]) == (before["revision"], 64 << 20)


def test_a_limit_the_engine_refuses_is_named_in_the_status(agent: AgentProcess) -> None:
    agent.client.deploy("web", {"image": HELLO, "replicas": 1, "port": 8080, "cpus": 1000})
    app = wait_for(lambda: "cannot start" in (a := agent.client.app("web"))["message"] and a, 60, "the refusal")
    assert app["message"].startswith("replica 0 cannot start: docker engine: Range of CPUs is from 0.01 to "), app
    assert node_containers(agent.node_id, "web") == []


def test_a_cluster_places_no_more_than_each_nodes_memory_holds(agent_factory: Any) -> None:
    # Two nodes on this machine, each advertising its memory: a limit of 60 % of it lets
    # each node hold one replica, so of three one fits nowhere (and is not started).
    agents = form_cluster(agent_factory, 2)
    limit = (total_memory() * 6 // 10) >> 20 << 20
    agents[0].client.deploy("web", {"image": HELLO, "replicas": 3, "port": 8080, "health": "/healthz",
                                    "memory": limit})
    for a in agents:
        wait_for(lambda a=a: len(node_containers(a.node_id, "web", all_states=False)) == 1, 60,
                 "one replica on each node")
    expected = f"1 of 3 replicas fit on no node: each needs {limit >> 20}m of memory"
    for a in agents:
        wait_for(lambda a=a: expected in a.client.app("web")["message"], 30, "the unplaced replica named")
    assert sum(len(node_containers(a.node_id, "web")) for a in agents) == 2
