"""Autoscale settings and resource limits against a real agent and Docker Engine: the API,
the CLI, `docker inspect`, and bad input refused with nothing changed."""

from __future__ import annotations

import json
from typing import Any

import pytest
from agentproc import AgentProcess
from conftest import HELLO
from test_api import raw
from test_cli import cli


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
    assert "windows 40s stable / 4s panic, to zero after 300s idle (no decisions yet)" in shown
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
