"""Random bodies against a real agent's API: always a 4xx JSON error, never a 500, and
nothing changes. Seeded, so a failure reproduces."""

from __future__ import annotations

import json
import random
from typing import Any

from agentproc import AgentProcess
from conftest import HELLO
from test_api import raw


def random_json(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(8 if depth < 3 else 5)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 65535, 65536, 2**63, rng.randint(-10**6, 10**6), 1.5, float("1e308")])
    if choice == 3:
        return rng.choice(["", "web", "/healthz", "x" * 300, "\x00", "é", "a=b", HELLO, "../../etc"])
    if choice == 4:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(12)))
    if choice == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["image", "replicas", "port", "env", "health", "host", "x", ""]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def test_random_bodies_never_break_the_api(agent: AgentProcess) -> None:
    rng = random.Random(20261125)
    before = agent.client.status()["records"]
    statuses: dict[int, int] = {}
    for i in range(300):
        if i % 3 == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        else:
            value = random_json(rng)
            if isinstance(value, dict) and "image" in value:
                value["image"] = 42  # no deploy may succeed, so "nothing changed" is checkable
            body = json.dumps(value).encode()
        method, path = rng.choice(
            [("PUT", "/v1/apps/web"), ("POST", "/v1/apps/web/scale"), ("PUT", "/v1/apps/%00"),
             ("PUT", "/v1/apps/" + "a" * 70), ("DELETE", "/v1/apps/web")]
        )
        status, resp = raw(agent, method, path, body)
        statuses[status] = statuses.get(status, 0) + 1
        assert 400 <= status < 500, (method, path, body, status, resp)
        assert set(resp) == {"error"} and set(resp["error"]) == {"code", "message"}
        assert resp["error"]["message"]
    assert agent.client.status()["records"] == before
    assert agent.client.apps() == []
    assert statuses.get(400, 0) > 100
