"""``pleaco.toml``: what an app repository tells pleaco about building, testing and running it.

Parsed with the standard library's tomllib. Every error names the table and field, and an
unknown table or field is an error too: a typo (``[tset]``, ``comand``) must not silently
turn the tests off.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from pleaco.apps import DNS_LABEL
from pleaco.cron import Cron, CronError
from pleaco.cron import parse as parse_cron
from pleaco.errors import InvalidInput
from pleaco.scale import AutoscalePolicy, PolicyError

FILENAME = "pleaco.toml"
SEVERITIES = ("none", "low", "medium", "high", "critical")
_ARG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
_HEALTH = re.compile(r"^/[\x21-\x7e]{0,1023}$")

# Every table and the fields it may hold.
SCHEMA: dict[str, frozenset[str]] = {
    "app": frozenset({"name", "compose"}),
    "build": frozenset({"dockerfile", "args"}),
    "test": frozenset({"command", "timeout"}),
    "run": frozenset({"port", "health", "replicas"}),
    # min, max and target_concurrency as DESIGN.md has them; the rest as `apps autoscale`.
    "scale": frozenset({"min", "max", "target_concurrency", "metric", "target", "stable_window", "panic_window",
                        "scale_to_zero_after"}),
    "scan": frozenset({"fail_on"}),
    # [jobs.NAME] tables, each with these fields (the names are the app's scheduled jobs).
    "jobs": frozenset({"cron", "command"}),
}


class ManifestError(InvalidInput, ValueError, code="invalid_manifest"):
    """pleaco.toml is missing or invalid; the message names the field."""


@dataclass(frozen=True)
class Manifest:
    name: str | None = None
    # False: a compose file in the repository is not pleaco's (one kept for local
    # development); the push builds and runs this manifest's app (pleaco.builds.stackbuild).
    compose: bool = True
    dockerfile: str = "Dockerfile"
    build_args: dict[str, str] = field(default_factory=dict)
    test_command: list[str] | None = None
    test_timeout: float | None = None
    port: int | None = None
    health: str | None = None
    replicas: int | None = None
    scale_min: int | None = None
    scale_max: int | None = None
    target_concurrency: int | None = None
    fail_on: str = "critical"
    # [scale] as the policy a release gives the app (None: the manifest has no [scale]).
    autoscale: AutoscalePolicy | None = None
    # [jobs.NAME]: the app's scheduled jobs from a release on, as (name, cron, command)
    # (pleaco/stacks/schedule.py); none: a release removes those an earlier one set.
    jobs: tuple[tuple[str, Cron, tuple[str, ...]], ...] = ()


def _int(table: str, name: str, value: Any, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ManifestError(f"{FILENAME}: [{table}] {name}: expected an integer {lo}..{hi}, got {value!r}")
    return value


def _str(table: str, name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{FILENAME}: [{table}] {name}: expected a non-empty string, got {value!r}")
    return value


def _policy(scale: dict[str, Any]) -> AutoscalePolicy:
    """The autoscale policy of a [scale] table, checked as `apps autoscale` checks one."""
    if "max" not in scale:
        raise ManifestError(f"{FILENAME}: [scale] max: missing (a [scale] table needs at least max)")
    fields: dict[str, Any] = {"min_replicas": scale.get("min", 1), "max_replicas": scale["max"]}
    if "target_concurrency" in scale:
        if scale.get("metric", "concurrency") != "concurrency" or "target" in scale:
            raise ManifestError(f"{FILENAME}: [scale] target_concurrency: give it, or metric and target, not both")
        fields |= {"metric": "concurrency", "target": scale["target_concurrency"]}
    names = {"metric": "metric", "target": "target", "stable_window": "stable_window",
             "panic_window": "panic_window", "scale_to_zero_after": "scale_to_zero_after"}
    fields |= {field: scale[key] for key, field in names.items() if key in scale}
    try:
        return AutoscalePolicy(**fields)
    except PolicyError as exc:
        key = {"min_replicas": "min", "max_replicas": "max"}.get(exc.field, exc.field)
        raise ManifestError(f"{FILENAME}: [scale] {key}: {str(exc).partition(': ')[2]}") from None


# Beside a compose file, pleaco.toml says how its services with ``build`` are built, tested
# and scanned; what runs, and from which Dockerfile, is the compose file's to say.
BESIDE_COMPOSE = {"run": "its services' ports, healthcheck and deploy.replicas say how they run",
                  "scale": "autoscale its services with `pleaco apps autoscale STACK-SERVICE`",
                  "jobs": "scheduled jobs are a pleaco.toml app's",
                  "build.dockerfile": "each service's build.dockerfile names its own"}


def parse(text: str, beside: str | None = None) -> Manifest:
    """Parse the text of a pleaco.toml, or raise ManifestError naming what is wrong.
    ``beside``: the compose file the repository also holds (pleaco.builds.stackbuild),
    which leaves pleaco.toml [app], [build] args, [test] and [scan] (BESIDE_COMPOSE)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{FILENAME}: not valid TOML: {exc}") from None
    if beside is not None:
        for key, instead in BESIDE_COMPOSE.items():
            table, _, name = key.partition(".")
            if table in data and (not name or (isinstance(data[table], dict) and name in data[table])):
                shown = f"[{table}] {name}" if name else f"[{table}]"
                raise ManifestError(f"{FILENAME}: {shown}: not used beside {beside} ({instead}); remove it, "
                                    f"or set [app] compose = false to build this app and leave {beside} aside")
    for table, value in data.items():
        if table not in SCHEMA:
            raise ManifestError(f"{FILENAME}: unknown table [{table}] (allowed: {', '.join(sorted(SCHEMA))})")
        if not isinstance(value, dict):
            raise ManifestError(f"{FILENAME}: {table}: expected a table [{table}]")
        if table == "jobs":
            continue  # its own tables: _jobs
        unknown = sorted(set(value) - SCHEMA[table])
        if unknown:
            raise ManifestError(
                f"{FILENAME}: [{table}] {unknown[0]}: unknown field (allowed: {', '.join(sorted(SCHEMA[table]))})"
            )
    app, build, test = data.get("app", {}), data.get("build", {}), data.get("test", {})
    run, scale, scan = data.get("run", {}), data.get("scale", {}), data.get("scan", {})
    out: dict[str, Any] = {}
    if "compose" in app:
        if not isinstance(app["compose"], bool):
            raise ManifestError(f"{FILENAME}: [app] compose: expected true or false, got {app['compose']!r}")
        out["compose"] = app["compose"]
    if "name" in app:
        out["name"] = _str("app", "name", app["name"])
    if "dockerfile" in build:
        dockerfile = _str("build", "dockerfile", build["dockerfile"])
        if dockerfile.startswith("/") or ".." in dockerfile.split("/"):
            raise ManifestError(f"{FILENAME}: [build] dockerfile: {dockerfile!r} must be a path inside the repository")
        out["dockerfile"] = dockerfile
    if "args" in build:
        args = build["args"]
        if not isinstance(args, dict):
            raise ManifestError(f"{FILENAME}: [build] args: expected a table of NAME = \"value\"")
        for k, v in args.items():
            if not _ARG_NAME.fullmatch(k) or not isinstance(v, str):
                raise ManifestError(f"{FILENAME}: [build] args: {k!r} must be a valid name with a string value")
        out["build_args"] = dict(args)
    if "command" in test:
        out["test_command"] = _command("[test]", test["command"])
    if "timeout" in test:
        out["test_timeout"] = float(_int("test", "timeout", test["timeout"], 1, 86400))
    if "port" in run:
        out["port"] = _int("run", "port", run["port"], 1, 65535)
    if "health" in run:
        health = run["health"]
        if not isinstance(health, str) or not _HEALTH.fullmatch(health):
            raise ManifestError(f"{FILENAME}: [run] health: {health!r} must be a path starting with '/'")
        if "port" not in run:
            raise ManifestError(f"{FILENAME}: [run] health: a health path needs a port")
        out["health"] = health
    if "replicas" in run:
        out["replicas"] = _int("run", "replicas", run["replicas"], 0, 1000)
    for name, key in (("min", "scale_min"), ("max", "scale_max"), ("target_concurrency", "target_concurrency")):
        if name in scale:
            out[key] = _int("scale", name, scale[name], 0 if name == "min" else 1, 100_000)
    if "scale_min" in out and "scale_max" in out and out["scale_min"] > out["scale_max"]:
        raise ManifestError(f"{FILENAME}: [scale] min: {out['scale_min']} is above max {out['scale_max']}")
    if scale:
        out["autoscale"] = _policy(scale)
    if "fail_on" in scan:
        fail_on = scan["fail_on"]
        if fail_on not in SEVERITIES:
            raise ManifestError(f"{FILENAME}: [scan] fail_on: expected one of {', '.join(SEVERITIES)}, got {fail_on!r}")
        out["fail_on"] = fail_on
    if "jobs" in data:
        out["jobs"] = _jobs(data["jobs"])
    return Manifest(**out)


