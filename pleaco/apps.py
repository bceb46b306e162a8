"""Apps as the store holds them: the spec, its validation, and the writes that change it.

An app is two records, so that scaling and deploying never overwrite each other:

- ``app/NAME``: the spec (image, port, env, health, host) and its ``revision``, which goes
  up whenever anything but the replica count changes. Each revision is a release.
- ``scale/NAME``: the desired replica count (written by ``apps scale``, ``apps deploy
  --replicas`` and, later, the autoscaler).
- ``scale/NAME/autoscale``: the app's autoscale policy (``apps autoscale``), when it has
  one. A record of its own, not a field of ``scale/NAME``: the autoscaler writes the count
  often and the user the policy rarely, and with last-writer-wins per record neither write
  may undo the other.
- ``scale/NAME/decision``: the autoscaler's last decisions and the state the next one
  continues from (pleaco.reconcile.autoscale), written with the count it changes.

Every release is also kept as ``release/NAME/REVISION`` for history and rollback.

The specs are kept decoded, in name order, with an index of the host names they claim,
updated as the store changes (local writes and records from other nodes alike): reading one
app, checking a host name and listing all of them cost nothing per app already there.
"""

from __future__ import annotations

import bisect
import math
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pleaco import errors, logs
from pleaco.constraints import Constraint, ConstraintError
from pleaco.constraints import parse_all as parse_constraints
from pleaco.healthcmd import HealthCommand, HealthCommandError, parse_health_cmd
from pleaco.mounts import VolumeMount, VolumeSpecError
from pleaco.mounts import parse_all as parse_mounts
from pleaco.scale import AutoscalePolicy, PolicyError
from pleaco.store import Record, Store
from pleaco.urlpath import health_path_problem

log = logs.get("pleaco.apps")

DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# A Docker image reference, loosely: registry/name:tag or name@sha256:..., or an image id.
IMAGE_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,254}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,255}$")

DEPLOY_FIELDS = frozenset({"image", "replicas", "port", "env", "health", "host", "https", "memory", "cpus", "pids",
                           "max_conns", "constraints", "volumes", "command", "entrypoint", "health_cmd"})
# HTTPS per app at the proxy: "on" serves HTTP and HTTPS, "redirect" answers HTTP with a
# redirect to HTTPS, "off" serves HTTP only. Absent means "on".
HTTPS_MODES = ("off", "on", "redirect")
DEFAULT_REPLICAS = 1
# Resource limits of every replica. Docker refuses a memory limit under 6 MiB (its
# linuxMinMemory) and CPUs under 0.01; the process count is capped at the kernel's largest
# pid_max (2^22). Sizes are Docker's: a number of bytes, or with b, k, m or g (powers of 1024).
MIN_MEMORY = 6 << 20
MAX_MEMORY = 1 << 50
MIN_CPUS, MAX_CPUS = 0.01, 1024.0
MAX_PIDS = 1 << 22
# Connections each proxy opens to one replica at most: past the 64k ports one proxy can
# connect from to one address a cap means nothing, and a larger number is a typo.
MAX_CONNS = 65535
# Arguments of a command or entrypoint at most: Linux takes more, no real command comes near.
MAX_ARGS = 1024
_SIZE = re.compile(r"^([0-9]{1,16})([bkmg]?)$")
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
# The key of an app's autoscale policy under the ``scale`` kind: NAME + this.
AUTOSCALE_SUFFIX = "/autoscale"
# ... and of its autoscaler's decision record.
DECISION_SUFFIX = "/decision"
# The keys of an app's secrets under the ``secret`` kind: this + NAME/KEY (pleaco.stacks.secrets).
SECRET_PREFIX = "app/"


class ValidationError(errors.InvalidInput, ValueError):
    """Bad input for an app; the message names the field and what is wrong with it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class NotFound(errors.NotFound, LookupError):
    pass


class NoEarlierRelease(errors.Conflict, RuntimeError, code="no_earlier_release"):
    """A rollback was asked for an app that has only one release."""


def _is_utf8(text: str) -> bool:
    """False for strings JSON allows but UTF-8 cannot hold (lone surrogates like "\\ud800")."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)  # slots: AppStore keeps one per app in memory
