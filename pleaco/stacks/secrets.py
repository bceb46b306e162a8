"""App secrets: ``pleaco secrets set|ls|rm``, and what a replica gets of them.

A secret of app NAME is the ``secret`` record ``app/NAME/KEY``, sealed by the one sealing
code there is (pleaco.builds.secrets.SecretBox), with two fields of its own beside the
sealed ones: ``mount`` (``env``: an environment variable KEY, the default; ``file``: the
file /run/secrets/KEY, read-only) and ``stamp`` (when it was set, and a random part).

Setting or removing a secret also writes a new release of the app whose spec carries the
stamps (``AppSpec.secrets``, KEY -> stamp, never a value): the replicas roll like a deploy.
Records spread one by one, so a node may see that release before the secret it was made
for; it starts no replica of it until it holds that version (``SecretsNotReady``), rather
than start one with the old value and never roll it again.

Files are written by the agent under ``DATA_DIR/run-secrets/CONTAINER/`` (0400, in a 0700
directory), bind-mounted read-only at /run/secrets, and removed with the container; an agent
start, and any pass with nothing in flight, sweeps those whose container is gone.

A stack (pleaco.stacks.service) gives its services' apps file secrets from its compose file
(``stack_writes``): those records carry ``source: stack``, so a later deploy of the stack
removes the ones its file no longer gives, and leaves those set by ``secrets set`` alone. A
value the app already holds (the sealed record opens to it) is not written again: the stamp
stays, and the replicas do not roll.

No value is ever logged, returned by the API, or put in the app's spec or release records.
"""

from __future__ import annotations

import os
import re
import secrets as token
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from pleaco import errors, logs
from pleaco.apps import ENV_NAME, SECRET_PREFIX, AppSpec, AppStore, validate_name
from pleaco.builds.secrets import SecretBox, SecretError
from pleaco.reconcile.provision import NotProvisioned
from pleaco.runtime.docker import RunSpec
from pleaco.store import Store

log = logs.get("pleaco.stacks.secrets")

MOUNTS = ("env", "file")
# A file secret's key: a file name under /run/secrets (see validate_key).
FILE_KEY = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,255}")
# Where a ``file`` secret is in the container, as Compose and Swarm put them.
SECRETS_MOUNT = "/run/secrets"
# The largest secret value, in bytes of UTF-8. Sealed and base64-encoded it grows by a
# third; 32 KiB stays well inside the largest record the cluster replicates (64 KiB,
# pleaco.store.record) and holds any key, certificate chain or credentials file.
MAX_SECRET_BYTES = 32 << 10
FILES_DIR = "run-secrets"
Container = TypeVar("Container", bound=RunSpec)
SET_FIELDS = frozenset({"value", "mount"})
# The ``source`` of a secret record a stack deploy wrote (one ``secrets set`` wrote has none).
STACK_SOURCE = "stack"
Write = tuple[str, str, dict[str, Any] | None]


class SecretInputError(errors.InvalidInput, ValueError):
    """A bad secrets request; the message names the field and what is wrong."""


class SecretNotFound(errors.NotFound, LookupError):
    pass


class SecretsNotReady(NotProvisioned):
    """The app's release names a version of a secret this node does not hold yet."""


@dataclass(frozen=True)
class SecretInfo:
    """What may be shown of a secret: its key, how it is given, when it was set."""

    app: str
    key: str
    mount: str
    set_ms: int

    def to_json(self) -> dict[str, Any]:
        return {"app": self.app, "key": self.key, "mount": self.mount, "set_ms": self.set_ms}


@dataclass(frozen=True)
class SecretMaterial:
    """An app's secrets as a container gets them: environment variables and files."""

    env: dict[str, str]
    files: dict[str, str]


def validate_key(key: Any, mount: str = "file") -> str:
    """A secret's key: for ``env`` an environment variable name; for ``file`` (and where the
    mount is not known) a file name under /run/secrets: Compose's secret names have dots
    and dashes (``server.crt``, ``db-password``), never a slash, and no leading dot (no
    ``..``, no hidden file)."""
    if mount == "env":
        if not isinstance(key, str) or not ENV_NAME.fullmatch(key):
            raise SecretInputError(f"key: {key!r} is not a valid name for an environment variable (a letter or "
                                   "'_', then letters, digits or '_', at most 256; --mount file takes dots and "
                                   "dashes too)")
        return key
    if not isinstance(key, str) or not FILE_KEY.fullmatch(key):
        raise SecretInputError(f"key: {key!r} is not a valid name (a letter, digit or '_', then letters, digits, "
                               "'_', '.' or '-', at most 256: it is a file name)")
    return key


