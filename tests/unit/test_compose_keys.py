"""A compose key pleaco does not know (pleaco.stacks.compose): every mapping whose keys are
checked against a fixed set says so in one wording, naming the key's full path and the keys
it knows, in sorted order; and with several unknown keys, the first in sorted order."""

from __future__ import annotations

import re
from typing import Any

import pytest

from pleaco.stacks.compose import ComposeError, plan

MAX = 10
SERVICE_KEYS = ("build, command, depends_on, deploy, entrypoint, env_file, environment, expose, healthcheck, "
                "image, ports, restart, secrets, volumes, x-pleaco, x-pleaco-jobs")


def web(top: dict[str, Any] | None = None, **svc: Any) -> dict[str, Any]:
    """A one-service document (service ``web``, with a ``db`` to depend on), the service's
    keys and the top level's merged in."""
    return {"services": {"web": {"image": "pleaco/hello:latest", **svc}, "db": {"image": "pleaco/hello:latest"}},
            "volumes": {"data": None}, **(top or {})}


# (the document, the key's path in the error, the keys the error lists)
CHECKED: list[tuple[dict[str, Any], str, str]] = [
    (web({"networks": {}}), "networks", "name, secrets, services, version, volumes"),
    (web(privileged=True), "services.web.privileged", SERVICE_KEYS),
    (web(**{"x-pleaco-job": {}}), "services.web.x-pleaco-job", SERVICE_KEYS),
    (web(**{"x-pleaco": {"replicas": 2}}), "services.web.x-pleaco.replicas", "health, host, https"),
    (web(**{"x-pleaco-jobs": {"backup": {"cron": "* * * * *", "command": ["x"], "user": "root"}}}),
     "services.web.x-pleaco-jobs.backup.user", "command, cron"),
    (web({"secrets": {"db": {"driver": "x"}}}), "secrets.db.driver", "environment, external, file"),
    (web({"secrets": {"db": {"external": True}}}, secrets=[{"source": "db", "mode": "0440"}]),
     "services.web.secrets.mode", "source, target"),
    (web(volumes=[{"source": "data", "target": "/d", "read_only": True}]), "services.web.volumes.read_only",
     "source, target, type"),
    (web(ports=[{"target": 80, "ip": "0.0.0.0"}]), "services.web.ports.ip",
     "app_protocol, host_ip, mode, name, protocol, published, target"),
    (web(healthcheck={"tset": ["CMD", "true"]}), "services.web.healthcheck.tset",
     "disable, interval, retries, start_period, test, timeout"),
    (web(deploy={"mode": "global"}), "services.web.deploy.mode", "placement, replicas, resources"),
    (web(deploy={"resources": {"reservations": {}}}), "services.web.deploy.resources.reservations", "limits"),
    (web(deploy={"resources": {"limits": {"devices": []}}}), "services.web.deploy.resources.limits.devices",
     "cpus, memory, pids"),
    (web(deploy={"placement": {"preferences": []}}), "services.web.deploy.placement.preferences", "constraints"),
    (web(depends_on={"db": {"condition": "service_started", "restart": True}}),
     "services.web.depends_on.db.restart", "condition, required"),
]


def compose_error(document: dict[str, Any], builds: bool = False) -> str:
    with pytest.raises(ComposeError) as info:
        plan("st", document, MAX, builds=builds)
    return str(info.value)


def assert_unknown(message: str, path: str, known: str) -> None:
    pattern = rf"{re.escape(path)}: not supported by pleaco \(known: {re.escape(known)}(; [^()]+)?\)"
    assert re.fullmatch(pattern, message), message


@pytest.mark.parametrize(("document", "path", "known"), CHECKED, ids=[c[1] for c in CHECKED])
def test_an_unknown_key_names_its_path_and_the_known_keys(document: dict[str, Any], path: str, known: str) -> None:
    assert_unknown(compose_error(document), path, known)


def test_an_unknown_build_key_too() -> None:
    document = web(build={"context": ".", "target": "prod"})
    assert_unknown(compose_error(document, builds=True), "services.web.build.target", "args, context, dockerfile")


@pytest.mark.parametrize("document", [
    web(healthcheck={"zz": 1, "test": ["CMD", "true"], "aa": 1}),
    web(deploy={"zz": 1, "aa": 1}),
    web(**{"x-pleaco": {"zz": 1, "aa": 1}}),
    web(zz=1, aa=1),
])
def test_the_first_unknown_key_in_sorted_order_is_named(document: dict[str, Any]) -> None:
    # Inserted in reverse: the error does not depend on the file's order of keys.
    assert re.search(r"\.aa: not supported by pleaco \(known: ", compose_error(document))


def test_a_key_that_is_not_a_string_is_named_too() -> None:
    # YAML keys may be numbers (``1: x``) or booleans (``on: x``): sorted as text, with the rest.
    assert_unknown(compose_error(web(ports=[{"target": 80, 1: "a", "b": 2}])), "services.web.ports.1",
                   "app_protocol, host_ip, mode, name, protocol, published, target")
    assert_unknown(compose_error(web(healthcheck={True: 1, "test": ["CMD", "true"]})), "services.web.healthcheck.True",
                   "disable, interval, retries, start_period, test, timeout")