class AppSpec:
    name: str
    image: str
    port: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    health: str | None = None
    host: str | None = None
    revision: int = 1
    # After revision so positional construction stays as it was (the fields are additive).
    https: str | None = None
    # Limits of every replica (None: none): memory in bytes, CPUs (1.5 = one and a half
    # cores' time), processes and threads.
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    # Connections each node's proxy opens to one replica at most (Caddy's
    # max_conns_per_host): the requests it has in flight through that proxy; more wait in
    # the proxy. None: the proxy's [proxy] upstream_max_conns; 0: no cap whatever that says.
    max_conns: int | None = None
    # The app's secrets (pleaco.stacks.secrets) as KEY -> the stamp of the value this
    # release runs with, never the value: setting or removing a secret writes a new release
    # (so the replicas roll like a deploy), and a node starts a replica only once it holds
    # that version of each secret. Not a deploy field: only the secrets verbs change it.
    secrets: dict[str, str] = field(default_factory=dict)
    # Placement constraints over node labels, canonical text (pleaco.constraints):
    # ("node.labels.disk==ssd",). Only the nodes that meet them all run its replicas.
    constraints: tuple[str, ...] = ()
    # Named volumes mounted into every replica (pleaco.stacks.volumes): an app with any runs
    # on the one node that holds them.
    volumes: tuple[VolumeMount, ...] = ()
    # The container's command and entrypoint (None: the image's own), as Docker's Cmd and
    # Entrypoint: argument lists, no shell.
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    # The stack this app is a service of (pleaco.stacks.service), None for a plain app:
    # kept in the spec itself, so an app's membership is written with the app in one record.
    # Not a deploy field: only ``stack deploy`` sets it, and a plain deploy keeps it.
    stack: str | None = None
    # Health as a command Docker runs inside each replica (pleaco.healthcmd), for apps with
    # no HTTP to probe; None: the ``health`` path, or running is healthy. Not both.
    health_cmd: HealthCommand | None = None

    def to_value(self) -> dict[str, Any]:
        value = asdict(self)
        del value["name"]
        value["health_cmd"] = None if self.health_cmd is None else self.health_cmd.to_value()
        value["constraints"] = list(self.constraints)
        value["volumes"] = [m.to_value() for m in self.volumes]
        for key in ("command", "entrypoint"):
            value[key] = None if value[key] is None else list(value[key])
        return value

    def placement_constraints(self) -> tuple[Constraint, ...]:
        return parse_constraints(list(self.constraints)) if self.constraints else ()

    @classmethod
    def from_value(cls, name: str, value: dict[str, Any]) -> AppSpec:
        return cls(
            name=name,
            image=value["image"],
            port=value.get("port"),
            env=dict(value.get("env") or {}),
            health=value.get("health"),
            host=value.get("host"),
            https=value.get("https"),
            revision=int(value.get("revision", 1)),
            memory=value.get("memory"),
            cpus=value.get("cpus"),
            pids=value.get("pids"),
            max_conns=value.get("max_conns"),
            secrets=dict(value.get("secrets") or {}),
            constraints=tuple(str(c) for c in parse_constraints(list(value.get("constraints") or ()))),
            volumes=parse_mounts(list(value.get("volumes") or ())),
            command=_argv(value.get("command")),
            entrypoint=_argv(value.get("entrypoint")),
            stack=value.get("stack"),
            health_cmd=HealthCommand.from_value(value["health_cmd"]) if value.get("health_cmd") else None,
        )

    def same_release(self, other: AppSpec) -> bool:
        """True when nothing that needs new containers differs."""
        mine, theirs = self.to_value(), other.to_value()
        mine.pop("revision")
        theirs.pop("revision")
        return mine == theirs


def _argv(value: Any) -> tuple[str, ...] | None:
    return None if value is None else tuple(str(arg) for arg in value)


