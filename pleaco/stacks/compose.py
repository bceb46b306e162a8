"""Compose files: what ``stack deploy`` reads, and the apps it makes of them.

Two halves, so that bad input from the CLI or from any other API client gets the same errors:

- ``load`` (the CLI; ``loads`` for a compose file in a repository's commit): parses the
  YAML (PyYAML's safe loader: no tags that build objects) and reads each service's
  ``env_file`` (relative to the compose file) into its ``environment``, as Compose does
  (``environment`` wins over the file). What it sends the API is the document as JSON,
  with no files left to read.
- ``plan`` (the server): checks the whole document and maps each service onto the deploy
  body of app ``STACK-SERVICE`` (pleaco.apps.validate_deploy checks each body as a plain
  deploy would). Anything pleaco does not support is an error naming the service and the
  key: nothing is silently ignored, and nothing is deployed (pleaco.stacks.service writes
  only once the plan is whole).

The mapping (plain Compose keys, and ``x-pleaco`` for what Compose has no key for):

- ``image``, ``command``, ``entrypoint`` (a string is split as a shell would, like Compose);
- ``build`` (``DIR``, or ``context``, ``dockerfile``, ``args``), only in a connected
  repository's compose file (``plan(builds=True)``): paths inside the repository; the build
  pipeline makes the image (pleaco.builds.stackbuild), which ``StackPlan.with_images`` puts
  in the service's body. ``stack deploy`` runs images, so there it is an error;
- ``environment`` (a map, or a list of ``KEY=VALUE``), ``env_file`` (read by the CLI);
- ``ports`` / ``expose``: the one container port of the service (the app's port): other
  services reach it there by name, and the node proxies route HTTP to it (the host name
  and HTTPS in ``x-pleaco: {host, https}``). A published host port has no meaning on
  pleaco (the proxy is the way in) and is accepted for files written for Compose;
- ``healthcheck``: ``disable: true`` or ``test: ["NONE"]``; a ``curl``/``wget`` of a path
  on localhost at the service's port without timings becomes the app's HTTP health path
  (as does ``x-pleaco: {health: /path}``), which pleaco probes; any other command (``CMD``
  or ``CMD-SHELL``, with ``interval``, ``timeout``, ``retries``, ``start_period``) is run
  by the engine in each replica (the app's ``health_cmd``, pleaco.healthcmd);
- ``depends_on`` (list or map, conditions ``service_started`` / ``service_healthy``): the
  deploy order, in waves; a service is deployed once those it depends on are healthy;
- ``deploy``: ``replicas``, ``resources.limits`` (``memory``, ``cpus``, ``pids``),
  ``placement.constraints`` (``node.labels.*`` only);
- ``restart``: ``always`` and ``unless-stopped`` say what pleaco does anyway (it restarts
  a replica that exits); any other policy is an error.

- ``volumes``: named volumes (``NAME:/path`` or ``{type: volume, source, target}``),
  declared in the top-level ``volumes``, become the app's volumes (pleaco.mounts).
  A volume belongs to one app on pleaco: one used by two services is an error, as are bind
  mounts, anonymous volumes, read-only mounts and volume options (driver, external).

- ``secrets`` (a list of names, or ``{source, target}``): each becomes a file secret of the
  app, ``/run/secrets/TARGET`` (the app secrets of pleaco.stacks.secrets: sealed, and a
  changed value rolls the replicas). The top-level ``secrets`` declares each: ``file: PATH``
  (read by the CLI, relative to the compose file, as ``env_file``) or ``environment: VAR``
  (read from the deploying CLI's environment): the values go to the API in the deploy
  body's ``secrets``, beside the document, never in it; ``external: true``: set beforehand
  on the service's app with ``pleaco secrets set APP KEY --mount file``. A repository's
  compose file (``plan(builds=True)``) has only ``external`` ones: a value there would be in
  the repository, and no CLI reads a file for it.
- ``x-pleaco-jobs``: ``{NAME: {cron, command}}``, scheduled jobs of the service's app
  (pleaco.stacks.schedule, source ``stack``); ``command`` a list, or a string split as
  ``command`` is.

Top level: ``services``; ``volumes``; ``secrets``; ``name`` (must be the stack's);
``version`` (obsolete in Compose too, which ignores it); ``x-*`` extension fields (for YAML
anchors, ignored as in Compose).
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pleaco import cron, errors
from pleaco.apps import ValidationError, validate_deploy, validate_name
from pleaco.healthcmd import TIMINGS as HEALTH_TIMINGS
from pleaco.healthcmd import HealthCommandError, parse_health_cmd
from pleaco.stacks.jobs import JobInputError
from pleaco.stacks.schedule import check_job
from pleaco.stacks.secrets import MAX_SECRET_BYTES, SECRETS_MOUNT, SecretInputError, validate_key, validate_value

# Compose accepts larger files, but a stack of services and its environment fits in far
# less, and the whole document goes to the API as one JSON body.
MAX_FILE_BYTES = 1 << 20
MAX_SERVICES = 100
SERVICE_KEYS = frozenset({"build", "image", "command", "entrypoint", "environment", "env_file", "ports", "expose",
                          "healthcheck", "depends_on", "deploy", "restart", "volumes", "secrets", "x-pleaco",
                          "x-pleaco-jobs"})
TOP_KEYS = frozenset({"services", "name", "version", "volumes", "secrets"})
# A top-level secret's one source; ``name`` (Compose's name of an external secret in the
# engine) has no meaning on pleaco, whose secrets belong to an app.
SECRET_SOURCES = ("file", "environment", "external")
# A service's long-form secret: ``uid``, ``gid`` and ``mode`` are refused by name (every
# secret file is the same read-only 0400 file, pleaco.stacks.secrets).
SERVICE_SECRET_KEYS = frozenset({"source", "target"})
VOLUME_KEYS = frozenset({"type", "source", "target"})
# A long-form port: pleaco takes the target (and TCP); the rest is accepted for files
# written for Compose, as a published host port is.
PORT_KEYS = frozenset({"target", "published", "protocol", "mode", "host_ip", "name", "app_protocol"})
JOB_KEYS = frozenset({"cron", "command"})
X_PLEACO_KEYS = frozenset({"host", "https", "health"})
BUILD_KEYS = frozenset({"context", "dockerfile", "args"})
# What a service with ``build`` runs until its build has made the image (StackPlan.with_images):
# only ever checked, never deployed.
PENDING_IMAGE = "pleaco-build/pending:none"
_ARG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")
DEPLOY_KEYS = frozenset({"replicas", "resources", "placement"})
RESOURCE_KEYS = frozenset({"limits"})
LIMIT_KEYS = frozenset({"memory", "cpus", "pids"})
PLACEMENT_KEYS = frozenset({"constraints"})
DEPENDS_KEYS = frozenset({"condition", "required"})
RESTART_POLICIES = ("always", "unless-stopped")
DEPENDS_CONDITIONS = ("service_started", "service_healthy")
_ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
# A port as Compose writes it: [[HOST_IP:]PUBLISHED:]TARGET[/PROTOCOL].
_PORT = re.compile(r"^(?:(?:\[?[0-9a-fA-F.:]*\]?:)?([0-9]{1,5})?:)?([0-9]{1,5})(?:/(tcp|udp|sctp))?$")
# A health check command that fetches a path on the container itself.
_HEALTH_URL = re.compile(r"^https?://(?:localhost|127\.0\.0\.1)(?::([0-9]{1,5}))?(/[^\s]*)?$")
_HEALTH_TOOLS = ("curl", "wget")
HEALTH_KEYS = frozenset({"test", "disable", *HEALTH_TIMINGS})
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(us|ms|s|m|h)")
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:us|ms|s|m|h))+")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class ComposeError(errors.InvalidInput, ValueError):
    """A compose file pleaco cannot deploy; the message names where (service and key)."""


def _only_known(where: str, keys: Iterable[Any], known: Iterable[str], hint: str | None = None) -> None:
    """Refuse a key of the mapping at ``where`` ("" for the top level) that is not one of
    ``known``: every such check says it the same way, with the key's full path and the keys
    pleaco knows there (``hint``: why, where that is not plain). With several, the first in
    sorted order is named, so the error does not depend on the file's order of keys; keys
    are compared as text, since YAML keys may also be numbers or booleans."""
    allowed = frozenset(known)
    unknown = sorted(str(k) for k in keys if not isinstance(k, str) or k not in allowed)
    if unknown:
        path = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ComposeError(f"{path}: not supported by pleaco (known: {', '.join(sorted(allowed))}"
                           f"{'; ' + hint if hint else ''})")


@dataclass(frozen=True)
class Build:
    """A service's ``build``: what the build pipeline makes its image from."""

    context: str  # a directory of the repository, "" for its root
    dockerfile: str  # relative to the context
    args: dict[str, str]


