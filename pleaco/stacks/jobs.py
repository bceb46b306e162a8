"""One-off jobs: ``pleaco run APP -- CMD ...`` (a migration, a console script).

A job is a container of the app's current release made as its replicas are (one recipe,
pleaco.reconcile.container: image, environment, secrets, entrypoint, limits, named volumes,
the ``pleaco`` network and its names) running the given command, on the node that took the
API call. An app with volumes runs its jobs where its replicas run, on the node holding the
volumes: another node refuses, naming it; a volume no node holds yet is claimed by the node
taking the job, as a restore does. The API streams its output and then its exit code
(pleaco/api/jobs.py). The container is removed when the job
ends, when the client goes away before, and, for one an agent killed mid-job left behind,
when the agent starts again (``sweep``): no orphans. Its secret files are written under
``DATA_DIR/job-secrets/CONTAINER/`` and removed with it.

Jobs carry the ``job`` role label, never the four replica labels: the app loop never sees
them, neither to remove them nor to count them as replicas.
"""

from __future__ import annotations

import secrets as token
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pleaco import errors, logs
from pleaco.apps import AppSpec, AppStore, validate_name
from pleaco.reconcile.container import release_container
from pleaco.reconcile.view import NodeView
from pleaco.runtime import DockerRuntime, EngineUnavailable
from pleaco.runtime.docker import JobSpec
from pleaco.stacks.secrets import AppSecrets, SecretsNotReady
from pleaco.stacks.volumes import VolumeConflict, Volumes

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

    def __init__(self, view: NodeView, apps: AppStore, secrets: AppSecrets, runtime: DockerRuntime,
                 volumes: Volumes, live_nodes: Callable[[], Sequence[str]],
                 node_address: Callable[[str], tuple[str, str]]) -> None:
        self.node_id = view.node_id
        # How this node makes the app's containers now (its network and resolvers).
        self.view = view
        self.apps = apps
        self.secrets = secrets
        self.runtime = runtime
        self.volumes = volumes
        self.live_nodes = live_nodes
        # A node's name and API address, to send a job of an app with volumes there.
        self.node_address = node_address

    def volume_holder(self, spec: AppSpec) -> str | None:
        """The live node holding the app's volumes, the one node its jobs run on (None: the
        app has no volumes, or no live node holds them)."""
        return self.volumes.holder(spec, self.live_nodes())

    def start(self, app: Any, body: Any) -> Job:
        """Start a job of the app's current release; JobRefused when it cannot run here now."""
        name = validate_name(app)
        command = validate_command(body)
        spec = self.apps.get(name)
        if spec is None:
            raise JobNotFound(f"app {name!r} does not exist")
        if spec.revision < 1:
            raise JobRefused(f"app {name!r} has no release yet (its first build or deploy makes one)")
        claim = self._where_its_volumes_are(spec)
        if self.view.cluster_network and not self.view.network:
            raise JobRefused(f"this node's network is not ready yet (its replicas wait for it too): "
                             f"{self.view.network_error or 'the network loop has not made it'}; try again in a moment")
        if not self.runtime.image_exists(spec.image):
            raise JobRefused(f"image {spec.image!r} of app {name!r} is not on this node; run the job through "
                             "the API of a node that runs a replica of it")
        if claim:
            try:
                claimed = self.volumes.claim_for_use(spec, self.node_id)
            except VolumeConflict as exc:
                raise JobRefused(f"app {spec.name!r}: {exc}") from None
            for r in claimed:
                log.info("volume.claimed", app=r.app, volume=r.volume, node=r.node, by="job")
        job_id = token.token_hex(4)
        job = JobSpec.of(release_container(spec, self.view, 0), job_id, command)
        try:
            job = self.secrets.give(spec, job)
        except SecretsNotReady as exc:
            raise JobRefused(f"app {name!r}: {exc}; try again in a moment") from None
        try:
            cid = self.runtime.run_job(job)  # removes the container itself when its start fails
        except BaseException:
            self.secrets.remove_files(job.name)
            raise
        # The command is not logged: it may carry what the user would not have in a log.
        log.info("job.started", app=name, job=job_id, release=spec.revision, container=cid[:12])
        return Job(job_id, name, spec.revision, cid, job.name)

    def _where_its_volumes_are(self, spec: AppSpec) -> bool:
        """Refuse (JobRefused) unless the app's volumes are on this node, naming the node
        they are on, or saying why no node can take the job; whether this node must claim
        volumes no node holds yet first."""
        try:
            node, claim = self.volumes.node_for(spec, self.node_id, self.live_nodes())
        except VolumeConflict as exc:
            raise JobRefused(f"app {spec.name!r}: {exc}") from None
        if node != self.node_id:
            node_name, api = self.node_address(node)
            raise JobRefused(f"app {spec.name!r} runs where its volumes are, on node {node_name} ({node[:12]}): "
                             f"run the job through that node's API, at {api} (--api http://{api})")
        return claim

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