def validate_argv(value: Any, field_name: str) -> tuple[str, ...]:
    """A command or entrypoint: a list of strings (no shell parses it)."""
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise ValidationError(field_name, f"expected a list of strings, got {value!r}")
    if len(value) > MAX_ARGS:
        raise ValidationError(field_name, f"{len(value)} arguments, at most {MAX_ARGS}")
    for arg in value:
        if "\x00" in arg or not _is_utf8(arg):
            raise ValidationError(field_name, f"argument {arg!r} must be a UTF-8 string without NUL")
    return tuple(value)


def validate_name(name: Any) -> str:
    if not isinstance(name, str) or not DNS_LABEL.fullmatch(name):
        raise ValidationError(
            "name",
            f"{name!r} is not a DNS label (1-63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit)",
        )
    return name


def validate_hostname(host: Any) -> str:
    if not isinstance(host, str) or len(host) > 253 or not host:
        raise ValidationError("host", f"{host!r} is not a valid DNS name")
    labels = host.rstrip(".").split(".")
    if not all(DNS_LABEL.fullmatch(label) for label in labels):
        raise ValidationError("host", f"{host!r} is not a valid DNS name")
    return host.rstrip(".")


def validate_replicas(replicas: Any, max_replicas: int) -> int:
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise ValidationError("replicas", f"expected an integer, got {replicas!r}")
    if not 0 <= replicas <= max_replicas:
        raise ValidationError("replicas", f"{replicas} is out of range 0..{max_replicas}")
    return replicas


def parse_memory(value: Any, field_name: str = "memory") -> int:
    """A memory limit in bytes, from a number of bytes or a size such as "256m"."""
    match = _SIZE.fullmatch(value.strip().lower()) if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif match:
        size = int(match[1]) * _UNITS[match[2]]
    else:
        raise ValidationError(field_name, f"{value!r} is not a size (bytes, or a number with k, m or g: 256m)")
    if size < MIN_MEMORY:
        raise ValidationError(field_name, f"{value!r} is below Docker's minimum of 6m")
    if size > MAX_MEMORY:
        raise ValidationError(field_name, f"{value!r} is more than any machine has")
    return size


def format_memory(size: int) -> str:
    """Bytes as the largest unit that divides them: 268435456 -> "256m"."""
    for unit in ("g", "m", "k"):
        if size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return f"{size}b"


def validate_cpus(value: Any, field_name: str = "cpus") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValidationError(field_name, f"expected a number of CPUs such as 0.5, got {value!r}")
    if not MIN_CPUS <= value <= MAX_CPUS:
        raise ValidationError(field_name, f"{value!r} is out of range {MIN_CPUS}..{MAX_CPUS:g}")
    return float(value)


def validate_pids(value: Any, field_name: str = "pids") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PIDS:
        raise ValidationError(field_name, f"expected a whole number 1..{MAX_PIDS}, got {value!r}")
    return value


def validate_max_conns(value: Any, field_name: str = "max_conns") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CONNS:
        raise ValidationError(field_name, f"expected a whole number 0..{MAX_CONNS} (0: no cap), got {value!r}")
    return value


@dataclass
class AppDefaults:
    """The ``[apps]`` table (env ``PLEACO_APPS_<NAME>``): limits every replica gets when
    its deploy names none. Written into the app's spec at deploy, so every node runs (and
    places) the app alike whatever its own config says."""

    # No memory or CPU limit unless asked: what an app needs is the app's to say (a limit
    # too small kills it), and a memory limit is what placement counts against a node.
    memory: str = ""
    cpus: float = 0.0
    # Processes and threads per replica: a fork bomb in one replica cannot take the host's
    # pid space (32768 on many kernels), while no web app comes near 4096. 0: no limit.
    pids: int = 4096

    def validate(self) -> list[str]:
        try:
            if self.memory:
                parse_memory(self.memory, "apps.memory")
            if self.cpus:
                validate_cpus(self.cpus, "apps.cpus")
            if self.pids:
                validate_pids(self.pids, "apps.pids")
        except ValidationError as exc:
            return [str(exc)]
        return []

    def fill(self, body: dict[str, Any]) -> dict[str, Any]:
        """The deploy body with these defaults for the limits it does not name."""
        defaults = {"memory": self.memory or None, "cpus": self.cpus or None, "pids": self.pids or None}
        return {**{k: v for k, v in defaults.items() if v is not None and body.get(k) is None}, **body}