def validate_value(value: Any, mount: str) -> str:
    if not isinstance(value, str):
        raise SecretInputError("value: expected a string")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        raise SecretInputError("value: not valid UTF-8") from None
    if size > MAX_SECRET_BYTES:
        raise SecretInputError(f"value: {size} bytes, over the limit of {MAX_SECRET_BYTES} bytes")
    if not value:
        raise SecretInputError("value: empty (remove the secret with `secrets rm` instead)")
    if mount == "env" and "\x00" in value:
        raise SecretInputError("value: an environment variable cannot hold a NUL byte (use --mount file)")
    return value


def _record_key(app: str, key: str) -> str:
    return f"{SECRET_PREFIX}{app}/{key}"


def _new_stamp() -> tuple[int, str]:
    now_ms = int(time.time() * 1000)
    return now_ms, f"{now_ms:013d}-{token.token_hex(4)}"


def _stamp_ms(stamp: str) -> int:
    head = stamp.partition("-")[0]
    return int(head) if head.isdigit() else 0


class AppSecrets:
    """The secrets verbs over the store, and a replica's secrets on this node."""

    def __init__(self, store: Store, apps: AppStore, box: SecretBox, data_dir: Path, files: str = FILES_DIR) -> None:
        self.store = store
        self.apps = apps
        self.box = box
        # Where the containers' secret files are, a directory per container; ``files``
        # tells apart whose they are (replicas', jobs'), so each sweeps only its own.
        self.files_dir = data_dir / files

    # -- the verbs -------------------------------------------------------------------------

    def _spec(self, app: Any) -> AppSpec:
        spec = self.apps.get(validate_name(app))
        if spec is None:
            raise SecretNotFound(f"app {app!r} does not exist")
        return spec

    def put(self, app: Any, key: Any, body: Any) -> SecretInfo:
        """Keep secret ``key`` of ``app`` (body ``{"value", "mount"?}``) and roll the app."""
        if not isinstance(body, dict):
            raise SecretInputError('body: expected {"value": "...", "mount": "env" | "file"}')
        if unknown := sorted(set(body) - SET_FIELDS):
            raise SecretInputError(f"{unknown[0]}: unknown field (allowed: value, mount)")
        mount = body.get("mount", "env")
        if mount not in MOUNTS:
            raise SecretInputError(f"mount: {mount!r} must be one of {', '.join(MOUNTS)}")
        key = validate_key(key, mount)
        value = validate_value(body.get("value"), mount)
        spec = self._spec(app)
        now_ms, stamp = _new_stamp()
        rkey = _record_key(spec.name, key)
        try:
            record = {**self.box.seal(rkey, value), "mount": mount, "stamp": stamp}
        except SecretError as exc:
            raise SecretInputError(f"value: {exc}") from None
        writes = [("secret", rkey, record),
                  *self.apps.secrets_writes(spec.name, {**spec.secrets, key: stamp}, reason=f"secret {key} set")]
        self.store.put_many(writes)
        log.info("secret.set", app=spec.name, key=key, mount=mount)
        return SecretInfo(spec.name, key, mount, now_ms)

    def infos(self, app: Any) -> list[SecretInfo]:
        spec = self._spec(app)
        prefix = _record_key(spec.name, "")
        out = []
        for rec in self.store.peek_records("secret", prefix=prefix):
            value = rec.value or {}
            out.append(SecretInfo(spec.name, rec.key[len(prefix):], str(value.get("mount", "env")),
                                  _stamp_ms(str(value.get("stamp", "")))))
        return sorted(out, key=lambda s: s.key)

    def remove(self, app: Any, key: Any) -> None:
        key = validate_key(key)
        spec = self._spec(app)
        rkey = _record_key(spec.name, key)
        if self.store.value("secret", rkey) is None:
            raise SecretNotFound(f"app {spec.name!r} has no secret {key!r}")
        stamps = {k: v for k, v in spec.secrets.items() if k != key}
        self.store.put_many([("secret", rkey, None),
                             *self.apps.secrets_writes(spec.name, stamps, reason=f"secret {key} removed")])
        log.info("secret.removed", app=spec.name, key=key)

    # -- a stack's secrets ---------------------------------------------------------------

    def unusable_external(self, app: str, key: str) -> str | None:
        """Why file secret ``key`` of ``app``, which a stack names ``external``, cannot be
        given (None: it can)."""
        value = self.store.value("secret", _record_key(app, key))
        if value is None:
            return "is not set"
        if value.get("mount", "env") != "file":
            return "is set as an environment variable (mount env), not a file"
        return None

    def stack_writes(self, app: str, stamps: Mapping[str, str],
                     wanted: Mapping[str, str | None]) -> tuple[dict[str, str], list[Write]]:
        """The secret stamps of app ``app`` (now ``stamps``) once it has the file secrets its
        stack gives it (``wanted``: key -> value, None for an ``external`` one, which must be
        set: ``unusable_external``), and the secret record writes that make it so. A value
        the app holds already is not written again (its stamp stays: no roll); the stack's
        own secrets it no longer gives are removed; those set by ``secrets set`` stay."""
        out = dict(stamps)
        writes: list[Write] = []
        prefix = _record_key(app, "")
        for rec in self.store.peek_records("secret", prefix=prefix):
            key = rec.key[len(prefix):]
            if rec.value is not None and rec.value.get("source") == STACK_SOURCE and key not in wanted:
                writes.append(("secret", rec.key, None))
                out.pop(key, None)
        for key, value in sorted(wanted.items()):
            rkey = _record_key(app, key)
            held = self.store.value("secret", rkey)
            if value is None or (held is not None and held.get("mount") == "file" and self._holds(rkey, held, value)):
                if held is None:
                    raise SecretNotFound(f"app {app!r} has no secret {key!r}")
                out[key] = str(held.get("stamp", ""))
                continue
            _, stamp = _new_stamp()
            try:
                sealed = self.box.seal(rkey, value)
            except SecretError as exc:
                raise SecretInputError(f"secret {key}: {exc}") from None
            writes.append(("secret", rkey, {**sealed, "mount": "file", "stamp": stamp, "source": STACK_SOURCE}))
            out[key] = stamp
        return out, writes

    def _holds(self, rkey: str, held: dict[str, Any], value: str) -> bool:
        try:
            return self.box.unseal(rkey, held) == value
        except SecretError:
            return False  # sealed with a key this node lacks: set it again

    # -- what a replica gets ---------------------------------------------------------------

    def material(self, spec: AppSpec) -> SecretMaterial:
        """The app's secrets, opened, as its release wants them; SecretsNotReady when this
        node does not hold the version of a secret the release was made for yet."""
        for key, stamp in spec.secrets.items():
            rec = self.store.peek("secret", _record_key(spec.name, key))
            if rec is None:
                raise SecretsNotReady(f"waiting for secret {key} to reach this node")
            if rec.value is None:
                if rec.ts.wall_ms < _stamp_ms(stamp):
                    raise SecretsNotReady(f"waiting for secret {key} to reach this node")
                continue  # removed since; the release that says so is on its way
            if str(rec.value.get("stamp", "")) < stamp:
                raise SecretsNotReady(f"waiting for the new value of secret {key} to reach this node")
        env: dict[str, str] = {}
        files: dict[str, str] = {}
        prefix = _record_key(spec.name, "")
        for rec in self.store.peek_records("secret", prefix=prefix):
            value = rec.value or {}
            try:
                plain = self.box.unseal(rec.key, value)
            except SecretError as exc:
                raise SecretsNotReady(str(exc)) from None
            (files if value.get("mount") == "file" else env)[rec.key[len(prefix):]] = plain
        return SecretMaterial(env, files)

    def give(self, spec: AppSpec, run: Container) -> Container:
        """``run`` with the app's secrets: its environment (a secret wins over a variable of
        the same name in the spec) and the bind mount of its secret files (named after its
        container: a replica's, or a job's, JobSpec)."""
        got = self.material(spec)
        if not got.env and not got.files:
            return run
        return replace(run, env={**run.env, **got.env}, binds=run.binds + self.write_files(run.name, got.files))

    def write_files(self, container: str, files: dict[str, str]) -> tuple[tuple[str, str, str], ...]:
        """Write a container's secret files (0400) and return the bind mount that shows
        them read-only at /run/secrets; none when it has no file secrets."""
        if not files:
            return ()
        self.files_dir.mkdir(mode=0o700, exist_ok=True)
        where = self.files_dir / container
        fresh = self.files_dir / f".{container}.new"
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir(mode=0o700)
        for key, value in files.items():
            fd = os.open(fresh / key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(value)
        # A container of that name made by an earlier try keeps its bind: same release, same
        # values; replace the directory whole so it never holds half of them.
        shutil.rmtree(where, ignore_errors=True)
        fresh.rename(where)
        os.chmod(where, 0o500)
        return ((str(where), SECRETS_MOUNT, "ro"),)

    def remove_files(self, container: str) -> None:
        where = self.files_dir / container
        if where.exists():
            shutil.rmtree(where, ignore_errors=True)
            log.debug("secret.files_removed", container=container)

    def sweep(self, containers: set[str]) -> int:
        """Remove the secret files of containers that are gone; returns how many."""
        if not self.files_dir.is_dir():
            return 0
        gone = [p for p in self.files_dir.iterdir() if p.name.lstrip(".").removesuffix(".new") not in containers
                or p.name.startswith(".")]
        for p in gone:
            shutil.rmtree(p, ignore_errors=True)
        if gone:
            log.info("secret.files_swept", count=len(gone))
        return len(gone)
