"""API routes for stacks (pleaco/stacks/service.py).

    GET    /v1/stacks           every stack: name and its services' apps
    GET    /v1/stacks/{name}    one stack: each service with its app's status (as apps show)
    PUT    /v1/stacks/{name}    {"compose": DOCUMENT, "wait": SECONDS, "secrets": {NAME: VALUE}}:
                                deploy (create or update); answers once every wave is
                                deployed, or with 409 dependency_not_healthy when a wave's
                                dependencies were not healthy within ``wait`` (default 120).
                                ``secrets``: the values of the document's secrets given by
                                ``file`` or ``environment`` (the CLI reads them); they are
                                kept sealed as the apps' secrets, never answered or logged
    DELETE /v1/stacks/{name}    remove every app of the stack
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from aiohttp import web

from pleaco.api import jsonbody
from pleaco.api.errors import ApiError
from pleaco.stacks.service import DEFAULT_WAIT, MAX_WAIT, StackService, service_of


def add_routes(app: web.Application, stacks: StackService, status: Callable[[str], dict[str, Any]]) -> None:
    """``status(app)``: the app's status as ``GET /v1/apps/{name}`` answers it."""

    async def listing(request: web.Request) -> web.Response:
        return web.json_response([
            {"name": name, "services": [{"service": service_of(s), "app": s.name, "revision": s.revision}
                                        for s in specs]}
            for name, specs in stacks.stacks().items()])

    async def show(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return web.json_response({"name": name, "services": [{"service": service_of(s), **status(s.name)}
                                                             for s in stacks.members(name)]})

    async def deploy(request: web.Request) -> web.Response:
        raw = await jsonbody.read(request)
        if not raw:
            raise ApiError(400, "invalid_body", 'request body is empty; expected {"compose": {...}}')
        body = jsonbody.parse(request, raw)
        if not isinstance(body, dict) or "compose" not in body or set(body) - {"compose", "wait", "secrets"}:
            raise ApiError(400, "invalid", 'body: expected {"compose": {...}, "wait": SECONDS, '
                                           '"secrets": {NAME: VALUE}}')
        wait = body.get("wait", DEFAULT_WAIT)
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not math.isfinite(wait) \
                or not 0 <= wait <= MAX_WAIT:
            raise ApiError(400, "invalid", f"wait: expected seconds 0..{MAX_WAIT:g}, got {wait!r}")
        result = await stacks.deploy(request.match_info["name"], body["compose"], float(wait), body.get("secrets"))
        return web.json_response(result.to_json())

    async def remove(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return web.json_response({"removed": name, "apps": stacks.remove(name)})

    app.router.add_get("/v1/stacks", listing)
    app.router.add_get("/v1/stacks/{name}", show)
    app.router.add_put("/v1/stacks/{name}", deploy)
    app.router.add_delete("/v1/stacks/{name}", remove)
