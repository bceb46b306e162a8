"""The build service: connects repositories, accepts pushes, and runs builds to a release.

A build runs in a worker thread, step by step, and writes its state to its ``build``
record at every step, so any node (and ``pleaco builds``) sees where it is:

    queued -> fetching -> building -> testing -> scanning [-> pushing] -> succeeded | failed | cancelled

- **Newest commit wins.** A push queues a build and cancels every unfinished older build of
  that app (the running one is aborted: its engine build stream is shut down, its test
  container killed), so only the newest commit is released. Nothing is lost: the newer
  commit holds the older one's history, and the cancelled build's record says which build
  superseded it.
- **Never orphaned.** A build record names the node running it. An agent that starts finds
  its own unfinished builds and resumes them from the start (the fetched source is
  reused), up to ``build.max_attempts`` times, then fails them with the reason; it also
  removes any build container its predecessor left behind.
- **Release.** A build that passes its tests and scan deploys its image through
  ``AppStore.deploy``: a new release (image id, commit, build id, spec revision), which
  the app reconciler rolls out. With ``build.registry`` set, the image is first pushed as
  REGISTRY/APP:COMMIT12 and the release names that reference instead of the image id.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pleaco import logs
from pleaco.apps import AppStore, ValidationError, validate_name
from pleaco.builds import scan as scanner
from pleaco.builds import source as sourcemod
from pleaco.builds.builders import BuildRequest, EngineBuilder, KanikoBuilder, builder_for
from pleaco.builds.config import BuildConfig
from pleaco.builds.engine import BuildEngine, BuildFailed, Cancel, Cancelled, PushFailed
from pleaco.builds.manifest import FILENAME, Manifest, ManifestError, parse
from pleaco.builds.model import (
    BRANCH,
    REPO_CHARS,
    Build,
    BuildStore,
    Connection,
    Write,
    build_id,
    canonical_repo,
    now_ms,
)
from pleaco.builds.secrets import SecretBox, SecretError
from pleaco.builds.stackbuild import (
    COMPOSE_FILES,
    ContextError,
    ServiceBuild,
    StackCheck,
    context_tarball,
    read_text,
)
from pleaco.builds.vulndb import load_db
from pleaco.errors import Conflict, InvalidInput, PleacoError
from pleaco.metrics import Counter, Histogram, Registry
from pleaco.placement import Owners
from pleaco.reconcile.loop import Loop
from pleaco.runtime import EngineUnavailable
from pleaco.store import RecordTooLarge, Store

log = logs.get("pleaco.builds")

# An app made by `apps connect` before its first build: no image yet, 0 replicas.
AWAITING_IMAGE = "pleaco/awaiting-first-build:none"
IMAGE_REPO = "pleaco-build"
# Test output and scan findings kept in the (replicated) record; the full output stays in
# the build log on the building node.
RECORD_OUTPUT_BYTES = 8192
RECORD_FINDINGS = 100
# The same per service of a stack's build (several share the record's room).
SERVICE_OUTPUT_BYTES = 1024
SERVICE_FINDINGS = 10


class ConnectError(InvalidInput, ValueError):
    """Bad input to `apps connect`; the message names the field."""


class StepFailed(PleacoError, RuntimeError, code="build_step_failed"):
    """A build step failed for a reason the user must fix; the message says which."""


@dataclass(frozen=True)
class PushResult:
    # queued | duplicate_delivery | already_built | already_running | already_failed |
    # released_again | stale_push | app_removed
    outcome: str
    build: Build | None
    reason: str = ""  # why nothing was built (stale_push)
    released_commit: str = ""  # stale_push: the newer commit the app keeps


@dataclass(frozen=True)
class Connected:
    """What `apps connect` did: the connection, the webhook secret, whether the app was
    created, and whether credentials for the repository are kept."""

    connection: Connection
    secret: str
    created: bool
    private: bool


class _BuildCancel(Cancel):
    """Cancel token that also says which state the build ends in: ``None`` leaves the
    record as it is (the agent is stopping; the next start resumes the build)."""

    final_state: str | None = "cancelled"
    superseded_by: str = ""

    def stop(self, reason: str, final_state: str | None) -> None:
        if not self.cancelled:
            self.final_state = final_state
        self.cancel(reason)


class BuildService(Loop):
    """The build queue: this node's queued builds, one per app at a time (a loop)."""

    name = "builds"
    # Queued builds are also dispatched when woken (a push, a finished build); the interval
    # only catches what a wake missed.
    interval = 5.0

    def __init__(self, cfg: BuildConfig, data_dir: Path, node_id: str, store: Store, apps: AppStore,
                 engine: BuildEngine, registry: Registry | None = None, secretbox: SecretBox | None = None,
                 owners: Owners | None = None,
                 on_release: Callable[[str, Manifest], None] = lambda app, manifest: None,
                 stack_check: StackCheck | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        # Checks a repository's compose file and deploys it as a stack (pleaco.stacks, a
        # layer above: the agent hands it in); None: such a build fails, saying so.
        self.stack_check = stack_check
        # Called with a release's app and manifest before it is deployed (its [jobs]).
        self.on_release = on_release
        # An app's builds run on its owner (pleaco.placement), whichever node took the push.
        self.owners = owners or Owners(node_id, lambda: [node_id])
        self.secretbox = secretbox or SecretBox(data_dir)
        self.data_dir = data_dir
        self.node_id = node_id
        self.builds = BuildStore(store)
        self.store = store
        self.apps = apps
        self.engine = engine
        self.log_dir = data_dir / "build" / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="build")
        self._scan_pool = ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="scan")
        self._running: dict[str, tuple[str, _BuildCancel]] = {}  # app -> (build id, cancel)
        self._lock = threading.Lock()
        self._push_lock = threading.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        registry = registry or Registry()
        self.m_builds = registry.register(
            Counter("pleaco_builds_total", "Builds finished on this node, by final state.", ("state",)))
        # Builds take seconds to minutes: buckets up to the default 15-minute time limit.
        self.m_steps = registry.register(Histogram(
            "pleaco_build_step_duration_seconds", "Duration of build steps (fetch, build, test, scan).", ("step",),
            buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)))
        self.builder: EngineBuilder | KanikoBuilder = builder_for(cfg, engine)

    # -- connecting ----------------------------------------------------------------------

    def connect(self, app: Any, repo: Any, branch: Any, secret: Any, repo_token: Any = None,
                deploy_key: Any = None) -> Connected:
        """Connect (or re-connect) a repository; creates the app when missing.
        ``repo_token`` (HTTPS) or ``deploy_key`` (SSH private key text) reach a private
        repository; both are kept as secrets, never in the connection record. Credentials
        belong to the repository they were given with: connecting the app to another
        repository drops those not given again, so a token is never sent to a URL it was
        not given for."""
        try:
            name = validate_name(app)
        except ValidationError as exc:
            raise ConnectError(str(exc)) from None
        if not isinstance(repo, str) or not repo.strip() or any(c in repo for c in "\n\r\x00 "):
            raise ConnectError(f"repo: {repo!r} is not a repository URL")
        if len(repo) > REPO_CHARS:
            raise ConnectError(f"repo: longer than {REPO_CHARS} characters")
        if repo.startswith("-"):
            raise ConnectError(f"repo: {repo!r} must not start with '-'")
        branch = "main" if branch is None else branch
        if not isinstance(branch, str) or not BRANCH.fullmatch(branch):
            raise ConnectError(f"branch: {branch!r} is not a branch name")
        if secret is not None and (not isinstance(secret, str) or not 8 <= len(secret) <= 256
                                   or not secret.isprintable()):
            raise ConnectError("webhook_secret: expected 8..256 printable characters")
        if repo_token is not None and (not isinstance(repo_token, str) or not repo_token
                                       or not repo_token.isprintable() or len(repo_token) > 1024):
            raise ConnectError("repo_token: expected a token of printable characters")
        if deploy_key is not None and (not isinstance(deploy_key, str) or "PRIVATE KEY-----" not in deploy_key
                                       or len(deploy_key) > 16384):
            raise ConnectError("deploy_key: expected an SSH private key (the text of the key file)")
        key = f"webhook/{name}"
        if not secret:
            try:
                secret = self.secretbox.get(self.store, key)
            except SecretError as exc:  # it cannot work as it is: a new one, which the answer shows
                log.warning("build.webhook_secret_replaced", app=name, error=str(exc))
        secret = secret or secrets.token_hex(20)
        known = self.builds.connection(name)
        same_repo = known is not None and canonical_repo(known.repo) == canonical_repo(repo)
        conn = known or Connection(app=name, repo=repo, branch=branch)
        conn.repo, conn.branch = repo, branch
        if not same_repo:
            conn.deliveries, conn.last_commit = [], ""
        created = self.apps.get(name) is None
        credentials = {f"repo-token/{name}": repo_token, f"deploy-key/{name}": deploy_key}
        try:
            writes: list[Write] = [self.builds.connection_write(conn), self.secretbox.put_write(key, secret)]
            for ckey, given in credentials.items():
                if given is not None:
                    writes.append(self.secretbox.put_write(ckey, given))
                elif not same_repo and self.store.value("secret", ckey) is not None:
                    writes.append(("secret", ckey, None))  # another repository's: never sent to this one
        except SecretError as exc:
            raise ConnectError(str(exc)) from None
        if created:
            writes += self.apps.create_writes(name, AWAITING_IMAGE)
        try:
            self.store.put_many(writes)
        except RecordTooLarge as exc:
            field = {"deploy-key": "deploy_key", "repo-token": "repo_token"}.get(exc.key.split("/")[0], "repo")
            raise ConnectError(f"{field}: too large to replicate ({exc})") from None
        private = any(given is not None or (same_repo and self.store.value("secret", ckey) is not None)
                      for ckey, given in credentials.items())
        log.info("build.repo_connected", app=name, repo=repo, branch=branch, app_created=created, private=private)
        return Connected(conn, secret, created, private)

    def git_auth(self, app: str) -> sourcemod.GitAuth:
        try:
            return sourcemod.GitAuth(token=self.secretbox.get(self.store, f"repo-token/{app}"),
                                     ssh_key=self.secretbox.get(self.store, f"deploy-key/{app}"))
        except SecretError as exc:  # fails the fetch (the build says why), never a loop
            raise sourcemod.SourceError(f"{exc}; connect the app again with its credentials") from None

    def webhook_secret(self, app: str) -> str | None:
        """The app's webhook secret; None (no delivery matches it) when it does not open."""
        try:
            return self.secretbox.get(self.store, f"webhook/{app}")
        except SecretError as exc:
            log.warning("build.webhook_secret_unreadable", app=app, error=str(exc))
            return None

    # -- pushes --------------------------------------------------------------------------

    def push(self, conn: Connection, commit: str, delivery: str = "", trigger: str = "webhook") -> PushResult:
        """A new head commit for a connected app: queue its build (or say why not)."""
        # One push at a time: deliveries arrive concurrently (GitHub retries, the poller),
        # and the delivery list and the supersede order are read-modify-write.
        with self._push_lock:
            return self._push(conn, commit, delivery, trigger)

    def _push(self, conn: Connection, commit: str, delivery: str, trigger: str) -> PushResult:
        if self.apps.get(conn.app) is None:
            # `apps rm` removed the app; a push must not bring it back.
            return PushResult("app_removed", None)
        fresh = self.builds.connection(conn.app) or conn
        bid = build_id(conn.app, commit)
        existing = self.builds.get(bid)
        if (stale := self._stale(existing)) is not None:
            # Before the delivery check: a replayed body is refused for what it asks.
            reason = (f"commit {commit[:12]} is older than commit {stale.commit[:12]}, which build {stale.id} "
                      f"released (revision {stale.release}); a push only moves an app forward: "
                      f"`pleaco apps rollback {conn.app}` goes back")
            log.warning("build.stale_push", app=conn.app, commit=commit, released=stale.commit, trigger=trigger)
            return PushResult("stale_push", existing, reason, stale.commit)
        if delivery and delivery in fresh.deliveries:
            return PushResult("duplicate_delivery", existing)
        if delivery:
            fresh.deliveries.append(delivery)
        fresh.last_commit = commit
        outcome = "queued"
        build: Build | None = existing
        if existing is not None and existing.active:
            outcome = "already_running"
        elif existing is not None and existing.state == "failed":
            outcome = "already_failed"
        elif existing is not None and existing.state == "succeeded":
            outcome = "already_built"
        else:
            # New, or cancelled earlier (superseded, then pushed again): build it now.
            build = Build(id=bid, app=conn.app, commit=commit, repo=fresh.repo, branch=fresh.branch,
                          trigger=trigger, delivery=delivery, node=self.owners.owner(conn.app) or self.node_id,
                          attempt=existing.attempt if existing else 0)
        self.builds.put_push(fresh, build if outcome == "queued" else None)
        if outcome == "queued":
            assert build is not None
            log.info("build.queued", app=conn.app, build=build.id, commit=commit, trigger=trigger)
            self._supersede(conn.app, build)
            self.wake()
        elif outcome == "already_built" and existing is not None:
            outcome = self._release_again(existing)
        return PushResult(outcome, build)

    def _stale(self, pushed: Build | None) -> Build | None:
        """The newer released build that makes a push of ``pushed``'s commit a step back,
        or None. Only a commit that was built before can be known to be older: it is older
        when its build was queued before the newest build that released (pushes arrive in
        the order they were made; the newest commit wins). A commit never built is new;
        the newest released commit itself is not older (pushing it again after
        `apps rollback` releases it again)."""
        if pushed is None or pushed.state not in ("succeeded", "cancelled"):
            return None  # new, running, or failed (which releases nothing)
        released = [b for b in self.builds.all(pushed.app) if b.state == "succeeded" and b.release > 0]
        newest = released[0] if released else None  # all() is newest first
        if newest is None or newest.commit == pushed.commit:
            return None
        return newest if (pushed.created_ms, pushed.id) < (newest.created_ms, newest.id) else None

    def _supersede(self, app: str, newer: Build) -> None:
        reason = f"superseded by build {newer.id} (commit {newer.commit[:12]})"
        for b in self.builds.all(app):
            if b.id == newer.id or not b.active or b.created_ms > newer.created_ms:
                continue
            with self._lock:
                running = self._running.get(app)
            if running and running[0] == b.id:
                running[1].superseded_by = newer.id  # the worker writes the final state
                running[1].stop(reason, "cancelled")
                continue
            if b.node in ("", self.node_id):
                b.state, b.reason, b.superseded_by, b.finished_ms = "cancelled", reason, newer.id, now_ms()
                self.builds.put(b)
                log.info("build.cancelled", app=app, build=b.id, reason=reason)

    def _release_again(self, build: Build) -> str:
        if build.compose:
            return "already_built"  # a stack's services each keep their own releases (`apps rollback`)
        current = self.apps.get(build.app)
        image = build.pushed or build.image
        if current is None or current.image == image or not self.engine.image_id(image):
            return "already_built"
        try:
            manifest = self._manifest_of(build)
            self._release(build, manifest)
        except (ManifestError, ValidationError, sourcemod.SourceError) as exc:
            log.warning("build.release_again_failed", app=build.app, build=build.id, error=str(exc))
            return "already_built"
        return "released_again"

    def _manifest_of(self, build: Build) -> Manifest:
        src = sourcemod.fetch(self.data_dir, build.app, build.repo, build.commit, self.cfg.git_timeout,
                              self.git_auth(build.app))
        return parse(src.manifest_text or "")

    # -- the loop ------------------------------------------------------------------------

    def recover(self) -> None:
        """Resume (or fail) this node's builds that an earlier agent left unfinished."""
        with contextlib.suppress(EngineUnavailable):
            removed = self.engine.remove_leftovers()
            if removed:
                log.info("build.leftovers_removed", containers=removed)
        for b in self.builds.all():
            if b.node != self.node_id or not b.active or b.state == "queued":
                continue
            if b.attempt >= self.cfg.max_attempts:
                b.state, b.finished_ms = "failed", now_ms()
                b.reason = f"interrupted {b.attempt} times (the agent stopped during the build); not resumed"
            else:
                b.reason = f"resumed after the agent restarted (was {b.state})"
                b.state = "queued"
            self.builds.put(b)
            log.info("build.recovered", app=b.app, build=b.id, state=b.state, reason=b.reason)

    async def setup(self) -> None:
        await asyncio.to_thread(self.recover)

    async def step(self) -> str | None:
        await asyncio.to_thread(self.adopt)
        self._dispatch()
        return None

    def adopt(self) -> None:
        """Take over the unfinished builds of the apps this node owns now whose node left
        the cluster (it died, or was removed): they are queued here, from the start."""
        live = set(self.owners.live_nodes())
        if not live:
            return  # not knowing the members yet, nobody is known to be gone
        for b in self.builds.all():
            if not b.active or b.node in live or b.node == "" or not self.owners.owns(b.app):
                continue
            gone, was = b.node, b.state
            b.node, b.state = self.node_id, "queued"
            b.reason = f"taken over from node {gone[:12]}, which left the cluster (was {was})"
            self.builds.put(b)
            log.info("build.taken_over", app=b.app, build=b.id, from_node=gone, was=was)
            self.wake()

    async def teardown(self) -> None:
        with self._lock:
            running = list(self._running.values())
        for _, cancel in running:
            cancel.stop("the agent is stopping", None)
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(t), 10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._scan_pool.shutdown(wait=False, cancel_futures=True)

    def _dispatch(self) -> None:
        queued: dict[str, list[Build]] = {}
        for b in self.builds.all():
            if b.state == "queued" and b.node == self.node_id:
                queued.setdefault(b.app, []).append(b)
        for app, builds in queued.items():
            with self._lock:
                if app in self._running or len(self._running) >= self.cfg.concurrency:
                    continue
                newest = max(builds, key=lambda b: (b.created_ms, b.id))
                cancel = _BuildCancel()
                self._running[app] = (newest.id, cancel)
            self._supersede(app, newest)
            fut = asyncio.get_running_loop().run_in_executor(self._pool, self._execute, newest.id, cancel)
            task = asyncio.ensure_future(self._finish(app, fut))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _finish(self, app: str, fut: asyncio.Future[None]) -> None:
        try:
            await fut
        finally:
            with self._lock:
                self._running.pop(app, None)
            self.wake()

    def cancel(self, bid: str, reason: str = "cancelled by the user") -> Build | None:
        b = self.builds.get(bid)
        if b is None or not b.active:
            return b
        with self._lock:
            running = self._running.get(b.app)
        if running and running[0] == bid:
            running[1].stop(reason, "cancelled")
        else:
            b.state, b.reason, b.finished_ms = "cancelled", reason, now_ms()
            self.builds.put(b)
        return self.builds.get(bid)

    # -- one build (worker thread) -------------------------------------------------------

    def log_path(self, bid: str) -> Path:
        return self.log_dir / f"{bid}.log"

    def _execute(self, bid: str, cancel: _BuildCancel) -> None:
        b = self.builds.get(bid)
        if b is None or b.state != "queued":
            return
        timer = threading.Timer(self.cfg.timeout, cancel.stop,
                                (f"time limit of {self.cfg.timeout:.0f}s exceeded", "failed"))
        timer.daemon = True
        timer.start()
        with open(self.log_path(bid), "a", encoding="utf-8") as logf:
            def out(text: str) -> None:
                logf.write(text)
                logf.flush()

            b.attempt += 1
            b.started_ms, b.node, b.reason = now_ms(), self.node_id, ""
            out(f"==> build {bid}: {b.app} at {b.commit} (attempt {b.attempt}, node {self.node_id[:12]})\n")
            log.info("build.started", app=b.app, build=bid, commit=b.commit, attempt=b.attempt)
            try:
                self._steps(b, cancel, out)
                b.state = "succeeded"
                runs = f"stack {b.app} ({len(b.services)} services)" if b.compose else b.pushed or b.image
                out(f"==> succeeded: release {b.release} runs {runs}\n")
            except Cancelled as exc:
                if cancel.final_state is None:
                    out("==> interrupted: the agent is stopping; the build resumes when it starts again\n")
                    return
                b.state, b.reason, b.superseded_by = cancel.final_state, str(exc), cancel.superseded_by
                out(f"==> {b.state}: {b.reason}\n")
            except (StepFailed, ManifestError, sourcemod.SourceError, BuildFailed, ValidationError) as exc:
                b.state, b.reason = "failed", str(exc)
                out(f"==> failed: {b.reason}\n")
            except EngineUnavailable as exc:
                b.state, b.reason = "failed", f"Docker Engine unreachable: {exc}"
                out(f"==> failed: {b.reason}\n")
            except Exception as exc:
                log.error("build.internal_error", exc_info=True, app=b.app, build=bid)
                b.state, b.reason = "failed", f"internal error: {type(exc).__name__}: {exc}"
                out(f"==> failed: {b.reason}\n")
            finally:
                timer.cancel()
                # Before the final state: whoever sees the build finished sees its containers gone.
                with contextlib.suppress(Exception):
                    self.engine.remove_leftovers({bid})
                if b.state in ("succeeded", "failed", "cancelled"):
                    b.finished_ms = now_ms()
                    self.builds.put(b)
                    self.m_builds.inc(state=b.state)
                    for step, seconds in b.steps.items():
                        self.m_steps.observe(seconds, step=step)
                    log.info(f"build.{b.state}", app=b.app, build=bid, commit=b.commit, reason=b.reason,
                             seconds=round((b.finished_ms - b.started_ms) / 1000, 2))

    def _step(self, b: Build, state: str, cancel: Cancel, out: Callable[[str], None]) -> float:
        cancel.check()
        b.state = state
        self.builds.put(b)
        out(f"==> {state} (+{(now_ms() - b.started_ms) / 1000:.2f}s)\n")
        return time.monotonic()

    def _steps(self, b: Build, cancel: _BuildCancel, out: Callable[[str], None]) -> None:
        t = self._step(b, "fetching", cancel, out)
        src = sourcemod.fetch(self.data_dir, b.app, b.repo, b.commit, self.cfg.git_timeout, self.git_auth(b.app))
        b.source_sha256 = src.sha256
        out(f"source: {src.tarball.name} sha256:{src.sha256}\n")
        # A compose file makes the push a stack's, unless pleaco.toml sets [app] compose = false.
        if src.compose_file is not None and (src.manifest_text is None or parse(src.manifest_text).compose):
            self._stack_steps(b, cancel, out, src, t)
            return
        if src.manifest_text is None:
            raise StepFailed(f"the repository has no {FILENAME} nor a compose file ({', '.join(COMPOSE_FILES)}) "
                             f"at its root (commit {b.commit[:12]})")
        manifest = parse(src.manifest_text)
        b.steps["fetch"] = round(time.monotonic() - t, 3)

        t = self._step(b, "building", cancel, out)
        cache = f"{IMAGE_REPO}/{b.app}:cache"
        b.tag = f"{IMAGE_REPO}/{b.app}:{b.commit[:12]}"
        req = BuildRequest(
            build_id=b.id, app=b.app, commit=b.commit, tarball=src.tarball, dockerfile=manifest.dockerfile,
            tag=b.tag, build_args=manifest.build_args, run_labels=self.engine.labels(b.id, "kaniko"),
            cache_from=[cache] if self.engine.image_id(cache) else [],
            work_dir=self.data_dir / "build" / "work" / b.id,
        )
        b.image = self.builder.build(req, out, cancel)
        # The per-app cache: the next build of this app starts from this image's layers.
        self.engine.tag(b.image, f"{IMAGE_REPO}/{b.app}", "cache")
        out(f"image: {b.image} ({b.tag})\n")
        b.steps["build"] = round(time.monotonic() - t, 3)

        t = self._step(b, "testing", cancel, out)
        # The scan reads the image (as `docker save` streams it, no container) while the
        # tests run: both only read the image, and the tests hide the scan's read.
        trivy = scanner.trivy_path()
        packages_future = None if trivy else self._scan_pool.submit(self._packages, b)
        try:
            self._test_and_scan(b, manifest, cancel, out, t, trivy, packages_future)
        finally:
            if packages_future is not None:
                # Tests failed or the build was cancelled: let the image read finish before
                # the build is declared done.
                with contextlib.suppress(Exception):
                    packages_future.result()

        if self.cfg.registry:
            self._push_image(b, cancel, out)
        cancel.check()  # a newer push after the scan still wins: never release an older commit
        self._release(b, manifest)

    def _stack_steps(self, b: Build, cancel: _BuildCancel, out: Callable[[str], None], src: sourcemod.Source,
                     t: float) -> None:
        """A repository with a compose file: build, test and scan each service with ``build``,
        then deploy the stack named as the connected app (pleaco.builds.stackbuild)."""
        assert src.compose_file is not None and src.compose_raw is not None
        manifest = Manifest() if src.manifest_text is None else parse(src.manifest_text, beside=src.compose_file)
        if self.stack_check is None:
            raise StepFailed(f"{src.compose_file}: this agent deploys no stacks")
        try:
            # Checked whole before anything is built: a bad file fails here, naming the
            # file, the service and the key, and nothing that runs changes.
            release = self.stack_check(b.app, src.compose_file, src.compose_raw, read_text(src.tarball, ""))
        except (InvalidInput, Conflict) as exc:
            raise StepFailed(str(exc)) from None
        b.compose = src.compose_file
        work = self.data_dir / "build" / "work"
        contexts: dict[str, Path] = {}
        try:
            for sb in release.builds:
                contexts[sb.service] = context_tarball(src.tarball, sb, work / f"{b.id}.contexts" / f"{sb.service}.tar")
        except ContextError as exc:
            raise StepFailed(f"{src.compose_file}: {exc}") from None
        out(f"{src.compose_file}: stack {b.app}; services built here: "
            f"{', '.join(sb.service for sb in release.builds) or 'none'}\n")
        b.steps["fetch"] = round(time.monotonic() - t, 3)
        try:
            self._build_services(b, release.builds, contexts, manifest, cancel, out)
        finally:
            shutil.rmtree(work / f"{b.id}.contexts", ignore_errors=True)
        images = {svc: entry.get("pushed") or entry["image"] for svc, entry in b.services.items()}
        cancel.check()  # a newer push after the scan still wins: never release an older commit
        try:
            self.on_release(b.app, manifest)  # beside a compose file, no [jobs]: removes any an earlier release set
            done = release.deploy(images, {"commit": b.commit, "build": b.id}, cancel)
        except Cancelled:
            raise
        except PleacoError as exc:
            raise StepFailed(f"stack {b.app}: {exc}") from None
        for r in done:
            b.services.setdefault(r.service, {"app": r.app}).update(revision=r.revision, changed=r.changed)
            out(f"{r.service}: app {r.app} revision {r.revision} ({'updated' if r.changed else 'unchanged'})\n")
        b.release = max((r.revision for r in done), default=0)
        log.info("build.stack_released", app=b.app, build=b.id, commit=b.commit,
                 changed=sorted(r.service for r in done if r.changed))

    def _build_services(self, b: Build, builds: tuple[ServiceBuild, ...], contexts: dict[str, Path],
                        manifest: Manifest, cancel: _BuildCancel, out: Callable[[str], None]) -> None:
        """Each service's image, built, tested and scanned (and pushed with ``build.registry``)
        as a pleaco.toml app's is: each step for all of them before the next."""
        t = self._step(b, "building", cancel, out)
        for sb in builds:
            out(f"--> {sb.service}: {sb.context or '.'}/{sb.dockerfile}\n")
            cache = f"{IMAGE_REPO}/{sb.app}:cache"
            tag = f"{IMAGE_REPO}/{sb.app}:{b.commit[:12]}"
            req = BuildRequest(
                build_id=b.id, app=sb.app, commit=b.commit, tarball=contexts[sb.service], dockerfile=sb.dockerfile,
                tag=tag, build_args={**manifest.build_args, **sb.args}, run_labels=self.engine.labels(b.id, "kaniko"),
                cache_from=[cache] if self.engine.image_id(cache) else [],
                work_dir=self.data_dir / "build" / "work" / f"{b.id}-{sb.service}",
            )
            image = self.builder.build(req, out, cancel)
            self.engine.tag(image, f"{IMAGE_REPO}/{sb.app}", "cache")
            out(f"image: {image} ({tag})\n")
            b.services[sb.service] = {"app": sb.app, "image": image, "tag": tag}
        b.steps["build"] = round(time.monotonic() - t, 3)

        t = self._step(b, "testing", cancel, out)
        for sb in builds:
            entry = b.services[sb.service]
            out(f"--> {sb.service}\n")
            test, failure = self._run_tests(b.id, entry["image"], manifest, cancel, out)
            entry["test"] = {**test, "output": test["output"][-SERVICE_OUTPUT_BYTES:]} if "output" in test else test
            if failure:
                raise StepFailed(f"service {sb.service}: {failure}")
        b.steps["test"] = round(time.monotonic() - t, 3)

        t = self._step(b, "scanning", cancel, out)
        trivy = scanner.trivy_path()
        for sb in builds:
            entry = b.services[sb.service]
            out(f"--> {sb.service}\n")
            packages = None if trivy else self._packages_of(entry["image"])
            scan, failure = self._scan_image(entry["image"], manifest, trivy, packages, out)
            entry["scan"] = {**scan, "findings": scan["findings"][:SERVICE_FINDINGS]}
            if failure:
                raise StepFailed(f"service {sb.service}: {failure}")
        b.steps["scan"] = round(time.monotonic() - t, 3)

        if self.cfg.registry and builds:
            t = self._step(b, "pushing", cancel, out)
            for sb in builds:
                entry = b.services[sb.service]
                # Tagged by content, not commit: an image a push did not change keeps its
                # reference, so its service is not redeployed.
                entry["pushed"], entry["pushed_digest"] = self._push_to_registry(
                    entry["image"], sb.app, entry["image"].partition(":")[2][:12], cancel, out)
            b.steps["push"] = round(time.monotonic() - t, 3)

    def _push_image(self, b: Build, cancel: _BuildCancel, out: Callable[[str], None]) -> None:
        """``build.registry`` set: push the passed image as REGISTRY/APP:COMMIT12, which the
        release then names. A failed push fails the build: no release names an image that
        is not in the registry."""
        t = self._step(b, "pushing", cancel, out)
        b.pushed, b.pushed_digest = self._push_to_registry(b.image, b.app, b.commit[:12], cancel, out)
        b.steps["push"] = round(time.monotonic() - t, 3)

    def _push_to_registry(self, image: str, app: str, tag: str, cancel: _BuildCancel,
                          out: Callable[[str], None]) -> tuple[str, str]:
        """Push ``image`` as REGISTRY/APP:TAG; the reference and the digest the registry reported."""
        repository = f"{self.cfg.registry}/{app}"
        out(f"push: {repository}:{tag}\n")
        try:
            digest = self.engine.push(image, repository, tag, log=out, cancel=cancel)
        except PushFailed as exc:
            raise StepFailed(f"push to registry {self.cfg.registry} failed: {exc}") from None
        out(f"pushed: {repository}:{tag}" + (f" ({digest})" if digest else "") + "\n")
        return f"{repository}:{tag}", digest

    def _test_and_scan(self, b: Build, manifest: Manifest, cancel: _BuildCancel, out: Callable[[str], None],
                       t: float, trivy: str | None, packages_future: Future[list[scanner.Package]] | None) -> None:
        b.test, failure = self._run_tests(b.id, b.image, manifest, cancel, out)
        if failure:
            raise StepFailed(failure)
        b.steps["test"] = round(time.monotonic() - t, 3)

        t = self._step(b, "scanning", cancel, out)
        packages = None if packages_future is None else packages_future.result()
        b.scan, failure = self._scan_image(b.image, manifest, trivy, packages, out)
        b.steps["scan"] = round(time.monotonic() - t, 3)
        if failure:
            raise StepFailed(failure)

    def _run_tests(self, bid: str, image: str, manifest: Manifest, cancel: _BuildCancel,
                   out: Callable[[str], None]) -> tuple[dict[str, Any], str]:
        """The [test] command in a container of ``image``: its record, and why it failed ("" passed)."""
        if manifest.test_command is None:
            out("no [test] command: tests skipped\n")
            return {"skipped": f"no [test] command in {FILENAME}"}, ""
        limit = manifest.test_timeout or self.cfg.test_timeout
        out(f"$ {' '.join(manifest.test_command)}\n")
        res = self.engine.run_to_completion(
            image, manifest.test_command, labels=self.engine.labels(bid, "test"), time_limit=limit,
            cancel=cancel, mem_bytes=self.cfg.test_memory_bytes, nano_cpus=int(self.cfg.test_cpus * 1e9), log=out,
        )
        record = {"command": manifest.test_command, "exit_code": res.exit_code, "timed_out": res.timed_out,
                  "output": res.output[-RECORD_OUTPUT_BYTES:]}
        if res.timed_out:
            return record, f"tests did not finish within {limit:.0f}s"
        if res.exit_code != 0:
            return record, f"tests failed (exit code {res.exit_code})"
        return record, ""

    def _scan_image(self, image: str, manifest: Manifest, trivy: str | None, packages: list[scanner.Package] | None,
                    out: Callable[[str], None]) -> tuple[dict[str, Any], str]:
        """The scan of ``image`` (by trivy, or of ``packages`` read from it): its record, and
        why it blocks the release ("" it does not)."""
        if trivy:
            out(f"scan: using {trivy}\n")
            try:
                findings = scanner.trivy_scan(trivy, image, self.cfg.test_timeout)
            except scanner.TrivyError as exc:
                raise StepFailed(f"scan: {exc}") from None
            n_packages: int | None = None
        else:
            assert packages is not None
            findings = scanner.match(packages, load_db(self.data_dir))
            n_packages = len(packages)
        blocking = scanner.blocking(findings, manifest.fail_on)
        record = {"scanner": "trivy" if trivy else "pleaco-osv", "packages": n_packages, "fail_on": manifest.fail_on,
                  "findings": [f.to_json() for f in findings[:RECORD_FINDINGS]], "blocking": len(blocking)}
        counted = f"{n_packages} packages, " if n_packages is not None else ""
        out(f"scan: {counted}{len(findings)} known vulnerabilities "
            f"({len(blocking)} at or above fail_on={manifest.fail_on})\n")
        for f in findings:
            out(f"  {f.severity:8} {f.id} {f.package} {f.installed} (fixed in {f.fixed or 'no fixed version'})\n")
        if not blocking:
            return record, ""
        ids = ", ".join(f"{f.id} ({f.package} {f.installed}, {f.severity})" for f in blocking[:5])
        return record, f"scan: {len(blocking)} vulnerabilities at or above {manifest.fail_on}: {ids}"

    def _packages(self, b: Build) -> list[scanner.Package]:
        return self._packages_of(b.image)

    def _packages_of(self, image_ref: str) -> list[scanner.Package]:
        with self.engine.image_tar(image_ref) as image:
            return scanner.packages_from_image_tar(image)

    def _release(self, b: Build, manifest: Manifest) -> None:
        current = self.apps.get(b.app)
        if current is None:
            raise StepFailed(f"app {b.app!r} was removed during the build; nothing released")
        body: dict[str, Any] = {"image": b.pushed or b.image}
        if current is not None:
            body["env"] = current.env
            if current.host:
                body["host"] = current.host
            # The limits set by deploy stay (a build changes the image, not what it may use).
            for limit in ("memory", "cpus", "pids", "max_conns"):
                if getattr(current, limit) is not None:
                    body[limit] = getattr(current, limit)
            if current.volumes:  # and so does its data (pleaco.stacks.volumes)
                body["volumes"] = [m.to_value() for m in current.volumes]
            # So do the command and entrypoint it gave (a stack's service, a worker).
            for argv in ("command", "entrypoint"):
                if getattr(current, argv) is not None:
                    body[argv] = list(getattr(current, argv))
        port = manifest.port if manifest.port is not None else (current.port if current else None)
        if port is not None:
            body["port"] = port
            health = manifest.health if manifest.port is not None else (current.health if current else None)
            if health:
                body["health"] = health
        if manifest.replicas is not None:
            body["replicas"] = manifest.replicas
        elif current is None or current.image == AWAITING_IMAGE:
            body["replicas"] = 1
        info: dict[str, Any] = {"commit": b.commit, "build": b.id}
        if b.pushed:
            info |= {"image_id": b.image, "digest": b.pushed_digest}
        policy = manifest.autoscale
        if policy is not None and policy.max_replicas > self.apps.max_replicas:
            raise StepFailed(f"pleaco.toml: [scale] max: {policy.max_replicas} is above this cluster's "
                             f"max_replicas ({self.apps.max_replicas}); nothing released")
        # The repository's [jobs] are the app's scheduled jobs from this release on
        # (pleaco/stacks/schedule.py, a layer above: the agent hands its writer in).
        try:
            self.on_release(b.app, manifest)
        except InvalidInput as exc:
            raise StepFailed(f"pleaco.toml: [jobs]: {exc}; nothing released") from None
        result = self.apps.deploy(b.app, body, release_info=info)
        if policy is not None:
            # The repository's [scale] is the app's policy from this release on (a manifest
            # without one leaves the policy `apps autoscale` set).
            self.apps.set_autoscale(b.app, policy.to_value())
        b.release = result.spec.revision
        log.info("build.released", app=b.app, build=b.id, commit=b.commit, revision=b.release, image=body["image"])