def validate_deploy(name: Any, body: Any, max_replicas: int) -> tuple[AppSpec, int | None]:
    """Check a deploy request; returns the spec (revision unset) and the replicas, if given."""
    name = validate_name(name)
    if not isinstance(body, dict):
        raise ValidationError("body", "expected a JSON object")
    unknown = sorted(set(body) - DEPLOY_FIELDS)
    if unknown:
        raise ValidationError(unknown[0], f"unknown field (allowed: {', '.join(sorted(DEPLOY_FIELDS))})")
    image = body.get("image")
    if not isinstance(image, str) or not IMAGE_REF.fullmatch(image):
        raise ValidationError("image", f"{image!r} is not an image reference")
    replicas = body.get("replicas")
    if replicas is not None:
        replicas = validate_replicas(replicas, max_replicas)
    port = body.get("port")
    if port is not None and (
        not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535
    ):
        raise ValidationError("port", f"{port!r} is out of range 1..65535")
    env = body.get("env")
    if env is None:
        env = {}
    if not isinstance(env, dict):
        raise ValidationError("env", "expected an object of NAME: value")
    for key, value in env.items():
        if not ENV_NAME.fullmatch(key):
            raise ValidationError("env", f"{key!r} is not a valid variable name")
        if not isinstance(value, str) or "\x00" in value or not _is_utf8(value):
            raise ValidationError("env", f"value of {key} must be a UTF-8 string without NUL")
    health = body.get("health")
    if health is not None:
        if problem := health_path_problem(health):
            raise ValidationError("health", problem)
        if port is None:
            raise ValidationError("health", "a health path needs a port")
    health_cmd = None
    if body.get("health_cmd") is not None:
        if health is not None:
            raise ValidationError("health_cmd", "give a health path or a health command, not both")
        try:
            health_cmd = parse_health_cmd(body["health_cmd"])
        except HealthCommandError as exc:
            raise ValidationError("health_cmd", str(exc).removeprefix("health_cmd: ")) from None
    host = body.get("host")
    if host is not None:
        host = validate_hostname(host)
    https = body.get("https")
    if https is not None and https not in HTTPS_MODES:
        raise ValidationError("https", f"{https!r} must be one of {', '.join(HTTPS_MODES)}")
    memory = body.get("memory")
    if memory is not None:
        memory = parse_memory(memory)
    cpus = body.get("cpus")
    if cpus is not None:
        cpus = validate_cpus(cpus)
    pids = body.get("pids")
    if pids is not None:
        pids = validate_pids(pids)
    max_conns = body.get("max_conns")
    if max_conns is not None:
        max_conns = validate_max_conns(max_conns)
    constraints = body.get("constraints")
    try:
        constraints = tuple(str(c) for c in parse_constraints(constraints)) if constraints is not None else ()
    except ConstraintError as exc:
        raise ValidationError("constraints", str(exc)) from None
    try:
        volumes = parse_mounts(body["volumes"]) if body.get("volumes") is not None else ()
    except VolumeSpecError as exc:
        raise ValidationError("volumes", str(exc)) from None
    command, entrypoint = body.get("command"), body.get("entrypoint")
    spec = AppSpec(name=name, image=image, port=port, env=env, health=health, host=host, https=https, revision=0,
                   memory=memory, cpus=cpus, pids=pids, max_conns=max_conns, constraints=constraints,
                   volumes=volumes,
                   command=None if command is None else validate_argv(command, "command"),
                   entrypoint=None if entrypoint is None else validate_argv(entrypoint, "entrypoint"),
                   health_cmd=health_cmd)
    return spec, replicas


@dataclass(frozen=True)
class DeployResult:
    spec: AppSpec
    replicas: int
    created: bool
    new_release: bool


