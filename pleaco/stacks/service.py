"""Stacks: the apps a compose file makes (pleaco.stacks.compose), deployed and removed together.

Service S of stack N is app ``N-S``. Membership lives in each app's own spec (its ``stack``
field), not in a record of the stack: the app and the fact that it belongs to the stack are
one record, written in one transaction, so no merge of concurrent writes can leave a stack
listing an app that is gone or miss one that exists; ``stack ls`` and ``show`` read the
apps (kept decoded in memory by AppStore), and a stack exists while it has an app.

A deploy checks the whole file and the cluster's state first (pleaco.stacks.compose: keys,
names, cycles; here: an app of that name outside the stack, a host name taken), and writes
nothing when anything is wrong. It then deploys the services in waves of the depends_on
order: a wave goes once the services it depends on are healthy (all their replicas of the
current release), and AppStore.deploy leaves an unchanged service's release alone (no new
revision, no restart). Last, the apps of the stack that the file no longer has are removed.

A service's ``secrets`` go into its app's release with it (one release: its replicas roll
once, and only when a value changed, pleaco.stacks.secrets.AppSecrets.stack_writes), and
its ``x-pleaco-jobs`` become its app's schedules of source ``stack`` (those of other sources,
``jobs schedule``'s, stay). The values come with the request and are written sealed only:
no log line, answer or error holds one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pleaco import errors, logs
from pleaco.apps import AppSpec, AppStore, validate_name
from pleaco.builds.engine import Cancel
from pleaco.builds.stackbuild import ServiceBuild, ServiceRelease
from pleaco.stacks.compose import ComposeError, StackPlan, loads, plan
from pleaco.stacks.schedule import ScheduleStore
from pleaco.stacks.secrets import AppSecrets

log = logs.get("pleaco.stacks.service")

# Seconds between looks at a dependency's health while a deploy waits for it: its replicas
# become healthy on the app loop's passes, which are no more frequent.
POLL = 0.25
# Seconds a deploy waits for the services a wave depends on, unless the request says:
# an image pull and a first health check fit, and a service that is not healthy after two
# minutes needs looking at rather than waiting on.
DEFAULT_WAIT = 120.0
MAX_WAIT = 3600.0


class StackNotFound(errors.NotFound, LookupError):
    pass


class StackConflict(errors.Conflict, RuntimeError, code="stack_conflict"):
    """The file is valid, but the cluster holds something in its way (named in the message)."""


class SecretMissing(errors.Conflict, RuntimeError, code="stack_secret_missing"):
    """An ``external`` secret of a service is not set on its app (named, with the command)."""


class DependencyNotHealthy(errors.Conflict, RuntimeError, code="dependency_not_healthy"):
    """A wave's dependencies were not healthy in time; the later waves were not deployed."""


@dataclass(frozen=True)
class DeployedService:
    service: str
    app: str
    revision: int
    created: bool
    changed: bool  # a new release (its replicas roll); False: left as it was

    def to_json(self) -> dict[str, Any]:
        return {"service": self.service, "app": self.app, "revision": self.revision,
                "created": self.created, "changed": self.changed}