def _command(where: str, cmd: Any) -> list[str]:
    """A command as a list of strings; a string runs under ``sh -c``."""
    if isinstance(cmd, str) and cmd:
        cmd = ["sh", "-c", cmd]
    if not isinstance(cmd, list) or not cmd or not all(isinstance(c, str) for c in cmd):
        raise ManifestError(f"{FILENAME}: {where} command: expected a list of strings or a string, got {cmd!r}")
    return list(cmd)


def _jobs(jobs: dict[str, Any]) -> tuple[tuple[str, Cron, tuple[str, ...]], ...]:
    """The [jobs.NAME] tables: a DNS-label name, a cron expression and a command each
    (the scheduler checks the command's size again when a release writes the schedules)."""
    out = []
    for name, job in sorted(jobs.items()):
        if not isinstance(job, dict):
            raise ManifestError(f"{FILENAME}: [jobs] {name}: expected a table [jobs.{name}] with cron and command")
        where = f"[jobs.{name}]"
        if not DNS_LABEL.fullmatch(name):
            raise ManifestError(f"{FILENAME}: {where}: job name {name!r} is not a DNS label (1-63 lower-case "
                                "letters, digits and '-', starting and ending with a letter or digit)")
        unknown = sorted(set(job) - SCHEMA["jobs"])
        if unknown:
            raise ManifestError(f"{FILENAME}: {where} {unknown[0]}: unknown field (allowed: cron, command)")
        try:
            cron = parse_cron(job.get("cron"))
        except CronError as exc:
            raise ManifestError(f"{FILENAME}: {where} {exc}") from None
        out.append((name, cron, tuple(_command(where, job.get("command")))))
    return tuple(out)
