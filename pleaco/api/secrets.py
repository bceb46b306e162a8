"""API routes for app secrets (pleaco/stacks/secrets.py). No answer ever holds a value.

    GET    /v1/apps/{name}/secrets          the app's secrets: key, mount, set_ms
    PUT    /v1/apps/{name}/secrets/{key}    {"value": "...", "mount": "env" | "file"}: set, roll the app
    DELETE /v1/apps/{name}/secrets/{key}    remove, roll the app
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from pleaco.api import jsonbody
from pleaco.api.errors import ApiError
from pleaco.stacks.secrets import AppSecrets


def add_routes(app: web.Application, secrets: AppSecrets, changed: Callable[[], None]) -> None:
    """``changed`` is called after a write (wakes the app loop: the new release rolls)."""

    async def listing(request: web.Request) -> web.Response:
        return web.json_response([s.to_json() for s in secrets.infos(request.match_info["name"])])

    async def put(request: web.Request) -> web.Response:
        raw = await jsonbody.read(request)
        if not raw:
            raise ApiError(400, "invalid_body", 'request body is empty; expected {"value": "...", "mount": "env"}')
        body = jsonbody.parse(request, raw)
        info = secrets.put(request.match_info["name"], request.match_info["key"], body)
        changed()
        return web.json_response(info.to_json())

    async def delete(request: web.Request) -> web.Response:
        name, key = request.match_info["name"], request.match_info["key"]
        secrets.remove(name, key)
        changed()
        return web.json_response({"removed": key, "app": name})

    app.router.add_get("/v1/apps/{name}/secrets", listing)
    app.router.add_put("/v1/apps/{name}/secrets/{key}", put)
    app.router.add_delete("/v1/apps/{name}/secrets/{key}", delete)
