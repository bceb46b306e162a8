"""API routes of the reverse proxy: ``GET /v1/proxy``, this node's proxy and its routes."""

from __future__ import annotations

from aiohttp import web

from pleaco.ingress.proxy import ProxyReconciler


def add_routes(app: web.Application, proxy: ProxyReconciler) -> None:
    """Add the proxy's routes to the API app (before it starts; auth and errors apply)."""

    async def show(request: web.Request) -> web.Response:
        return web.json_response(proxy.status())

    app.router.add_get("/v1/proxy", show)