class AppStore:
    """The app-level writes and reads over the replicated store."""

    def __init__(self, store: Store, max_replicas: int, defaults: AppDefaults | None = None) -> None:
        self.store = store
        self.max_replicas = max_replicas
        # Limits for deploys that name none ([apps]); None: none.
        self.defaults = defaults
        # name -> (the app record it was decoded from, the spec); the names in order and
        # their specs in the same order (a list insert moves pointers: cheap at any size);
        # host -> the apps claiming it (two, when two nodes took one host at the same time).
        self._specs: dict[str, tuple[Record, AppSpec]] = {}
        self._names: list[str] = []
        self._ordered: list[AppSpec] = []
        self._hosts: dict[str, set[str]] = {}
        # name -> desired replicas, from the ``scale`` records (a reconcile pass asks for
        # every app's).
        self._replicas: dict[str, int] = {}
        # name -> its autoscale policy, from the ``scale/NAME/autoscale`` records.
        self._policies: dict[str, AutoscalePolicy] = {}
        # The apps that want at least one replica: what a reconcile pass or a rollout check
        # walks, so their cost follows the apps that run, not all the apps there are.
        self._wanted: set[str] = set()
        self._lock = threading.Lock()
        store.subscribe(self._changed)
        for rec in store.peek_records("app"):
            self._refresh(rec.key)
        for rec in store.peek_records("scale"):
            self._changed(rec)

    def _changed(self, rec: Record) -> None:
        if rec.kind == "app":
            self._refresh(rec.key)
        elif rec.kind == "scale" and rec.key.endswith(AUTOSCALE_SUFFIX):
            self._refresh_policy(rec.key.removesuffix(AUTOSCALE_SUFFIX))
        elif rec.kind == "scale" and rec.key.endswith(DECISION_SUFFIX):
            pass  # read when asked for (decision()): nothing is derived from it
        elif rec.kind == "scale":
            self._refresh_replicas(rec.key)

    def _refresh_policy(self, name: str) -> None:
        """Like ``_refresh``, for the autoscale policy."""
        with self._lock:
            value = self.store.value("scale", name + AUTOSCALE_SUFFIX)
            policy = None
            if value is not None:
                try:
                    policy = AutoscalePolicy.from_value(value)
                except (PolicyError, TypeError) as exc:
                    log.warning("autoscale.record_invalid", app=name, error=str(exc))
            if policy is None:
                self._policies.pop(name, None)
            else:
                self._policies[name] = policy

    def _refresh_replicas(self, name: str) -> None:
        """Like ``_refresh``, for the replica count."""
        with self._lock:
            rec = self.store.peek("scale", name)
            count = None
            if rec is not None and rec.value is not None:
                try:
                    count = int(rec.value["replicas"])
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("scale.record_invalid", app=name, error=str(exc))
            if count is None:
                self._replicas.pop(name, None)
            else:
                self._replicas[name] = count
            self._rewant(name)

    def _rewant(self, name: str) -> None:
        if name in self._specs and self._replicas.get(name, DEFAULT_REPLICAS) > 0:
            self._wanted.add(name)
        else:
            self._wanted.discard(name)

    def _refresh(self, name: str) -> None:
        """Bring one app's cached spec in line with the store. It reads the store rather than
        trusting the record it was told about: two threads' notifications may arrive in the
        other order than their commits."""
        with self._lock:
            rec = self.store.peek("app", name)
            old = self._specs.get(name)
            if old is not None and old[0] is rec:
                return
            spec = None
            if rec is not None and rec.value is not None:
                try:
                    spec = AppSpec.from_value(name, rec.value)
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("app.record_invalid", app=name, error=str(exc))
            if old is not None:
                self._unindex(old[1])
            at = bisect.bisect_left(self._names, name)
            if rec is None or spec is None:
                if old is not None:
                    del self._specs[name]
                    del self._names[at]
                    del self._ordered[at]
            else:
                if old is None:
                    self._names.insert(at, name)
                    self._ordered.insert(at, spec)
                else:
                    self._ordered[at] = spec
                self._specs[name] = (rec, spec)
                if spec.host is not None:
                    self._hosts.setdefault(spec.host, set()).add(name)
            self._rewant(name)

    def _unindex(self, spec: AppSpec) -> None:
        if spec.host is not None:
            owners = self._hosts.get(spec.host, set())
            owners.discard(spec.name)
            if not owners:
                self._hosts.pop(spec.host, None)

    def get(self, name: str) -> AppSpec | None:
        found = self._specs.get(name)
        return None if found is None else found[1]

    def _existing(self, name: Any) -> AppSpec:
        """The app ``name`` names: a ValidationError for a bad name, NotFound when absent."""
        spec = self.get(validate_name(name))
        if spec is None:
            raise NotFound(f"app {name!r} does not exist")
        return spec

    def _check_autoscale_range(self, name: str, replicas: int) -> None:
        """A count set by hand (``apps scale``, ``apps deploy --replicas``) on an autoscaled
        app must be within its policy's range: outside it the autoscaler would move it back
        at once, so it is refused, naming the range."""
        policy = self.autoscale(name)
        if policy is not None and not policy.min_replicas <= replicas <= policy.max_replicas:
            raise ValidationError(
                "replicas", f"{replicas} is outside the app's autoscale range {policy.min_replicas}.."
                f"{policy.max_replicas} (change it with apps autoscale, or turn it off with --off)")

    def replicas(self, name: str) -> int:
        return self._replicas.get(name, DEFAULT_REPLICAS)

    def specs(self, after: str = "", limit: int | None = None) -> list[AppSpec]:
        """The apps in name order; with ``after``, those whose name sorts after it, and at
        most ``limit`` of them."""
        with self._lock:
            start = bisect.bisect_right(self._names, after) if after else 0
            end = None if limit is None else start + limit
            return self._ordered[start:end]

    def wanted_specs(self) -> list[AppSpec]:
        """The apps that want at least one replica, in name order."""
        with self._lock:
            return [self._specs[name][1] for name in sorted(self._wanted)]

    def count(self) -> int:
        return len(self._specs)

    def deploy(self, name: Any, body: Any, release_info: dict[str, Any] | None = None,
               stack: str | None = None, secrets: dict[str, str] | None = None,
               secret_writes: Sequence[tuple[str, str, dict[str, Any] | None]] = ()) -> DeployResult:
        """Create or update an app. ``release_info`` (a build's commit and id) is kept in the
        release record when this deploy makes a new release. ``stack``: the stack deploying
        it as a service (pleaco.stacks.service); None keeps the stack it has. ``secrets``:
        the secret stamps the release gets (a stack's secrets, pleaco.stacks.secrets), with
        the ``secret_writes`` that set them, written with it; None keeps the ones it has."""
        if self.defaults is not None and isinstance(body, dict):
            body = self.defaults.fill(body)
        spec, replicas = validate_deploy(name, body, self.max_replicas)
        current = self.get(spec.name)
        if host_owner := self._host_owner(spec.host, spec.name):
            raise ValidationError("host", f"{spec.host!r} is already used by app {host_owner!r}")
        if secrets is not None:
            spec = replace(spec, secrets=secrets)
        elif current is not None:  # set by the secrets verbs, not by deploys
            spec = replace(spec, secrets=current.secrets)
        if stack is None and current is not None:
            stack = current.stack
        spec = replace(spec, stack=stack)
        writes: list[tuple[str, str, dict[str, Any] | None]] = list(secret_writes)
        new_release = current is None or not current.same_release(spec)
        if new_release:
            spec = replace(spec, revision=1 if current is None else current.revision + 1)
            writes += self._release_writes(spec, **(release_info or {}))
        else:
            assert current is not None
            spec = current
        if current is None and replicas is None:
            replicas = DEFAULT_REPLICAS
        if replicas is not None and current is not None:
            self._check_autoscale_range(spec.name, replicas)
        if replicas is not None and (current is None or replicas != self.replicas(spec.name)):
            writes.append(("scale", spec.name, {"replicas": replicas}))
        if writes:
            self.store.put_many(writes)
        return DeployResult(
            spec=spec,
            replicas=self.replicas(spec.name),
            created=current is None,
            new_release=new_release,
        )

    def create_writes(self, name: str, image: str) -> list[tuple[str, str, dict[str, Any] | None]]:
        """The writes (for ``Store.put_many`` with others) that create app ``name`` with
        nothing to run yet: revision 0 (no release: the first deploy makes release 1) and
        0 replicas, as `apps connect` makes it before its first build."""
        spec = AppSpec(name=validate_name(name), image=image, revision=0)
        return [("app", name, spec.to_value()), ("scale", name, {"replicas": 0})]

    def _release_writes(self, spec: AppSpec, **extra: Any) -> list[tuple[str, str, dict[str, Any] | None]]:
        """The app record of a new release, and its entry in the release history."""
        release = {"app": spec.name, "revision": spec.revision, "image": spec.image,
                   "spec": spec.to_value(), "created_ms": int(time.time() * 1000), **extra}
        return [("app", spec.name, spec.to_value()), ("release", f"{spec.name}/{spec.revision}", release)]

    def secrets_writes(self, name: str, secrets: dict[str, str],
                       **extra: Any) -> list[tuple[str, str, dict[str, Any] | None]]:
        """The writes that give app ``name`` these secret stamps (pleaco.stacks.secrets): a new
        release, so its replicas roll like a deploy (none while it has no release yet)."""
        current = self.get(name)
        if current is None:
            raise NotFound(f"app {name!r} does not exist")
        if current.revision == 0:
            return [("app", name, replace(current, secrets=secrets).to_value())]
        return self._release_writes(replace(current, secrets=secrets, revision=current.revision + 1), **extra)

    def releases(self, name: str) -> list[dict[str, Any]]:
        """The app's release history, oldest first."""
        found = [self.store.value("release", r.key) for r in self.store.peek_records("release", prefix=name + "/")]
        return sorted((v for v in found if v), key=lambda v: int(v["revision"]))

    def rollback(self, name: str, reason: str = "") -> AppSpec:
        """Make the release before the current one current again, as a new revision.

        History stays linear (like ``kubectl rollout undo``): rolling back from 3 to 2's
        spec writes revision 4, so a second rollback returns to 3's spec.
        """
        current = self._existing(name)
        earlier = [r for r in self.releases(name) if int(r["revision"]) < current.revision]
        if not earlier:
            raise NoEarlierRelease(f"app {name!r} has no release before revision {current.revision}")
        target = earlier[-1]
        # The secrets stay as they are now: a rollback restores the release, and a secret's
        # value is only ever its latest (pleaco.stacks.secrets).
        spec = AppSpec.from_value(name, {**target["spec"], "revision": current.revision + 1,
                                         "secrets": current.secrets})
        if host_owner := self._host_owner(spec.host, name):
            raise ValidationError("host", f"{spec.host!r} is now used by app {host_owner!r}")
        extra: dict[str, Any] = {"rollback_of": int(target["revision"]), "rolled_back_from": current.revision}
        if reason:
            extra["reason"] = reason
        self.store.put_many(self._release_writes(spec, **extra))
        return spec

    def release(self, name: str, revision: int) -> dict[str, Any] | None:
        """One release's record (image, spec, and rollback_of/reason for rollbacks)."""
        return self.store.value("release", f"{name}/{revision}")

    def record_verdict(self, name: str, revision: int, verdict: str, reason: str = "") -> None:
        """Keep the rollout's verdict on a release (``healthy``, ``rolled_back``, ``failed``)
        in its record, so whichever node owns the app next does not judge it again."""
        release = self.release(name, revision)
        if release is None or release.get("verdict") == verdict:
            return
        release = {**release, "verdict": verdict, "verdict_ms": int(time.time() * 1000)}
        if reason:
            release["verdict_reason"] = reason
        self.store.put("release", f"{name}/{revision}", release)

    def scale(self, name: str, replicas: Any) -> int:
        validate_name(name)
        replicas = validate_replicas(replicas, self.max_replicas)
        self._existing(name)
        self._check_autoscale_range(name, replicas)
        self.store.put("scale", name, {"replicas": replicas})
        return int(replicas)

    # -- autoscale policy ------------------------------------------------------------------

    def autoscale(self, name: str) -> AutoscalePolicy | None:
        return self._policies.get(name)

    def autoscaled(self) -> dict[str, AutoscalePolicy]:
        """Every app with an autoscale policy (that still exists), by name."""
        with self._lock:
            return {name: p for name, p in self._policies.items() if name in self._specs}

    def decision(self, name: str) -> dict[str, Any] | None:
        """The autoscaler's decision record of an app (pleaco.reconcile.autoscale), if any."""
        return self.store.value("scale", name + DECISION_SUFFIX)

    def record_decision(self, name: str, policy: AutoscalePolicy, based_on: int, desired: int,
                        record: dict[str, Any]) -> bool:
        """The autoscaler's write: the desired count (the record ``scale`` writes) and the
        decision record, in one transaction, only while the app's policy is still ``policy``
        and its count still ``based_on``, what the decision was made from. False, and nothing
        written, when they are not: someone changed the count (``apps scale``, another
        owner) or the policy since, and the next tick decides again from what is now."""
        if self.get(name) is None or self.autoscale(name) != policy or self.replicas(name) != based_on:
            return False
        desired = validate_replicas(desired, self.max_replicas)
        if not policy.min_replicas <= desired <= policy.max_replicas:
            raise ValidationError("replicas", f"{desired} is outside the app's autoscale range "
                                              f"{policy.min_replicas}..{policy.max_replicas}")
        writes: list[tuple[str, str, dict[str, Any] | None]] = [("scale", name + DECISION_SUFFIX, record)]
        if desired != based_on:
            writes.insert(0, ("scale", name, {"replicas": desired}))
        self.store.put_many(writes)
        return True

    def set_autoscale(self, name: Any, body: Any) -> AutoscalePolicy:
        """Give an app an autoscale policy (the fields of ``AutoscalePolicy``), replacing
        the one it had. The replica count is moved into the policy's range at once, in the
        same write, so the app is within its bounds before the autoscaler first decides."""
        validate_name(name)
        policy = AutoscalePolicy.from_value(body)
        if policy.max_replicas > self.max_replicas:
            raise PolicyError("max_replicas", f"{policy.max_replicas} is above this cluster's max_replicas "
                                              f"({self.max_replicas})")
        self._existing(name)
        writes: list[tuple[str, str, dict[str, Any] | None]] = [
            ("scale", name + AUTOSCALE_SUFFIX, policy.to_value())]
        count = self.replicas(name)
        bounded = min(max(count, policy.min_replicas), policy.max_replicas)
        if bounded != count:
            writes.append(("scale", name, {"replicas": bounded}))
        self.store.put_many(writes)
        return policy

    def clear_autoscale(self, name: str) -> bool:
        """Turn autoscaling off (the count stays as it is); False when it was not on."""
        self._existing(name)
        if self.store.value("scale", name + AUTOSCALE_SUFFIX) is None:
            return False
        writes: list[tuple[str, str, dict[str, Any] | None]] = [("scale", name + AUTOSCALE_SUFFIX, None)]
        if self.decision(name) is not None:  # its decisions went with it
            writes.append(("scale", name + DECISION_SUFFIX, None))
        self.store.put_many(writes)
        return True

    def remove(self, name: str) -> None:
        self._existing(name)
        writes: list[tuple[str, str, dict[str, Any] | None]] = [("app", name, None), ("scale", name, None)]
        for suffix in (AUTOSCALE_SUFFIX, DECISION_SUFFIX):
            if self.store.value("scale", name + suffix) is not None:
                writes.append(("scale", name + suffix, None))
        writes += [("release", f"{name}/{r['revision']}", None) for r in self.releases(name)]
        # Its secrets (pleaco.stacks.secrets) go with it.
        writes += [("secret", r.key, None)
                   for r in self.store.peek_records("secret", prefix=f"{SECRET_PREFIX}{name}/")]
        # So do its scheduled jobs and their runs' records (pleaco.stacks.schedule).
        writes += [("job", r.key, None) for r in self.store.peek_records("job", prefix=f"{name}/")]
        self.store.put_many(writes)

    def _host_owner(self, host: str | None, name: str) -> str | None:
        if host is None:
            return None
        with self._lock:
            others = sorted(self._hosts.get(host, set()) - {name})
        return others[0] if others else None
