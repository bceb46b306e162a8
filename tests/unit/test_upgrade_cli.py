"""The upgrade verbs against a scripted client: following a plan through its node's
restart (the API unreachable for a while) to done or failed, and the status table."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import pytest

from pleaco.api.errors import ApiError
from pleaco.cli import upgrade
from pleaco.cli.cluster import nodes as nodes_verb

PLAN = {"id": "p1", "version": "0.3.0", "order": ["a" * 32, "b" * 32], "origin": "b" * 32, "sha256": "f" * 64,
        "size": 18_000_000, "created_ms": 0}


def answer(status: str, states: list[str], versions: list[str], failed: str = "", reason: str = "") -> dict[str, Any]:
    nodes = [{"id": n, "name": f"n{i}", "state": s, "version": v, "phase": "",
              "reason": reason if s == "failed" else ""}
             for i, (n, s, v) in enumerate(zip(PLAN["order"], states, versions, strict=True))]
    return {"plan": PLAN, "status": status, "turn": "", "failed_node": failed, "reason": reason, "nodes": nodes}


class Scripted:
    """A client whose GETs of /v1/upgrade answer the script in turn (an exception is raised)."""

    def __init__(self, script: list[Any]) -> None:
        self.script: Iterator[Any] = iter(script)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        item = next(self.script)
        if isinstance(item, Exception):
            raise item
        return item


@pytest.fixture(autouse=True)
def no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upgrade, "POLL", 0.0)


def test_follow_waits_out_the_answering_nodes_restart_until_done(capsys: pytest.CaptureFixture[str]) -> None:
    down = ApiError(0, "unreachable", "cannot reach the pleaco API")
    client = Scripted([answer("running", ["upgrading", "waiting"], ["0.2.0", "0.2.0"]),
                       answer("running", ["done", "upgrading"], ["0.3.0", "0.2.0"]), down, down,
                       answer("done", ["done", "done"], ["0.3.0", "0.3.0"])])
    assert upgrade.follow(client, "p1", 60) == 0  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert out.count("does not answer") == 1  # said once per outage
    assert "n1: upgrading, running 0.2.0" in out and "n1: done, running 0.3.0" in out
    assert out.endswith("upgrade p1 done: every node runs 0.3.0\n")


def test_follow_reports_the_failed_node_and_its_reason(capsys: pytest.CaptureFixture[str]) -> None:
    client = Scripted([answer("failed", ["failed", "waiting"], ["0.2.0", "0.2.0"], "a" * 32,
                              "0.3.0 not healthy within 60 s: API does not answer")])
    assert upgrade.follow(client, "p1", 60) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert f"failed on node {'a' * 12}: 0.3.0 not healthy within 60 s" in err and "not upgraded" in err


def test_follow_stops_when_the_plan_is_replaced(capsys: pytest.CaptureFixture[str]) -> None:
    client = Scripted([{**answer("running", ["next", "waiting"], ["0.2.0", "0.2.0"]), "plan": {**PLAN, "id": "p2"}}])
    assert upgrade.follow(client, "p1", 60) == 1  # type: ignore[arg-type]
    assert "replaced" in capsys.readouterr().err


def test_status_prints_the_plan_and_a_row_per_node(capsys: pytest.CaptureFixture[str]) -> None:
    client = Scripted([answer("running", ["done", "next"], ["0.3.0", "0.2.0"]), {"plan": None, "nodes": []}])
    assert upgrade.status(client, argparse.Namespace(json=False)) == 0  # type: ignore[arg-type]
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "upgrade p1 to 0.3.0: running"
    assert out[2].split() == ["#", "ID", "NAME", "STATE", "VERSION", "PHASE", "REASON"]
    assert out[3].split() == ["1", "a" * 12, "n0", "done", "0.3.0", "-"]
    assert upgrade.status(client, argparse.Namespace(json=False)) == 0  # type: ignore[arg-type]
    assert capsys.readouterr().out == "no upgrade has been planned\n"


def test_nodes_shows_each_nodes_upgrade(capsys: pytest.CaptureFixture[str]) -> None:
    class Nodes:
        def nodes(self) -> list[dict[str, Any]]:
            base = {"state": "alive", "address": "127.0.0.1:7400", "last_seen": 0, "load": {"containers": 1}}
            return [{**base, "id": "a" * 32, "name": "n0", "version": "0.3.0",
                     "upgrade": {"plan": "p1", "phase": "confirmed", "version": "0.3.0", "reason": ""}},
                    {**base, "id": "b" * 32, "name": "n1", "version": "0.2.0", "upgrade": None}]

    assert nodes_verb(Nodes(), argparse.Namespace(json=False, nodes_verb=None)) == 0  # type: ignore[arg-type]
    lines = capsys.readouterr().out.splitlines()
    assert "UPGRADE" in lines[0].split()
    assert "confirmed 0.3.0" in lines[1] and lines[2].split()[5] == "-"
