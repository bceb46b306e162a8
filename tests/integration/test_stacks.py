"""Stacks from a compose file, end to end: the CLI reads the file, a real agent (network on,
on a test host with its own engine) deploys it, and the services reach each other by bare
service name from inside their containers, through the engine's embedded DNS, the DnsSearch
``STACK.internal`` and the agent's name server."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nethosts
import pytest
from agentproc import AgentProcess, wait_for
from conftest import BUSYBOX, HELLO

from pleaco.api.errors import ApiError
from pleaco.cli import main

POLL = 0.1
Factory = Callable[..., AgentProcess]

# Written as for Docker Compose: plain keys, plus x-pleaco for what Compose has no key for.
COMPOSE = f"""
services:
  web:
    image: {HELLO}
    ports: ["8080:8080"]
    environment: {{GREETING: stacks}}
    healthcheck:
      test: ["CMD", "wget", "-q", "-O-", "http://localhost:8080/healthz"]
    depends_on:
      kv: {{condition: service_healthy}}
    x-pleaco: {{host: shop.test}}
  kv:
    image: {BUSYBOX}
    entrypoint: [httpd]
    command: -f -p 7000 -h /etc
    expose: [7000]
    env_file: kv.env
"""


def cli(agent: AgentProcess, *args: str) -> int:
    return main(["--api", agent.url, "--token", agent.token, *args])


def replica(h: nethosts.EngineHost, app: str) -> Any:
    """The one running container of ``app`` on the host's engine, or None."""
    found = h.docker().containers.list(filters={"label": f"pleaco.app={app}"})
    return found[0] if len(found) == 1 else None


def all_healthy(agent: AgentProcess, stack: str) -> dict[str, dict[str, Any]]:
    shown = agent.client.request("GET", f"/v1/stacks/{stack}")
    return {s["service"]: s for s in shown["services"]}


def settled(agent: AgentProcess, services: set[str]) -> bool:
    found = all_healthy(agent, "st")
    return set(found) == services and all(s["state"] == "running" for s in found.values())


def test_a_stack_from_a_compose_file(agent_factory: Factory, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    compose = tmp_path / "compose.yaml"
    compose.write_text(COMPOSE)
    (tmp_path / "kv.env").write_text("ROLE=store\n")
    with nethosts.engine_hosts(1, "sk", 79) as [h]:
        agent = agent_factory("n0", host=h.ip, prefix=h.prefix, env={**h.env, "PLEACO_NETWORK_ENABLED": "true"})
        assert cli(agent, "stack", "deploy", "st", "-f", str(compose)) == 0, capsys.readouterr().err
        wait_for(lambda: settled(agent, {"web", "kv"}), 40, "both services running", interval=POLL)
        web, kv = replica(h, "st-web"), replica(h, "st-kv")
        assert web is not None and kv is not None
        assert web.attrs["HostConfig"]["DnsSearch"] == ["st.internal"]
        assert kv.attrs["Config"]["Entrypoint"] == ["httpd"]
        assert kv.attrs["Config"]["Cmd"] == ["-f", "-p", "7000", "-h", "/etc"]
        assert "ROLE=store" in kv.attrs["Config"]["Env"]  # from the env_file, read by the CLI
        kv_ip = kv.attrs["NetworkSettings"]["Networks"]["pleaco"]["IPAddress"]

        # The web service finds kv by its bare name, and reaches it there.
        def lookup() -> list[str]:
            _, out = web.exec_run(["nslookup", "-type=a", "kv"])
            return re.findall(r"Name:\s*kv\.st\.internal\s+Address:\s*([0-9.]+)", out.decode(errors="replace"))

        assert wait_for(lookup, 20, "kv from web", interval=POLL) == [kv_ip]
        code, out = web.exec_run(["wget", "-q", "-O-", f"http://{kv_ip}:7000/hostname"])
        assert code == 0 and out.decode().strip() == kv.attrs["Config"]["Hostname"]

        # Redeploy with kv changed: kv rolls, web keeps its revision and its container.
        (tmp_path / "kv.env").write_text("ROLE=store\nGEN=2\n")
        capsys.readouterr()
        assert cli(agent, "stack", "deploy", "st", "-f", str(compose), "--json") == 0
        result = {s["service"]: s for s in json.loads(capsys.readouterr().out)["services"]}
        assert (result["kv"]["revision"], result["kv"]["changed"]) == (2, True)
        assert (result["web"]["revision"], result["web"]["changed"]) == (1, False)
        wait_for(lambda: settled(agent, {"web", "kv"}) and all_healthy(agent, "st")["kv"]["revision"] == 2
                 and (c := replica(h, "st-kv")) is not None and c.id != kv.id, 40, "kv rolled", interval=POLL)
        assert replica(h, "st-web").id == web.id  # type: ignore[union-attr]

        # Bad input changes nothing: a key pleaco does not run, a cycle, an env_file missing.
        before = agent.client.request("GET", "/v1/stacks")
        for bad in (COMPOSE.replace("    expose: [7000]", "    expose: [7000]\n    privileged: true"),
                    COMPOSE.replace("    expose: [7000]", "    expose: [7000]\n    depends_on: [web]"),
                    COMPOSE.replace("kv.env", "missing.env")):
            compose.write_text(bad)
            capsys.readouterr()
            assert cli(agent, "stack", "deploy", "st", "-f", str(compose)) != 0
            err = capsys.readouterr().err
            assert re.search(r"services\.kv\.privileged|depends_on has a cycle|services\.kv\.env_file", err), err
        # The server checks what any client sends, with the same errors.
        with pytest.raises(ApiError) as info:
            agent.client.request("PUT", "/v1/stacks/st", {"compose": {"services": {
                "kv": {"image": BUSYBOX, "privileged": True}}}})
        assert info.value.status == 400 and info.value.message.startswith("services.kv.privileged: ")
        assert agent.client.request("GET", "/v1/stacks") == before
        assert replica(h, "st-kv").id != kv.id and replica(h, "st-web").id == web.id  # type: ignore[union-attr]

        # A service dropped from the file is removed; the other stays as it was.
        web_only = COMPOSE.split("  kv:")[0].replace("    depends_on:\n      kv: {condition: service_healthy}\n", "")
        compose.write_text(web_only)
        assert cli(agent, "stack", "deploy", "st", "-f", str(compose)) == 0
        wait_for(lambda: replica(h, "st-kv") is None and set(all_healthy(agent, "st")) == {"web"}, 30,
                 "kv removed", interval=POLL)
        assert replica(h, "st-web").id == web.id  # type: ignore[union-attr]

        # stack rm removes exactly its apps.
        agent.client.deploy("plain", {"image": BUSYBOX, "replicas": 0})
        assert cli(agent, "stack", "rm", "st") == 0
        assert [a["name"] for a in agent.client.apps()] == ["plain"]
        wait_for(lambda: replica(h, "st-web") is None, 30, "web removed", interval=POLL)
        assert cli(agent, "stack", "show", "st") == 1
