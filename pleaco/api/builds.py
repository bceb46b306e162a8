"""API routes of the build pipeline, added to the aiohttp app by ``add_routes``:

    POST /v1/apps/{name}/connect    {"repo", "branch"?, "webhook_secret"?, "repo_token"?, "deploy_key"?}
    GET  /v1/builds                 ?app=NAME: builds, newest first
    GET  /v1/builds/{id}            one build
    GET  /v1/builds/{id}/logs       ?follow=1: the build log, text/plain
    POST /v1/builds/{id}/cancel     cancel an unfinished build
    POST /v1/hooks/github           GitHub's webhook: no bearer token, X-Hub-Signature-256

The webhook checks the signature over the raw body before it parses anything. GitHub signs
with the secret of one webhook, and the body says which repository it is about only once
parsed, so the signature is checked against every connected app's secret (an HMAC each,
microseconds); only the apps whose secret matches can be acted on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from pleaco import logs
from pleaco.api import jsonbody
from pleaco.api.errors import ApiError
from pleaco.builds.logship import BuildLogs, LogNotFound, follow_log
from pleaco.builds.model import DELIVERY_KEY_HEX, Build, Connection
from pleaco.builds.service import BuildService
from pleaco.builds.source import COMMIT, ZERO_COMMIT
from pleaco.cluster.transport import TransportError

log = logs.get("pleaco.api.builds")

HOOK_PATH = "/v1/hooks/github"
# Bodies up to this size are signature-checked on the event loop (well under 1 ms per app);
# larger ones in a worker thread.
INLINE_HMAC_BYTES = 64 << 10


def sign(secret: str, body: bytes) -> str:
    """GitHub's X-Hub-Signature-256 value for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def build_json(b: Build) -> dict[str, Any]:
    return b.to_value()