@dataclass(frozen=True)
class StackDeploy:
    name: str
    services: tuple[DeployedService, ...]
    removed: tuple[str, ...]  # apps of services the file dropped
    waves: tuple[tuple[str, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {"stack": self.name, "services": [s.to_json() for s in self.services],
                "removed": list(self.removed), "waves": [list(w) for w in self.waves]}


def service_of(spec: AppSpec) -> str:
    """The service name of a stack's app (its name without ``STACK-``)."""
    assert spec.stack is not None
    return spec.name.removeprefix(f"{spec.stack}-")


class StackService:
    def __init__(self, apps: AppStore, secrets: AppSecrets, schedules: ScheduleStore,
                 healthy: Callable[[str], bool], changed: Callable[[], None], poll: float = POLL) -> None:
        self.apps = apps
        self.secrets = secrets
        self.schedules = schedules
        # Whether app NAME has all its wanted replicas of its current release healthy,
        # across the cluster (the same count as `apps show`).
        self.healthy = healthy
        self.changed = changed  # after writes: wakes the app loop
        self.poll = poll

    def stacks(self) -> dict[str, list[AppSpec]]:
        """Every stack's apps, by stack name."""
        found: dict[str, list[AppSpec]] = {}
        for spec in self.apps.specs():
            if spec.stack is not None:
                found.setdefault(spec.stack, []).append(spec)
        return dict(sorted(found.items()))

    def members(self, name: Any) -> list[AppSpec]:
        name = validate_name(name)
        members = [s for s in self.apps.specs() if s.stack == name]
        if not members:
            raise StackNotFound(f"stack {name!r} does not exist")
        return members

    def check(self, stack: StackPlan) -> None:
        """What in the cluster stands in the way of deploying ``stack``; raises before any write."""
        others = {s.name: s for s in self.apps.specs() if s.stack != stack.name}
        for svc in stack.services:
            if (existing := others.get(svc.app)) is not None:
                owner = f"service of stack {existing.stack!r}" if existing.stack else "a plain app (apps deploy)"
                raise StackConflict(f"services.{svc.name}: app {svc.app!r} exists and is {owner}, not stack "
                                    f"{stack.name!r}'s; remove it or rename the service")
            host = svc.body.get("host")
            if host is None:
                continue
            taken = sorted(s.name for s in self.apps.specs() if s.host == host and s.name != svc.app)
            if taken:
                raise StackConflict(f"services.{svc.name}.x-pleaco.host: {host!r} is already used by app {taken[0]!r}")
        for svc in stack.services:
            for secret in svc.secrets:
                if secret.value is None and (why := self.secrets.unusable_external(svc.app, secret.target)):
                    exists = self.apps.get(svc.app) is not None
                    raise SecretMissing(
                        f"services.{svc.name}.secrets: external secret {secret.source!r} (file {secret.target}) "
                        f"of app {svc.app} {why}: set it with `pleaco secrets set {svc.app} {secret.target} "
                        "--mount file`" + ("" if exists else
                                           " once the app exists (give it with 'file' or 'environment' on "
                                           "the stack's first deploy)"))

    async def deploy(self, name: Any, doc: Any, wait: float = DEFAULT_WAIT, secrets: Any = None) -> StackDeploy:
        """``secrets``: the values of the file's secrets given by ``file`` or
        ``environment``, by name (pleaco.stacks.compose.read_secrets)."""
        return await self.deploy_plan(plan(name, doc, self.apps.max_replicas, secret_values=secrets), wait)

    async def deploy_plan(self, stack: StackPlan, wait: float = DEFAULT_WAIT,
                          release_info: dict[str, Any] | None = None) -> StackDeploy:
        """Deploy a checked plan; ``release_info`` (a build's commit and id) goes into the
        release record of each service this deploy changes."""
        self.check(stack)
        before = {s.name for s in self.apps.specs() if s.stack == stack.name}
        deadline = time.monotonic() + wait
        done: list[DeployedService] = []
        for wave in stack.waves:
            needs = sorted({dep for svc in wave for dep in stack.service(svc).depends_on})
            await self._wait_healthy(stack, needs, deadline, wave)
            for svc_name in wave:
                svc = stack.service(svc_name)
                current = self.apps.get(svc.app)
                stamps, writes = self.secrets.stack_writes(svc.app, current.secrets if current else {},
                                                           {s.target: s.value for s in svc.secrets})
                result = self.apps.deploy(svc.app, svc.body, release_info=release_info, stack=stack.name,
                                          secrets=stamps, secret_writes=writes)
                self.schedules.replace_from(svc.app, [(j.name, j.cron, j.command) for j in svc.jobs], "stack")
                done.append(DeployedService(svc.name, svc.app, result.spec.revision, result.created,
                                            result.new_release))
                log.info("stack.service_deployed", stack=stack.name, service=svc.name, app=svc.app,
                         revision=result.spec.revision, changed=result.new_release,
                         secrets=[s.target for s in svc.secrets], jobs=[j.name for j in svc.jobs])
            self.changed()
        dropped = sorted(before - {svc.app for svc in stack.services})
        for app in dropped:
            self.apps.remove(app)
            log.info("stack.service_removed", stack=stack.name, app=app)
        if dropped:
            self.changed()
        log.info("stack.deployed", stack=stack.name, services=len(done),
                 changed=sum(d.changed for d in done), removed=len(dropped))
        return StackDeploy(stack.name, tuple(done), tuple(dropped), stack.waves)

    async def _wait_healthy(self, stack: StackPlan, needs: list[str], deadline: float,
                            wave: tuple[str, ...]) -> None:
        while waiting := [s for s in needs if not self.healthy(stack.service(s).app)]:
            if time.monotonic() >= deadline:
                raise DependencyNotHealthy(
                    f"stack {stack.name!r}: {', '.join(waiting)} not healthy in time; "
                    f"{', '.join(wave)} and what depends on them not deployed (see pleaco stack show "
                    f"{stack.name}, then deploy again)")
            await asyncio.sleep(self.poll)

    def remove(self, name: Any) -> list[str]:
        """Remove every app of the stack; returns their names."""
        apps = [s.name for s in self.members(name)]
        for app in apps:
            self.apps.remove(app)
        log.info("stack.removed", stack=name, apps=len(apps))
        self.changed()
        return apps


@dataclass(frozen=True)
class RepoStack:
    """A connected repository's compose file, checked (pleaco.builds.stackbuild.StackRelease)."""

    plan: StackPlan
    builds: tuple[ServiceBuild, ...]
    repo_stacks: RepoStacks

    def deploy(self, images: dict[str, str], release_info: dict[str, Any], cancel: Cancel) -> list[ServiceRelease]:
        return self.repo_stacks.deploy(self.plan.with_images(images), release_info, cancel)


class RepoStacks:
    """What the build pipeline deploys a repository's compose file with: the stack is named
    as the connected app, its services with ``build`` run the images the build made, and
    the deploy runs on the agent's event loop (the build runs in a worker thread)."""

    def __init__(self, stacks: StackService, loop: asyncio.AbstractEventLoop, wait: float = DEFAULT_WAIT) -> None:
        self.stacks = stacks
        self.loop = loop
        self.wait = wait

    def check(self, stack: str, filename: str, raw: bytes, read_text: Callable[[str], str]) -> RepoStack:
        """The whole file checked as ``stack deploy`` checks one (with ``build`` allowed), and
        the cluster's state; every error names the file (pleaco.builds.stackbuild.StackCheck)."""
        base = posixpath.dirname(filename)
        try:
            doc = loads(raw, filename, lambda name: read_text(posixpath.join(base, name)))
            checked = plan(stack, doc, self.stacks.apps.max_replicas, builds=True)
            self.stacks.check(checked)
        except ComposeError as exc:
            message = str(exc)
            raise ComposeError(message if message.startswith(filename) else f"{filename}: {message}") from None
        except StackConflict as exc:
            raise StackConflict(f"{filename}: {exc}") from None
        except SecretMissing as exc:
            raise SecretMissing(f"{filename}: {exc}") from None
        builds = tuple(ServiceBuild(s.name, s.app, s.build.context, s.build.dockerfile, s.build.args)
                       for s in checked.services if s.build is not None)
        return RepoStack(checked, builds, self)

    def deploy(self, stack: StackPlan, release_info: dict[str, Any], cancel: Cancel) -> list[ServiceRelease]:
        running = asyncio.run_coroutine_threadsafe(self.stacks.deploy_plan(stack, self.wait, release_info), self.loop)
        # A newer push, or the agent stopping, stops a deploy waiting on a wave's
        # dependencies at once (the waves written stay; the next deploy finishes the job).
        def stop() -> None:
            running.cancel()

        with cancel.on_cancel(stop):
            try:
                done = running.result()
            except concurrent.futures.CancelledError:
                cancel.check()
                raise
        return [ServiceRelease(d.service, d.app, d.revision, d.changed) for d in done.services]
