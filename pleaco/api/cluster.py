"""API routes for the cluster: members, founding, join tokens, removal.

    GET    /v1/nodes              every known node: id, name, state, address, version, last_seen, load, upgrade,
                                  labels
    DELETE /v1/nodes/{node}       revoke a node's key (id, unique id prefix, or name)
    POST   /v1/cluster/init       found a cluster with this node as its first member
    GET    /v1/cluster/token      a join token for new nodes
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from pleaco import logs
from pleaco.api.errors import ApiError
from pleaco.cluster.service import Cluster, ClusterError
from pleaco.errors import InvalidInput, NotFound

log = logs.get("pleaco.api.cluster")


def nodes_json(cluster: Cluster, load: Callable[[], dict[str, Any]],
               labels: Callable[[str], dict[str, str]] = lambda node: {}) -> list[dict[str, Any]]:
    """Every known node as ``GET /v1/nodes`` answers it (the dashboard's live view too);
    ``labels`` gives a node's labels (pleaco.stacks.labels)."""
    # Other nodes' load as their route records (their replicas, gossiped) tell it.
    replicas: dict[str, int] = {}
    for rec in cluster.store.records("route"):
        value = rec.value or {}
        node = value.get("node")
        if isinstance(node, str):
            replicas[node] = replicas.get(node, 0) + len(value.get("instances") or [])
    out = []
    for m in cluster.members():
        me = m["id"] == cluster.identity.node_id
        record = cluster.store.value("node", m["id"]) or {}
        out.append({**m, "self": me, "load": load() if me else {"containers": replicas.get(m["id"], 0)},
                    # its last upgrade: plan, phase, version, reason
                    "upgrade": record.get("upgrade"), "labels": labels(m["id"])})
    return out


def find_member(members: list[dict[str, Any]], wanted: str) -> dict[str, Any]:
    """The member named by id, unique id prefix (6+ characters) or name; 404 or 400 else."""
    matches = [m for m in members if m["id"] == wanted or m["name"] == wanted
               or (len(wanted) >= 6 and m["id"].startswith(wanted))]
    if not matches:
        raise NotFound(f"no node {wanted!r}")
    if len(matches) > 1:
        raise ApiError(400, "ambiguous", f"{wanted!r} matches {len(matches)} nodes; give the full id")
    return matches[0]


def add_routes(app: web.Application, cluster: Cluster, load: Callable[[], dict[str, Any]],
               labels: Callable[[str], dict[str, str]] = lambda node: {}) -> None:
    """``load`` gives this node's own load figures (containers and so on) for /v1/nodes,
    ``labels`` a node's labels (pleaco.stacks.labels)."""

    async def nodes(request: web.Request) -> web.Response:
        return web.json_response(nodes_json(cluster, load, labels))

    async def remove_node(request: web.Request) -> web.Response:
        member = find_member(cluster.members(), request.match_info["node"])
        try:
            cluster.revoke(member["id"])
        except ClusterError as exc:
            # A conflict elsewhere, but here only the request can be wrong (a node naming itself).
            raise InvalidInput(str(exc)) from None
        log.info("node.removed", member=member["id"])
        return web.json_response({"removed": member["id"]})

    async def init(request: web.Request) -> web.Response:
        cluster_id = await cluster.init()
        return web.json_response({"cluster_id": cluster_id, "node_id": cluster.identity.node_id}, status=201)

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"token": cluster.token()})

    app.router.add_get("/v1/nodes", nodes)
    app.router.add_delete("/v1/nodes/{node}", remove_node)
    app.router.add_post("/v1/cluster/init", init)
    app.router.add_get("/v1/cluster/token", token)