@dataclass(frozen=True)
class ServiceSecret:
    """One of a service's secrets: the file /run/secrets/TARGET of its app, from the
    top-level secret SOURCE."""

    source: str
    target: str  # the app secret's key (pleaco.stacks.secrets), its file name
    # The value (``file`` or ``environment``), or None for an ``external`` secret, set on
    # the app beforehand. Never in a repr: a plan may end up in a log or an error.
    value: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Job:
    """A scheduled job of a service's app (``x-pleaco-jobs``)."""

    name: str
    cron: cron.Cron
    command: tuple[str, ...]


@dataclass(frozen=True)
class Service:
    name: str  # the compose service name
    app: str  # STACK-SERVICE
    body: dict[str, Any]  # its deploy body (pleaco.apps.validate_deploy)
    depends_on: tuple[str, ...]
    build: Build | None = None  # its image is built from the repository (plan(builds=True))
    secrets: tuple[ServiceSecret, ...] = ()  # by target
    jobs: tuple[Job, ...] = ()  # by name


@dataclass(frozen=True)
class StackPlan:
    name: str
    services: tuple[Service, ...]  # in name order
    # The deploy order: each wave's services depend only on earlier waves'.
    waves: tuple[tuple[str, ...], ...]

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def with_images(self, images: Mapping[str, str]) -> StackPlan:
        """This plan with the images a build made for its services with ``build`` (by
        service name): what the build pipeline deploys."""
        missing = sorted(s.name for s in self.services if s.build is not None and s.name not in images)
        if missing:
            raise ValueError(f"no built image for services {', '.join(missing)}")
        services = tuple(replace(s, body={**s.body, "image": images[s.name]}) if s.build is not None else s
                         for s in self.services)
        return replace(self, services=services)


