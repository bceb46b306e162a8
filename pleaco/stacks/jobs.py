"""One-off jobs: ``pleaco run APP -- CMD ...`` (a migration, a console script).

A job is a container of the app's current release (its image, environment, secrets and
limits) running the given command, on the node that took the API call. The API streams its
output and then its exit code (pleaco/api/jobs.py). The container is removed when the job
ends, when the client goes away before, and, for one an agent killed mid-job left behind,
when the agent starts again (``sweep``): no orphans. Its secret files are written under
``DATA_DIR/job-secrets/CONTAINER/`` and removed with it.

Jobs carry the ``job`` role label, never the four replica labels: the app loop never sees
them, neither to remove them nor to count them as replicas.
"""

from __future__ import annotations

import secrets as token
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from pleaco import errors, logs
from pleaco.apps import AppStore, validate_name
from pleaco.runtime import DockerRuntime, EngineUnavailable
from pleaco.runtime.docker import JobSpec
from pleaco.stacks.secrets import AppSecrets, SecretsNotReady

log = logs.get("pleaco.stacks.jobs")

JOB_FILES_DIR = "job-secrets"
# A command line is at most this many arguments and bytes: Linux's own argument limit is
# larger, but no command typed or scripted for a one-off job comes near, and a larger one
# is a mistake (a file pasted as an argument) better refused than run.
MAX_ARGS = 1024
MAX_COMMAND_BYTES = 64 << 10


class JobInputError(errors.InvalidInput, ValueError):
    pass


class JobNotFound(errors.NotFound, LookupError):
    pass


class JobRefused(errors.Conflict, RuntimeError, code="job_refused"):
    """The app cannot run a job on this node now; the message says why."""


@dataclass(frozen=True)
class Job:
    id: str
    app: str
    release: int
    container_id: str
    container: str  # its name


def validate_command(body: Any) -> tuple[str, ...]:
    if not isinstance(body, dict) or set(body) != {"command"}:
        raise JobInputError('body: expected {"command": ["CMD", "ARG", ...]}')
    command = body["command"]
    if not isinstance(command, list) or not command:
        raise JobInputError("command: expected a non-empty list of strings")
    if len(command) > MAX_ARGS:
        raise JobInputError(f"command: {len(command)} arguments, at most {MAX_ARGS}")
    size = 0
    for arg in command:
        if not isinstance(arg, str) or "\x00" in arg:
            raise JobInputError(f"command: argument {arg!r} is not a string without NUL")
        try:
            size += len(arg.encode())
        except UnicodeEncodeError:
            raise JobInputError("command: an argument is not valid UTF-8") from None
    if size > MAX_COMMAND_BYTES:
        raise JobInputError(f"command: {size} bytes, over the limit of {MAX_COMMAND_BYTES}")
    return tuple(command)


class OneOffJobs:
    """Starts, watches and removes this node's one-off job containers. Every call blocks
    (the API runs them in threads)."""

    def __init__(self, node_id: str, apps: AppStore, secrets: AppSecrets, runtime: DockerRuntime) -> None:
        self.node_id = node_id
        self.apps = apps
        self.secrets = secrets
        self.runtime = runtime

    def start(self, app: Any, body: Any) -> Job:
        """Start a job of the app's current release; JobRefused when it cannot run here now."""
        name = validate_name(app)
        command = validate_command(body)
        spec = self.apps.get(name)
        if spec is None:
            raise JobNotFound(f"app {name!r} does not exist")
        if spec.revision < 1:
            raise JobRefused(f"app {name!r} has no release yet (its first build or deploy makes one)")
        if not self.runtime.image_exists(spec.image):
            raise JobRefused(f"image {spec.image!r} of app {name!r} is not on this node; run the job through "
                             "the API of a node that runs a replica of it")
        try:
            given = self.secrets.material(spec)
        except SecretsNotReady as exc:
            raise JobRefused(f"app {name!r}: {exc}; try again in a moment") from None
        job_id = token.token_hex(4)
        job = JobSpec(app=name, node=self.node_id, job=job_id, image=spec.image, command=command,
                      env={**spec.env, **given.env}, memory=spec.memory,
                      nano_cpus=round(spec.cpus * 1e9) if spec.cpus else None, pids=spec.pids)
        job = replace(job, binds=self.secrets.write_files(job.name, given.files))
        try:
            cid = self.runtime.run_job(job)  # removes the container itself when its start fails
        except BaseException:
            self.secrets.remove_files(job.name)
            raise
        # The command is not logged: it may carry what the user would not have in a log.
        log.info("job.started", app=name, job=job_id, release=spec.revision, container=cid[:12])
        return Job(job_id, name, spec.revision, cid, job.name)

    def output(self, job: Job) -> Iterator[bytes]:
        """The job's output (stdout and stderr) as it comes; close() it to stop early."""
        return self.runtime.logs(job.container_id, follow=True)

    def wait(self, job: Job) -> int:
        return self.runtime.wait_job(job.container_id)

    def remove(self, job: Job, why: str) -> None:
        self.runtime.remove_job(job.container_id, self.node_id)
        self.secrets.remove_files(job.container)
        log.info("job.removed", app=job.app, job=job.id, container=job.container_id[:12], reason=why)

    def sweep(self) -> int:
        """Remove every job container of this node and their secret files: at the agent's
        start no job is being watched, so any there is was left by an earlier life."""
        try:
            found = self.runtime.list_jobs(self.node_id)
            for cid in found:
                self.runtime.remove_job(cid, self.node_id)
        except EngineUnavailable as exc:
            log.warning("job.sweep_failed", error=str(exc))
            return 0
        self.secrets.sweep(set())
        if found:
            log.info("job.swept", count=len(found))
        return len(found)
