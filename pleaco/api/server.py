"""The HTTP API: aiohttp, JSON in and out, bearer-token auth, under /v1.

Routes (all but /healthz need ``Authorization: Bearer TOKEN``):

    GET    /healthz                       liveness, unauthenticated
    GET    /metrics                       Prometheus text
    GET    /v1/status                     this node, its engine, counts
    GET    /v1/nodes                      cluster members (pleaco/api/cluster.py)
    GET    /v1/apps                       every app with its status (?limit=N&after=NAME: a page)
    GET    /v1/apps/{name}                one app
    PUT    /v1/apps/{name}                deploy (create or update)
    POST   /v1/apps/{name}/scale          {"replicas": N}
    POST   /v1/apps/{name}/rollback       back to the previous release
    PUT    /v1/apps/{name}/autoscale      {"min_replicas", "max_replicas", "metric", "target", ...} (POST too)
    DELETE /v1/apps/{name}/autoscale      autoscaling off; the count stays
    DELETE /v1/apps/{name}                remove
    GET    /v1/apps/{name}/logs           ?tail=N&follow=1, text/plain
    GET    /v1/apps/{name}/releases       the release history, oldest first

The dashboard (pleaco/ui) calls these same routes from the browser, authenticated by its
session cookie instead of the bearer token (pleaco/api/session.py: a change needs its CSRF
proof too); its own pages under /ui/ check the session themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pleaco import __version__, logs
from pleaco.api import jsonbody, session
from pleaco.api.config import ApiConfig
from pleaco.api.connections import AcceptErrorLog, ConnectionGuard
from pleaco.api.errors import ApiError, error_json
from pleaco.apps import AppSpec, AppStore, NotFound
from pleaco.errors import PleacoError
from pleaco.identity import Identity
from pleaco.metrics import Counter, Histogram, Registry
from pleaco.reconcile.apps import AppReconciler
from pleaco.reconcile.status import app_status
from pleaco.runtime import ContainerInfo
from pleaco.runtime.engine import Engine
from pleaco.store import Store

log = logs.get("pleaco.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Apps per chunk of GET /v1/apps: small enough that a write waits little behind a listing of
# thousands, large enough that the chunks' overhead does not show.
LIST_CHUNK = 200


class ApiServer:
    def __init__(
        self,
        *,
        identity: Identity,
        node_name: str,
        store: Store,
        apps: AppStore,
        reconciler: AppReconciler,
        runtime: Engine,
        registry: Registry,
        token: str,
        max_body_bytes: int,
        limits: ApiConfig | None = None,
        app_load: Callable[[str], dict[str, Any] | None] | None = None,
        app_scaling: Callable[[str], dict[str, Any] | None] | None = None,
    ) -> None:
        self.identity = identity
        # An app's cluster-wide load for `apps show` (pleaco.cluster.load), None: unknown.
        self.app_load = app_load or (lambda name: None)
        # What the autoscaler sees of an app now (pleaco.reconcile.autoscale), None: not autoscaled.
        self.app_scaling = app_scaling or (lambda name: None)
        self.node_name = node_name
        self.store = store
        self.apps = apps
        self.reconciler = reconciler
        self.runtime = runtime
        self.registry = registry
        self.token = token
        self.started = time.time()
        self.limits = limits or ApiConfig()
        self.connections = ConnectionGuard(self.limits)
        self._accept_errors = AcceptErrorLog()
        self.m_requests = registry.register(
            Counter(
                "pleaco_api_requests_total", "API requests by route, method and status.", ("route", "method", "status")
            )
        )
        self.m_latency = registry.register(
            Histogram("pleaco_api_request_duration_seconds", "API request latency by route.", ("route",))
        )
        self.app = web.Application(
            client_max_size=max_body_bytes,
            middlewares=[self.connections.middleware, self._errors, self._auth],
        )
        self.app[jsonbody.MAX_JSON_DEPTH] = self.limits.max_json_depth
        self.app[jsonbody.BODY_TIMEOUT] = self.limits.body_timeout
        r = self.app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/apps", self.list_apps)
        r.add_get("/v1/apps/{name}", self.show_app)
        r.add_put("/v1/apps/{name}", self.deploy_app)
        r.add_post("/v1/apps/{name}/scale", self.scale_app)
        r.add_post("/v1/apps/{name}/rollback", self.rollback_app)
        r.add_put("/v1/apps/{name}/autoscale", self.autoscale_app)
        r.add_post("/v1/apps/{name}/autoscale", self.autoscale_app)
        r.add_delete("/v1/apps/{name}/autoscale", self.autoscale_off)
        r.add_delete("/v1/apps/{name}", self.remove_app)
        r.add_get("/v1/apps/{name}/logs", self.app_logs)
        r.add_get("/v1/apps/{name}/releases", self.app_releases)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        # aiohttp's own keep-alive timer closes idle connections too (3.14 and later also
        # before the first request); the guard enforces the timeouts on any version.
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     keepalive_timeout=self.limits.idle_timeout)
        await self._runner.setup()
        assert self._runner.server is not None
        loop = asyncio.get_running_loop()
        # Not a web.TCPSite: the guard wraps aiohttp's protocol factory.
        self.connections.start(self._runner.server)
        self._accept_errors.install(loop)
        self._server = await loop.create_server(self.connections.protocol, host, port, reuse_address=True)
        log.info("api.listening", address=f"{host}:{port}", max_connections=self.connections.cap)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self.connections.stop()
        if self._runner is not None:
            await self._runner.cleanup()  # closes the connections aiohttp holds
        self._accept_errors.uninstall(asyncio.get_running_loop())

    # -- middlewares ---------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.monotonic()
        route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except PleacoError as exc:
            # Every module's errors map here, once, by their base (pleaco/errors.py).
            status = exc.status
            if status >= 500:
                log.error("api.failed", path=request.path, code=exc.code, error=str(exc))
            return web.json_response(error_json(exc), status=status)
        except web.HTTPException as exc:
            status = exc.status
            if exc.status < 400:
                raise
            code = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
                    413: "body_too_large"}.get(exc.status, "http_error")
            message = exc.text or exc.reason
            if exc.status == 413:
                message = f"request body too large (limit {request.app._client_max_size} bytes)"
            elif exc.status == 404:
                message = f"no such endpoint: {request.method} {request.path}"
            elif exc.status == 405:
                message = f"method {request.method} not allowed on {request.path}"
            return web.json_response(error_json(ApiError(exc.status, code, message)), status=exc.status)
        except Exception as exc:
            log.error("api.internal_error", exc_info=True, path=request.path, error=str(exc))
            return web.json_response(error_json(ApiError(500, "internal", str(exc))), status=500)
        finally:
            self.m_requests.inc(route=route, method=request.method, status=str(status))
            self.m_latency.observe(time.monotonic() - started, route=route)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/healthz":
            return await handler(request)
        if request.path == "/v1/hooks/github":
            # GitHub cannot send our bearer token: the webhook proves itself with its HMAC
            # signature instead, checked by the handler (pleaco/api/builds.py).
            return await handler(request)
        if request.path == "/ui" or request.path.startswith("/ui/"):
            # The dashboard's pages redirect to its login form without a session, and its
            # static files are public (pleaco/ui/pages.py).
            return await handler(request)
        header = request.headers.get("Authorization", "")
        if not header and session.COOKIE in request.cookies:
            session.check_cookie_request(request, self.token)  # the dashboard's session, and CSRF
            return await handler(request)
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer TOKEN)")
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(401, "unauthorized", "invalid token")
        return await handler(request)

    # -- helpers -------------------------------------------------------------------------

    async def _json_body(self, request: web.Request) -> Any:
        raw = await jsonbody.read(request)  # 413 past client_max_size, 408 past body_timeout
        if not raw:
            raise ApiError(400, "invalid_body", "request body is empty; expected a JSON object")
        return jsonbody.parse(request, raw)

    def app_json(self, name: str) -> dict[str, Any]:
        """An app's status as ``GET /v1/apps/{name}`` answers it (stacks show their services so)."""
        return self._with_live_figures(name, self._app_json(name))

    def _app_json(self, name: str) -> dict[str, Any]:
        spec = self.apps.get(name)
        if spec is None:
            raise NotFound(f"app {name!r} does not exist")
        rec = self.reconciler
        return app_status(rec.view, rec.routes, set(rec.live_nodes()), spec, self.apps.replicas(name)).to_json()

    # -- handlers ------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "node_id": self.identity.node_id})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.registry.render(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type": "text/plain; version=0.0.4"})

    async def status(self, request: web.Request) -> web.Response:
        obs = self.reconciler.view.observed
        return web.json_response(
            {
                "node_id": self.identity.node_id,
                "node_name": self.node_name,
                "version": __version__,
                "uptime_s": round(time.time() - self.started, 1),
                "engine": {"reachable": obs.engine_ok, "error": obs.engine_error, "url": self.runtime.base_url},
                "apps": len(self.apps.specs()),
                "containers": len(obs.containers),
                "running": sum(1 for c in obs.containers if c.running),
                "records": self.store.count(),
            }
        )

    async def list_apps(self, request: web.Request) -> web.StreamResponse:
        """Every app in name order; ``?limit=N`` pages it, ``&after=NAME`` (the last name of
        the previous page) continues it.

        The JSON array is written LIST_CHUNK apps at a time: the loop serves other requests
        (writes) between chunks, and no more than a chunk's worth is built at once."""
        after = request.query.get("after", "")
        raw_limit = request.query.get("limit")
        limit = None
        if raw_limit is not None:
            if not raw_limit.isdigit() or int(raw_limit) < 1:
                raise ApiError(400, "invalid", f"limit: expected a positive whole number, got {raw_limit!r}")
            limit = int(raw_limit)
        specs = self.apps.specs(after=after, limit=limit)
        live = set(self.reconciler.live_nodes())
        resp = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
        await resp.prepare(request)
        sep = "["
        for start in range(0, len(specs), LIST_CHUNK):
            chunk = [self._listed(spec, live) for spec in specs[start:start + LIST_CHUNK]]
            await resp.write((sep + json.dumps(chunk)[1:-1]).encode())
            sep = ","
            await asyncio.sleep(0)  # let waiting requests in even when the socket buffer took it all
        await resp.write(b"[]" if sep == "[" else b"]")
        await resp.write_eof()
        return resp

    async def show_app(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return web.json_response(self._with_live_figures(name, self._app_json(name)))

    def apps_json(self) -> list[dict[str, Any]]:
        """Every app as ``GET /v1/apps`` answers it, in one list (the dashboard's live view
        and history sample it; ``list_apps`` streams the same in chunks)."""
        live = set(self.reconciler.live_nodes())
        return [self._listed(spec, live) for spec in self.apps.specs()]

    def _listed(self, spec: AppSpec, live: set[str]) -> dict[str, Any]:
        rec = self.reconciler
        shown = app_status(rec.view, rec.routes, live, spec, self.apps.replicas(spec.name)).to_json()
        return self._with_live_figures(spec.name, shown)

    async def app_releases(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.apps.get(name) is None:
            raise NotFound(f"app {name!r} does not exist")
        return web.json_response(self.apps.releases(name))

    def _with_live_figures(self, name: str, shown: dict[str, Any]) -> dict[str, Any]:
        """An app's status with what is measured now: its cluster-wide load and, when it is
        autoscaled, the autoscaler's figures (the same in `apps show` and `apps list`)."""
        if shown.get("autoscaler") is not None:
            shown["autoscaler"]["figures"] = self.app_scaling(name)
        shown["load"] = self.app_load(name)
        return shown

    async def deploy_app(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        result = self.apps.deploy(request.match_info["name"], body)
        log.info(
            "app.deployed", app=result.spec.name, revision=result.spec.revision,
            image=result.spec.image, replicas=result.replicas, created=result.created,
        )
        self.reconciler.wake()
        return web.json_response(self._app_json(result.spec.name), status=201 if result.created else 200)

    async def scale_app(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        if not isinstance(body, dict) or set(body) != {"replicas"}:
            raise ApiError(400, "invalid", 'body: expected {"replicas": N}')
        n = self.apps.scale(request.match_info["name"], body["replicas"])
        log.info("app.scaled", app=request.match_info["name"], replicas=n)
        self.reconciler.wake()
        return web.json_response(self._app_json(request.match_info["name"]))

    async def autoscale_app(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await self._json_body(request)
        policy = self.apps.set_autoscale(name, body)
        log.info("app.autoscale_set", app=name, min=policy.min_replicas, max=policy.max_replicas,
                 metric=policy.metric, target=policy.target)
        self.reconciler.wake()
        return web.json_response(self._app_json(name))

    async def autoscale_off(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.apps.clear_autoscale(name):
            log.info("app.autoscale_off", app=name)
        return web.json_response(self._app_json(name))

    async def rollback_app(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        spec = self.apps.rollback(name)
        log.info("app.rolled_back", app=name, revision=spec.revision, image=spec.image)
        self.reconciler.wake()
        return web.json_response(self._app_json(name))

    async def remove_app(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        self.apps.remove(name)
        log.info("app.removed", app=name)
        self.reconciler.wake()
        return web.json_response({"removed": name})

    async def app_logs(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if self.apps.get(name) is None:
            raise NotFound(f"app {name!r} does not exist")
        tail_arg = request.query.get("tail", "100")
        if tail_arg != "all" and (not tail_arg.isdigit() or int(tail_arg) > 100_000):
            raise ApiError(400, "invalid", "tail: expected a number up to 100000, or 'all'")
        tail: int | str = tail_arg if tail_arg == "all" else int(tail_arg)
        follow = request.query.get("follow", "") in ("1", "true", "yes")
        found = await asyncio.to_thread(self.runtime.list_managed, self.identity.node_id, name)
        containers = sorted(found, key=lambda c: (c.replica, c.release))
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        await LogStreamer(self.runtime, containers, tail, follow).copy_to(resp)
        return resp


class LogStreamer:
    """Merges the output of several containers into one stream of lines, each prefixed
    with its replica. A reader thread per container (the SDK's log stream blocks) feeds an
    asyncio queue; closing the streams unblocks the threads."""

    def __init__(self, runtime: Engine, containers: list[ContainerInfo], tail: int | str, follow: bool) -> None:
        self.runtime = runtime
        self.containers = containers
        self.tail = tail
        self.follow = follow

    async def copy_to(self, resp: web.StreamResponse) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1000)
        streams: list[Any] = []
        lock = threading.Lock()
        closed = threading.Event()

        def put(item: bytes | None) -> None:
            if not closed.is_set():
                asyncio.run_coroutine_threadsafe(queue.put(item), loop).result()

        def reader(c: ContainerInfo) -> None:
            prefix = f"[{c.app}.{c.replica} r{c.release}] ".encode()
            try:
                stream = self.runtime.logs(c.id, tail=self.tail, follow=self.follow)
                with lock:
                    streams.append(stream)
                buf = b""
                for chunk in stream:
                    if closed.is_set():
                        break
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        put(prefix + line + b"\n")
                if buf:
                    put(prefix + buf + b"\n")
            except Exception as exc:  # a container removed meanwhile ends its stream
                put(prefix + f"(log stream ended: {exc})\n".encode())
            finally:
                put(None)

        threads = [threading.Thread(target=reader, args=(c,), daemon=True) for c in self.containers]
        for t in threads:
            t.start()
        remaining = len(threads)
        try:
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                    continue
                await resp.write(item)
        except ConnectionResetError:
            pass  # the client went away
        finally:
            closed.set()
            with lock:
                for s in streams:
                    with contextlib.suppress(Exception):
                        s.close()
            while not queue.empty():
                queue.get_nowait()