# -- the CLI's half ----------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    """The compose file at ``path`` as a JSON-able document, with each ``env_file`` read
    into its service's ``environment``. Raises ComposeError naming the file and what is wrong."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ComposeError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    return loads(raw, str(path), lambda name: (path.parent / name).read_text())


def read_secrets(doc: Mapping[str, Any], base: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The values of the top-level secrets given by ``file`` (relative to ``base``, the
    compose file's directory) or ``environment`` (a variable of ``environ``, the process's
    by default), by secret name: what ``stack deploy`` sends beside the document. Errors
    name the secret and its file or variable, never the value. ``external`` ones and
    anything malformed are left to ``plan``, which checks the whole document."""
    declared = doc.get("secrets")
    if not isinstance(declared, dict):
        return {}
    env = os.environ if environ is None else environ
    values: dict[str, str] = {}
    for name, spec in declared.items():
        if not isinstance(spec, dict):
            continue
        where = f"secrets.{name}"
        if isinstance(spec.get("file"), str):
            path = base / spec["file"]
            try:
                raw = path.read_bytes()
            except OSError as exc:
                raise ComposeError(f"{where}.file {spec['file']}: cannot read it: {exc.strerror or exc}") from None
            if len(raw) > MAX_SECRET_BYTES:
                raise ComposeError(f"{where}.file {spec['file']}: {len(raw)} bytes, over the limit of "
                                   f"{MAX_SECRET_BYTES} bytes of a secret")
            try:
                values[str(name)] = raw.decode()
            except UnicodeDecodeError:
                raise ComposeError(f"{where}.file {spec['file']}: not UTF-8 text") from None
        elif isinstance(spec.get("environment"), str):
            var = spec["environment"]
            if var not in env:
                raise ComposeError(f"{where}.environment: variable {var} is not set in this environment")
            values[str(name)] = env[var]
    return values


def loads(raw: bytes, where: str, read_text: Callable[[str], str]) -> dict[str, Any]:
    """The compose document in ``raw`` (the file ``where`` names), with each ``env_file``
    read by ``read_text`` (a name relative to the compose file; OSError or
    UnicodeDecodeError when it cannot be read) into its service's ``environment``."""
    if len(raw) > MAX_FILE_BYTES:
        raise ComposeError(f"{where}: {len(raw)} bytes, over the limit of {MAX_FILE_BYTES}")
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ComposeError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ComposeError(f"{where}: expected a mapping with 'services' at the top")
    services = doc.get("services")
    if isinstance(services, dict):
        for name, svc in services.items():
            if isinstance(svc, dict) and "env_file" in svc:
                services[name] = _read_env_files(read_text, str(name), svc)
    return doc


def _read_env_files(read_text: Callable[[str], str], service: str, svc: dict[str, Any]) -> dict[str, Any]:
    files = svc["env_file"]
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ComposeError(f"services.{service}.env_file: expected a file name or a list of them")
    env: dict[str, str] = {}
    for name in files:
        env.update(parse_env_file(read_text, name, service))
    own = svc.get("environment")
    if own is not None:
        env.update(_environment(service, own))  # the service's own values win, as in Compose
    return {**{k: v for k, v in svc.items() if k != "env_file"}, "environment": env}


def parse_env_file(read_text: Callable[[str], str], name: str, service: str) -> dict[str, str]:
    """``KEY=VALUE`` lines (``export`` allowed, one pair of matching quotes taken off the
    value); blank lines and ``#`` comments skipped."""
    where = f"services.{service}.env_file {name}"
    try:
        text = read_text(name)
    except OSError as exc:
        raise ComposeError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ComposeError(f"{where}: not UTF-8 text") from None
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(stripped)
        if not match:
            raise ComposeError(f"{where}, line {number}: expected KEY=VALUE, got {stripped[:60]!r}")
        value = match[2]
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[match[1]] = value
    return env


# -- the server's half -------------------------------------------------------------------


def plan(stack: Any, doc: Any, max_replicas: int, builds: bool = False,
         secret_values: Any = None) -> StackPlan:
    """Check a whole compose document (as ``load`` made it) for stack ``stack`` and map it
    onto apps; raises ComposeError (or ValidationError) naming where, before anything is written.
    ``builds``: a service may have ``build`` (the document is a connected repository's, whose
    build pipeline makes the image, pleaco.builds.stackbuild); otherwise it is an error.
    ``secret_values``: the values of the top-level secrets given by ``file`` or
    ``environment``, by name (``read_secrets``; none in a repository's file)."""
    try:
        stack = validate_name(stack)
    except ValidationError:
        raise ComposeError(f"stack name: {stack!r} is not a DNS label (1-63 lower-case letters, digits "
                           "and '-', starting and ending with a letter or digit)") from None
    if not isinstance(doc, dict):
        raise ComposeError("compose: expected a mapping with 'services' at the top")
    _only_known("", [k for k in doc if not _extension(k)], TOP_KEYS, "x-* extension fields are ignored, as in Compose")
    if "name" in doc and doc["name"] != stack:
        raise ComposeError(f"name: the file names project {doc['name']!r}, deployed as stack {stack!r}")
    services = doc.get("services")
    if not isinstance(services, dict) or not services:
        raise ComposeError("services: expected a mapping of at least one service")
    if len(services) > MAX_SERVICES:
        raise ComposeError(f"services: {len(services)} services, at most {MAX_SERVICES}")
    volumes = _declared_volumes(doc.get("volumes"))
    secrets = _declared_secrets(doc.get("secrets"), secret_values, builds)
    mapped = [_service(stack, name, svc, max_replicas, volumes, builds, secrets)
              for name, svc in sorted(services.items(), key=_key)]
    names = {s.name for s in mapped}
    users: dict[str, str] = {}
    for s in mapped:
        for mount in s.body.get("volumes", ()):
            if users.setdefault(mount["name"], s.name) != s.name:
                raise ComposeError(f"services.{s.name}.volumes: volume {mount['name']!r} is also service "
                                   f"{users[mount['name']]!r}'s (a volume belongs to one app on pleaco)")
    for s in mapped:
        for dep in s.depends_on:
            if dep not in names:
                raise ComposeError(f"services.{s.name}.depends_on: no service {dep!r} in this file")
    hosts: dict[str, str] = {}
    for s in mapped:
        host = s.body.get("host")
        if host is not None and hosts.setdefault(host, s.name) != s.name:
            raise ComposeError(f"services.{s.name}.x-pleaco.host: {host!r} is also service {hosts[host]!r}'s")
    return StackPlan(stack, tuple(mapped), _waves(mapped))


def _key(item: tuple[Any, Any]) -> str:
    return str(item[0])


def _extension(key: Any) -> bool:
    """An ``x-*`` extension field: for YAML anchors, ignored as in Compose."""
    return isinstance(key, str) and key.startswith("x-")


def _declared_volumes(value: Any) -> set[str]:
    if value is None:
        return set()
    if not isinstance(value, dict):
        raise ComposeError("volumes: expected a mapping of volume names")
    for name, options in value.items():
        if options not in (None, {}):
            key = sorted(options)[0] if isinstance(options, dict) and options else ""
            raise ComposeError(f"volumes.{name}{'.' + key if key else ''}: volume options are not supported by "
                               "pleaco (its volumes live on the node that runs the app)")
    return {str(name) for name in value}


def _declared_secrets(value: Any, values: Any, builds: bool) -> dict[str, str | None]:
    """The top-level secrets: name -> its value, None for an ``external`` one."""
    if values is None:
        values = {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        raise ComposeError("secrets: expected the values as a mapping of secret name to text")
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ComposeError("secrets: expected a mapping of secret names")
    declared: dict[str, str | None] = {}
    for name, spec in value.items():
        where = f"secrets.{name}"
        if not isinstance(spec, dict):
            raise ComposeError(f"{where}: expected a mapping with one of {', '.join(SECRET_SOURCES)}")
        _only_known(where, spec, SECRET_SOURCES, "a secret has one of them")
        if len(spec) != 1:
            raise ComposeError(f"{where}: expected one of {', '.join(SECRET_SOURCES)}")
        source = next(iter(spec))
        if source == "external":
            if spec["external"] is not True:
                raise ComposeError(f"{where}.external: only true (else give 'file' or 'environment')")
            declared[str(name)] = None
            continue
        if not isinstance(spec[source], str) or not spec[source]:
            raise ComposeError(f"{where}.{source}: expected a {'path' if source == 'file' else 'variable name'}")
        if builds:
            raise ComposeError(f"{where}.{source}: a connected repository's compose file cannot give a secret's "
                               "value (it would be in the repository, and no CLI reads it): declare it "
                               "'external: true' and set it with `pleaco secrets set APP KEY --mount file`")
        if name not in values:
            raise ComposeError(f"{where}: its value was not sent (pleaco stack deploy reads the {source}; an API "
                               "client sends it in the body's secrets)")
        given = f"{where}.{source} {spec[source]}"
        if values[name] == "":
            raise ComposeError(f"{given}: the value is empty (a secret has one)")
        try:
            declared[str(name)] = validate_value(values[name], "file")
        except SecretInputError as exc:
            raise ComposeError(f"{given}: {str(exc).partition(': ')[2]}") from None
    if extra := sorted(set(values) - {n for n, v in declared.items() if v is not None}):
        raise ComposeError(f"secrets.{extra[0]}: a value was sent for a secret the file does not declare "
                           "with 'file' or 'environment'")
    return declared


def _service_secrets(where: str, value: Any, declared: Mapping[str, str | None]) -> tuple[ServiceSecret, ...]:
    """A service's ``secrets``: names, or ``{source, target}``; each target a file name
    under /run/secrets (an app secret's key)."""
    if not isinstance(value, list):
        raise ComposeError(f"{where}: expected a list of secret names or {{source, target}}")
    out: dict[str, ServiceSecret] = {}
    for item in value:
        if isinstance(item, dict):
            _only_known(where, item, SERVICE_SECRET_KEYS,
                        "no uid, gid or mode: every secret is a read-only file of the app's user")
            source, target = item.get("source"), item.get("target", item.get("source"))
        else:
            source = target = item
        if not isinstance(source, str) or source not in declared:
            raise ComposeError(f"{where}: secret {source!r} is not declared under the top-level secrets")
        if isinstance(target, str) and target.startswith(SECRETS_MOUNT + "/"):
            target = target[len(SECRETS_MOUNT) + 1:]
        try:
            target = validate_key(target)
        except SecretInputError:
            raise ComposeError(f"{where}: target {target!r} is not a file name pleaco can give under "
                               f"{SECRETS_MOUNT} (a letter, digit or '_', then letters, digits, '_', '.' or "
                               "'-')") from None
        if target in out:
            raise ComposeError(f"{where}: two secrets with target {target!r}")
        out[target] = ServiceSecret(source, target, declared[source])
    return tuple(out[t] for t in sorted(out))


def _jobs(where: str, value: Any) -> tuple[Job, ...]:
    """``x-pleaco-jobs``: ``{NAME: {cron, command}}``, checked as ``jobs schedule`` checks one."""
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: expected a mapping of job names to {{cron, command}}")
    jobs = []
    for name, job in value.items():
        at = f"{where}.{name}"
        if not isinstance(job, dict):
            raise ComposeError(f"{at}: expected a mapping of {', '.join(sorted(JOB_KEYS))}")
        _only_known(at, job, JOB_KEYS)
        for key in sorted(JOB_KEYS - set(job)):
            raise ComposeError(f"{at}.{key}: required")
        try:
            checked = check_job(name, {"cron": job["cron"], "command": _argv(f"{at}.command", job["command"])})
        except (JobInputError, cron.CronError) as exc:
            raise ComposeError(f"{at}: {exc}") from None
        jobs.append(Job(*checked))
    return tuple(sorted(jobs, key=lambda j: j.name))


def _service(stack: str, name: Any, svc: Any, max_replicas: int, volumes: set[str], builds: bool,
             secrets: Mapping[str, str | None]) -> Service:
    where = f"services.{name}"
    if not isinstance(name, str):
        raise ComposeError(f"{where}: a service name must be a string")
    try:
        validate_name(name)
    except ValidationError:
        raise ComposeError(f"{where}: {name!r} is not a valid service name for pleaco (a DNS label: lower-case "
                           "letters, digits and '-'; it is also the name other services reach it by)") from None
    if not isinstance(svc, dict):
        raise ComposeError(f"{where}: expected a mapping")
    if "build" in svc and not builds:
        raise ComposeError(f"{where}.build: not supported by stack deploy, which runs images (name one in "
                           "'image'; or connect the repository with `pleaco apps connect`, whose pushes "
                           "build it)")
    if "env_file" in svc:
        raise ComposeError(f"{where}.env_file: must be read by the client (pleaco stack deploy does)")
    # An unknown x-pleaco* key is a typo of pleaco's own, not an extension to ignore.
    _only_known(where, [k for k in svc if not _extension(k) or k.startswith("x-pleaco")], SERVICE_KEYS,
                "other x-* extension fields are ignored, as in Compose")
    x = svc.get("x-pleaco") or {}
    if not isinstance(x, dict):
        raise ComposeError(f"{where}.x-pleaco: expected a mapping of {', '.join(sorted(X_PLEACO_KEYS))}")
    _only_known(f"{where}.x-pleaco", x, X_PLEACO_KEYS)
    build = _build(f"{where}.build", svc["build"]) if svc.get("build") is not None else None
    if "image" not in svc and build is None:
        raise ComposeError(f"{where}.image: required (pleaco runs images; 'build' only in a connected "
                           "repository's compose file)")
    # With both, the built image runs (Compose tags it with 'image'; pleaco's pipeline
    # tags it pleaco-build/APP:COMMIT12).
    body: dict[str, Any] = {"image": PENDING_IMAGE if build is not None else svc["image"]}
    for key in ("command", "entrypoint"):
        if key in svc and svc[key] is not None:
            body[key] = _argv(f"{where}.{key}", svc[key])
    if "environment" in svc and svc["environment"] is not None:
        body["env"] = _environment(name, svc["environment"])
    port = _port(where, svc)
    if port is not None:
        body["port"] = port
    health = _health(where, svc.get("healthcheck"), port)
    if "health" in x:
        if isinstance(health, dict):
            raise ComposeError(f"{where}.x-pleaco.health: the healthcheck is a command; give one or the other")
        if health is not None and health != x["health"]:
            raise ComposeError(f"{where}.x-pleaco.health: {x['health']!r} differs from the healthcheck's {health!r}")
        health = x["health"]
    if isinstance(health, dict):
        body["health_cmd"] = health
    elif health is not None:
        body["health"] = health
    for key in ("host", "https"):
        if key in x:
            if port is None:
                raise ComposeError(f"{where}.x-pleaco.{key}: the service has no port (give it 'ports')")
            body[key] = x[key]
    if svc.get("volumes") is not None:
        body["volumes"] = _mounts(f"{where}.volumes", svc["volumes"], volumes)
    restart = svc.get("restart")
    if restart is not None and restart not in RESTART_POLICIES:
        raise ComposeError(f"{where}.restart: {restart!r} is not supported (pleaco always restarts a replica "
                           f"that exits: {' or '.join(RESTART_POLICIES)})")
    body.update(_deploy(where, svc.get("deploy")))
    app = f"{stack}-{name}"
    try:
        validate_name(app)
        validate_deploy(app, body, max_replicas)
    except ValidationError as exc:
        field = {"env": "environment", "port": "ports", "health": "healthcheck", "health_cmd": "healthcheck",
                 "name": "app name",
                 "volumes": "volumes"}.get(
            exc.field, exc.field)
        raise ComposeError(f"{where} ({field}): {str(exc).partition(': ')[2]}") from None
    service_secrets = () if svc.get("secrets") is None else _service_secrets(f"{where}.secrets", svc["secrets"],
                                                                              secrets)
    jobs = () if svc.get("x-pleaco-jobs") is None else _jobs(f"{where}.x-pleaco-jobs", svc["x-pleaco-jobs"])
    return Service(name, app, body, _depends_on(where, svc.get("depends_on")), build, service_secrets, jobs)


def _build(where: str, value: Any) -> Build:
    """``build: DIR`` or ``build: {context, dockerfile, args}``, both in the repository."""
    if isinstance(value, str):
        value = {"context": value}
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: expected a directory of the repository or a mapping "
                           f"of {', '.join(sorted(BUILD_KEYS))}")
    _only_known(where, value, BUILD_KEYS)
    context = _repo_path(f"{where}.context", value.get("context", "."))
    dockerfile = _repo_path(f"{where}.dockerfile", value.get("dockerfile", "Dockerfile"))
    if not dockerfile:
        raise ComposeError(f"{where}.dockerfile: expected a file name")
    args = value.get("args") or {}
    if isinstance(args, list):  # Compose's list form: NAME=VALUE
        pairs = [str(a).partition("=") for a in args]
        if not all(sep for _, sep, _ in pairs):
            raise ComposeError(f"{where}.args: expected NAME=VALUE items (pleaco has no build environment to "
                               "take a bare NAME from)")
        args = {k: v for k, _, v in pairs}
    if not isinstance(args, dict):
        raise ComposeError(f"{where}.args: expected a mapping or a list of NAME=VALUE")
    out: dict[str, str] = {}
    for k, v in args.items():
        if not isinstance(k, str) or not _ARG_NAME.fullmatch(k):
            raise ComposeError(f"{where}.args: {k!r} is not a build argument name")
        arg = _scalar(v)
        if arg is None:
            raise ComposeError(f"{where}.args.{k}: expected a string, number or boolean")
        out[k] = arg
    return Build(context, dockerfile, out)


def _repo_path(where: str, value: Any) -> str:
    """A relative path inside the repository, normalised ("" for its root)."""
    if not isinstance(value, str) or not value.strip():
        raise ComposeError(f"{where}: expected a path in the repository")
    if "://" in value or value.startswith(("git@", "/", "~")):
        raise ComposeError(f"{where}: {value!r}: only a path inside the repository (no URL, no absolute path)")
    norm = posixpath.normpath(value)
    if norm == ".." or norm.startswith("../"):
        raise ComposeError(f"{where}: {value!r} is outside the repository")
    return "" if norm == "." else norm


def _mounts(where: str, value: Any, declared: set[str]) -> list[dict[str, str]]:
    """Named volumes as the app's mounts ({"name", "path"}); anything else is an error."""
    if not isinstance(value, list):
        raise ComposeError(f"{where}: expected a list")
    mounts = []
    for item in value:
        source: Any
        target: Any
        if isinstance(item, str):
            parts = item.split(":")
            if len(parts) == 3:
                raise ComposeError(f"{where}: {item!r}: mount options ({parts[2]}) are not supported by pleaco")
            if len(parts) != 2:
                raise ComposeError(f"{where}: {item!r}: anonymous volumes are not supported by pleaco "
                                   "(name it: NAME:/path, and declare NAME under the top-level volumes)")
            source, target = parts
        elif isinstance(item, dict):
            _only_known(where, item, VOLUME_KEYS)
            if item.get("type", "volume") != "volume":
                raise ComposeError(f"{where}: type {item.get('type')!r} is not supported by pleaco (named volumes)")
            source, target = item.get("source"), item.get("target")
        else:
            raise ComposeError(f"{where}: {item!r} is not a volume mount")
        if not isinstance(source, str) or not source:
            raise ComposeError(f"{where}: {item!r}: anonymous volumes are not supported by pleaco (give a source)")
        if source.startswith(("/", ".", "~")):
            raise ComposeError(f"{where}: {item!r}: bind mounts are not supported by pleaco (named volumes only)")
        if source not in declared:
            raise ComposeError(f"{where}: volume {source!r} is not declared under the top-level volumes")
        mounts.append({"name": source, "path": target})
    return mounts


def _argv(where: str, value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            return shlex.split(value)
        except ValueError as exc:
            raise ComposeError(f"{where}: {exc}") from None
    if isinstance(value, list) and all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in value):
        return [str(a) for a in value]
    raise ComposeError(f"{where}: expected a string or a list of strings")


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def _environment(service: str, value: Any) -> dict[str, str]:
    where = f"services.{service}.environment"
    pairs: list[tuple[str, Any]]
    if isinstance(value, dict):
        pairs = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        pairs = []
        for item in value:
            if not isinstance(item, str):
                raise ComposeError(f"{where}: expected KEY=VALUE strings, got {item!r}")
            key, eq, val = item.partition("=")
            pairs.append((key, val if eq else None))
    else:
        raise ComposeError(f"{where}: expected a mapping or a list of KEY=VALUE")
    env: dict[str, str] = {}
    for key, val in pairs:
        text = _scalar(val)
        if text is None:
            raise ComposeError(f"{where}.{key}: has no value (pleaco does not take values from the deploying "
                               "shell; give one, or use pleaco secrets)")
        env[key] = text
    return env


def _port(where: str, svc: Mapping[str, Any]) -> int | None:
    """The service's one container port, from ``ports`` and ``expose``."""
    targets: set[int] = set()
    for key in ("ports", "expose"):
        value = svc.get(key)
        if value is None:
            continue
        if not isinstance(value, list):
            raise ComposeError(f"{where}.{key}: expected a list")
        for item in value:
            targets.add(_target(f"{where}.{key}", item))
    if len(targets) > 1:
        raise ComposeError(f"{where}.ports: pleaco gives a service one port, this one has {sorted(targets)}")
    return targets.pop() if targets else None


def _target(where: str, item: Any) -> int:
    if isinstance(item, dict):
        _only_known(where, item, PORT_KEYS)
        protocol, target = item.get("protocol", "tcp"), item.get("target")
    elif isinstance(item, int) and not isinstance(item, bool):
        protocol, target = "tcp", item
    elif isinstance(item, str) and (match := _PORT.fullmatch(item.strip())):
        protocol, target = match[3] or "tcp", int(match[2])
    else:
        raise ComposeError(f"{where}: {item!r} is not a port pleaco can take (one TCP port, no ranges)")
    if protocol != "tcp":
        raise ComposeError(f"{where}: {item!r}: only TCP ports (pleaco's proxy serves HTTP)")
    if not isinstance(target, int) or isinstance(target, bool) or not 1 <= target <= 65535:
        raise ComposeError(f"{where}: {item!r}: the container port must be 1..65535")
    return target


def _health(where: str, check: Any, port: int | None) -> str | dict[str, Any] | None:
    """The app's health from a Compose healthcheck: an HTTP path (a curl or wget of
    localhost at the service's port, with no timings of its own: pleaco probes it), a
    command the engine runs (``health_cmd``, with the check's timings), or None for none."""
    where = f"{where}.healthcheck"
    if check is None:
        return None
    if not isinstance(check, dict):
        raise ComposeError(f"{where}: expected a mapping")
    _only_known(where, check, HEALTH_KEYS)
    if check.get("disable") is True:
        return None
    test = check.get("test")
    if test in (["NONE"], "NONE", None):
        return None
    timings = {k: _duration(f"{where}.{k}", v) if k != "retries" else v
               for k, v in check.items() if k in HEALTH_TIMINGS}
    argv = test[1:] if isinstance(test, list) and test[:1] in (["CMD"], ["CMD-SHELL"]) else test
    if isinstance(argv, list) and len(argv) == 1:
        argv = argv[0]
    if isinstance(argv, str):
        try:
            argv = shlex.split(argv)
        except ValueError:
            argv = []
    if not timings and isinstance(argv, list) and argv and str(argv[0]).rsplit("/", 1)[-1] in _HEALTH_TOOLS:
        urls = [m for a in argv[1:] if isinstance(a, str) and (m := _HEALTH_URL.fullmatch(a))]
        if len(urls) == 1:
            url_port = int(urls[0][1] or 80)
            if port is None or url_port != port:
                raise ComposeError(f"{where}.test: checks port {url_port}, not the service's port ({port})")
            return urls[0][2] or "/"
    # Compose's string form is a shell line (CMD-SHELL); a list names its form first.
    if isinstance(test, list) and test[:1] not in (["CMD"], ["CMD-SHELL"]):
        raise ComposeError(f"{where}.test: {test!r}: a list starts with CMD, CMD-SHELL or NONE")
    value = {"test": test, **timings}
    try:
        parse_health_cmd(value, f"{where}")
    except HealthCommandError as exc:
        raise ComposeError(str(exc)) from None
    return value


def _duration(where: str, value: Any) -> float:
    """A Compose duration ("1m30s", "10s", "500ms") in seconds."""
    if not isinstance(value, str) or not _DURATION.fullmatch(value.strip()):
        raise ComposeError(f"{where}: {value!r} is not a duration (like 30s, 1m30s, 500ms)")
    return sum(float(n) * _DURATION_UNITS[unit] for n, unit in _DURATION_PART.findall(value))


def _deploy(where: str, value: Any) -> dict[str, Any]:
    where = f"{where}.deploy"
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: expected a mapping")
    _only_known(where, value, DEPLOY_KEYS)
    out: dict[str, Any] = {}
    if "replicas" in value:
        out["replicas"] = value["replicas"]
    resources = value.get("resources") or {}
    if not isinstance(resources, dict):
        raise ComposeError(f"{where}.resources: expected a mapping")
    _only_known(f"{where}.resources", resources, RESOURCE_KEYS)
    limits = resources.get("limits") or {}
    if not isinstance(limits, dict):
        raise ComposeError(f"{where}.resources.limits: expected a mapping")
    _only_known(f"{where}.resources.limits", limits, LIMIT_KEYS)
    for key, limit in limits.items():
        if key == "memory" and isinstance(limit, str):
            limit = limit.strip().lower()
        if key == "cpus" and isinstance(limit, str):
            try:
                limit = float(limit)
            except ValueError:
                raise ComposeError(f"{where}.resources.limits.cpus: {limit!r} is not a number") from None
        out[key] = limit
    placement = value.get("placement") or {}
    if not isinstance(placement, dict):
        raise ComposeError(f"{where}.placement: expected a mapping")
    _only_known(f"{where}.placement", placement, PLACEMENT_KEYS)
    if "constraints" in placement:
        out["constraints"] = placement["constraints"]
    return out


def _depends_on(where: str, value: Any) -> tuple[str, ...]:
    where = f"{where}.depends_on"
    if value is None:
        return ()
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(sorted(set(value)))
    if not isinstance(value, dict):
        raise ComposeError(f"{where}: expected a list of services or a mapping")
    for dep, cond in value.items():
        if not isinstance(cond, dict):
            raise ComposeError(f"{where}.{dep}: expected a mapping with 'condition'")
        _only_known(f"{where}.{dep}", cond, DEPENDS_KEYS)
        if cond.get("required", True) is not True:
            raise ComposeError(f"{where}.{dep}.required: only true (every dependency is required)")
        condition = cond.get("condition", "service_started")
        if condition not in DEPENDS_CONDITIONS:
            raise ComposeError(f"{where}.{dep}.condition: {condition!r} is not supported by pleaco "
                               f"({' or '.join(DEPENDS_CONDITIONS)}: both wait until it is healthy)")
    return tuple(sorted(str(dep) for dep in value))


def _waves(services: list[Service]) -> tuple[tuple[str, ...], ...]:
    """Kahn's layering of the depends_on graph; a cycle is an error naming it."""
    left = {s.name: set(s.depends_on) for s in services}
    waves: list[tuple[str, ...]] = []
    done: set[str] = set()
    while left:
        ready = sorted(n for n, deps in left.items() if deps <= done)
        if not ready:
            raise ComposeError(f"services: depends_on has a cycle: {' -> '.join(_cycle(left))}")
        waves.append(tuple(ready))
        done.update(ready)
        for n in ready:
            del left[n]
    return tuple(waves)


def _cycle(left: dict[str, set[str]]) -> list[str]:
    """One cycle among services that all wait on one another, as a path back to its start."""
    path: list[str] = []
    node = min(left)
    while node not in path:
        path.append(node)
        node = min(d for d in left[node] if d in left)
    return [*path[path.index(node):], node]
