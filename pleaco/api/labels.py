"""API route for node labels (pleaco/stacks/labels.py).

    PUT    /v1/nodes/{node}/labels    {"labels": ["KEY=VALUE", "KEY-", ...]}: set and remove; answers the node's labels
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from pleaco.api import jsonbody
from pleaco.api.cluster import find_member
from pleaco.api.errors import ApiError
from pleaco.stacks.labels import NodeLabels


def add_routes(app: web.Application, labels: NodeLabels, members: Callable[[], list[dict[str, Any]]],
               changed: Callable[[], None]) -> None:
    """``members`` lists the cluster's nodes (to find one by id, prefix or name); ``changed``
    is called after a write (the app loop places again)."""

    async def put(request: web.Request) -> web.Response:
        raw = await jsonbody.read(request)
        body = jsonbody.parse(request, raw) if raw else None
        if not isinstance(body, dict) or set(body) != {"labels"}:
            raise ApiError(400, "invalid", 'body: expected {"labels": ["KEY=VALUE", "KEY-", ...]}')
        member = find_member(members(), request.match_info["node"])
        now = labels.change(member["id"], body["labels"])
        changed()
        return web.json_response({"id": member["id"], "name": member.get("name", ""), "labels": now})

    app.router.add_put("/v1/nodes/{node}/labels", put)
