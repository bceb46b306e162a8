"""API routes of cluster upgrades (pleaco/reconcile/upgrade.py):

    POST /v1/upgrade     the body is a release bundle: verified, kept here, and a plan written
    GET  /v1/upgrade     the plan and each node's state

The bundle is streamed to a file in the data dir (``[upgrade] max_bundle_bytes``
at most, each read within ``[api] body_timeout``), never held in memory, and verified
(signature, digests, newer than the running version) before anything else: a refused
bundle is a 400 naming the problem and changes nothing, no plan and no file left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from pleaco import logs
from pleaco.api import jsonbody
from pleaco.api.errors import ApiError
from pleaco.errors import InvalidInput, Unavailable
from pleaco.host.bundleship import BundleShelf
from pleaco.host.config import UpgradeSettings
from pleaco.reconcile.upgrade import (
    PLAN_KEY,
    LocalUpgrades,
    check_no_running_plan,
    new_plan,
    node_infos,
    progress,
    read_plan,
)
from pleaco.store import Store

log = logs.get("pleaco.api.upgrade")

READ_CHUNK = 1 << 20
LIVE = ("alive", "suspect")


class UpgradeRoutes:
    def __init__(self, cfg: UpgradeSettings, store: Store, node_id: str, shelf: BundleShelf,
                 local: LocalUpgrades | None, members: Callable[[], list[dict[str, Any]]],
                 on_plan: Callable[[], None] = lambda: None) -> None:
        self.cfg = cfg
        self.store = store
        self.me = node_id
        self.shelf = shelf
        self.local = local
        self.members = members
        self.on_plan = on_plan

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/v1/upgrade", self.upload)
        app.router.add_get("/v1/upgrade", self.show)

    async def show(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def status(self) -> dict[str, Any]:
        plan = read_plan(self.store)
        if plan is None:
            return {"plan": None, "status": "none", "nodes": []}
        state = progress(plan, node_infos(self.store, self.members()), time.time(), self.cfg.absent_after)
        return {"plan": plan.to_value(), **state.to_json()}

    async def upload(self, request: web.Request) -> web.Response:
        if self.local is None:
            raise Unavailable("self-upgrade is not available on this node (no [upgrade] set-up)")
        temp = self.shelf.temp_path()
        try:
            sha256, size = await self.receive(request, temp)
            try:
                version = await asyncio.to_thread(self.local.verify, temp)
            except InvalidInput as exc:
                raise ApiError(400, "bundle_refused", f"bundle refused: {exc}") from None
            members = self.members()
            check_no_running_plan(self.store, members, self.cfg.absent_after)
            nodes = [m["id"] for m in members if m.get("state") in LIVE] + [self.me]
            plan = new_plan(version, sha256, size, self.me, nodes, time.time())
            await asyncio.to_thread(self.shelf.keep, temp, sha256)
            self.store.put("upgrade", PLAN_KEY, plan.to_value())
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        log.info("upgrade.planned", plan=plan.id, version=version, nodes=len(plan.order), sha256=sha256[:12],
                 bytes=size)
        self.on_plan()
        return web.json_response(self.status(), status=201)

    async def receive(self, request: web.Request, temp: Path) -> tuple[str, int]:
        """Stream the body to ``temp``: its SHA-256 and size. 413 over the limit (told before
        reading when the client says its length), 408 when a read stalls."""
        limit = self.cfg.max_bundle_bytes
        too_large = ApiError(413, "body_too_large", f"bundle too large (limit {limit} bytes, "
                                                    "[upgrade] max_bundle_bytes)")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        timeout = request.app.get(jsonbody.BODY_TIMEOUT, jsonbody.DEFAULT_BODY_TIMEOUT)
        digest = hashlib.sha256()
        size = 0
        with open(temp, "wb") as out:
            while True:
                try:
                    chunk = await asyncio.wait_for(request.content.read(READ_CHUNK), timeout)
                except TimeoutError:
                    raise ApiError(408, "body_timeout", f"bundle: no data for {timeout:g}s") from None
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise too_large
                digest.update(chunk)
                await asyncio.to_thread(out.write, chunk)
        if size == 0:
            raise ApiError(400, "bundle_refused", "bundle refused: the request body is empty (send the bundle file)")
        return digest.hexdigest(), size