class BuildRoutes:
    def __init__(self, service: BuildService, logs: BuildLogs | None = None) -> None:
        self.service = service
        self.logs = logs  # other nodes' build logs (none without a cluster)

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/apps/{name}/connect", self.connect)
        r.add_get("/v1/builds", self.list_builds)
        r.add_get("/v1/builds/{id}", self.show_build)
        r.add_get("/v1/builds/{id}/logs", self.build_logs)
        r.add_post("/v1/builds/{id}/cancel", self.cancel_build)
        r.add_post(HOOK_PATH, self.github_hook)

    # -- connect and builds --------------------------------------------------------------

    async def connect(self, request: web.Request) -> web.Response:
        raw = await jsonbody.read(request)
        body = jsonbody.parse(request, raw) if raw else None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid", 'body: expected {"repo": URL, "branch": B, "webhook_secret": S}')
        allowed = {"repo", "branch", "webhook_secret", "repo_token", "deploy_key"}
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(400, "invalid", f"{unknown[0]}: unknown field (allowed: {', '.join(sorted(allowed))})")
        done = await asyncio.to_thread(
            self.service.connect, request.match_info["name"], body.get("repo"), body.get("branch"),
            body.get("webhook_secret"), body.get("repo_token"), body.get("deploy_key"))
        conn = done.connection
        base = self.service.cfg.public_url.rstrip("/") or str(request.url.origin())
        return web.json_response(
            {"app": conn.app, "repo": conn.repo, "branch": conn.branch, "webhook_url": base + HOOK_PATH,
             "webhook_secret": done.secret, "content_type": "application/json", "app_created": done.created,
             "private": done.private},
            status=201 if done.created else 200,
        )

    def _build(self, request: web.Request) -> Build:
        b = self.service.builds.get(request.match_info["id"])
        if b is None:
            raise ApiError(404, "not_found", f"build {request.match_info['id']!r} does not exist")
        return b

    async def list_builds(self, request: web.Request) -> web.Response:
        app = request.query.get("app") or None
        return web.json_response([build_json(b) for b in self.service.builds.all(app)])

    async def show_build(self, request: web.Request) -> web.Response:
        return web.json_response(build_json(self._build(request)))

    async def cancel_build(self, request: web.Request) -> web.Response:
        b = self._build(request)
        if not b.active:
            raise ApiError(409, "not_active", f"build {b.id} is already {b.state}")
        after = await asyncio.to_thread(self.service.cancel, b.id)
        return web.json_response(build_json(after or b))

    async def build_logs(self, request: web.Request) -> web.StreamResponse:
        """The build's log, read here, or from the node that ran it (pleaco.builds.logship)."""
        b = self._build(request)
        follow = request.query.get("follow", "") in ("1", "true", "yes")
        chunks: AsyncIterator[bytes]
        if self.service.log_path(b.id).exists() or b.node in ("", self.service.node_id):
            if b.state != "queued" and not self.service.log_path(b.id).exists():
                raise ApiError(404, "no_log", f"build {b.id} has no log")
            chunks = follow_log(self.service, b.id, follow)
        elif self.logs is None:
            raise ApiError(404, "not_here", f"the log of build {b.id} is kept on node {b.node}")
        else:
            chunks = self.logs.read_from(b.node, b.id, follow)
            try:
                first = await anext(chunks, b"")  # errors before the answer starts are the API's
            except LogNotFound as exc:
                raise ApiError(404, "not_here", str(exc)) from None
            except TransportError as exc:
                raise ApiError(503, "unavailable", str(exc)) from None
            chunks = _prepend(first, chunks)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        try:
            async for chunk in chunks:
                await resp.write(chunk)
        except ConnectionResetError:
            pass  # the client went away
        except (LogNotFound, TransportError) as exc:  # the building node went away mid-log
            with contextlib.suppress(ConnectionResetError):
                await resp.write(f"\n(log stream ended: {exc})\n".encode())
        return resp

    # -- the webhook ---------------------------------------------------------------------

    def _signed_by(self, conns: list[Connection], body: bytes, given: str) -> list[Connection]:
        """The connections whose webhook secret signed ``body`` as ``given`` says."""
        signed_by = []
        for conn in conns:
            secret = self.service.webhook_secret(conn.app)
            if secret and hmac.compare_digest(sign(secret, body).encode(), given.encode()):
                signed_by.append(conn)
        return signed_by

    async def github_hook(self, request: web.Request) -> web.Response:
        body = await jsonbody.read(request, self.service.cfg.webhook_max_body_bytes, "webhook body")
        given = request.headers.get("X-Hub-Signature-256", "")
        if not given:
            raise ApiError(401, "unauthorized", "missing X-Hub-Signature-256 header")
        conns = self.service.builds.connections()
        # HMAC costs ~5 ms per MB per app: a large body is checked off the event loop.
        if len(body) > INLINE_HMAC_BYTES:
            signed_by = await asyncio.to_thread(self._signed_by, conns, body, given)
        else:
            signed_by = self._signed_by(conns, body, given)
        if not signed_by:
            log.warning("webhook.bad_signature", delivery=request.headers.get("X-GitHub-Delivery", ""))
            raise ApiError(401, "unauthorized", "X-Hub-Signature-256 does not match any connected app's secret")
        # Signed: now the body may be parsed.
        payload = jsonbody.parse(request, body, "payload")
        if not isinstance(payload, dict):
            raise ApiError(400, "invalid", "payload: expected a JSON object")
        event = request.headers.get("X-GitHub-Event", "")
        delivery = request.headers.get("X-GitHub-Delivery", "")
        repo = payload.get("repository")
        names = [str(repo.get(k)) for k in ("clone_url", "ssh_url", "html_url", "full_name", "git_url", "url")
                 if isinstance(repo, dict) and isinstance(repo.get(k), str)]
        apps = [c for c in signed_by if c.matches(names)]
        if not apps:
            raise ApiError(404, "unknown_repository",
                           f"no app with this webhook secret is connected to repository {names[0] if names else '?'}")
        if event == "ping":
            return web.json_response({"event": "ping", "ok": True, "apps": [c.app for c in apps]})
        if event != "push":
            return web.json_response({"event": event, "ignored": f"event {event!r} does not trigger builds"})
        ref, after = payload.get("ref"), payload.get("after")
        if not isinstance(ref, str) or not isinstance(after, str):
            raise ApiError(400, "invalid", "push payload: ref and after must be strings")
        if payload.get("deleted") is True or after == ZERO_COMMIT:
            return web.json_response({"event": "push", "ignored": f"{ref} was deleted"})
        if not ref.startswith("refs/heads/"):
            return web.json_response({"event": "push", "ignored": f"{ref} is not a branch"})
        branch = ref.removeprefix("refs/heads/")
        tracked = [c for c in apps if c.branch == branch]
        if not tracked:
            return web.json_response({"event": "push", "ignored": f"branch {branch!r} is not tracked "
                                      f"(tracking {', '.join(sorted({c.branch for c in apps}))})"})
        if not COMMIT.fullmatch(after):
            raise ApiError(400, "invalid", f"push payload: after: {after!r} is not a commit id")
        # Redeliveries are recognised by what the signature covers, the body: the delivery
        # header is not signed, so a replay can carry any.
        key = hashlib.sha256(body).hexdigest()[:DELIVERY_KEY_HEX]
        results: list[dict[str, Any]] = []
        for conn in tracked:
            res = await asyncio.to_thread(self.service.push, conn, after, key, "webhook")
            log.info("webhook.push", app=conn.app, commit=after, delivery=delivery, body_sha256=key,
                     outcome=res.outcome)
            result: dict[str, Any] = {"app": conn.app, "outcome": res.outcome,
                                      "build": res.build.id if res.build else None}
            if res.reason:
                result |= {"reason": res.reason, "released_commit": res.released_commit}
            results.append(result)
        queued = any(r["outcome"] == "queued" for r in results)
        return web.json_response({"event": "push", "commit": after, "builds": results}, status=202 if queued else 200)


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


def add_routes(app: web.Application, service: BuildService, logs: BuildLogs | None = None) -> BuildRoutes:
    routes = BuildRoutes(service, logs)
    routes.add_to(app)
    return routes
