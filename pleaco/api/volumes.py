"""API routes for app volumes (pleaco/stacks/volumes.py).

    GET    /v1/volumes                            every volume: app, volume, node, state, running
    GET    /v1/volumes/{app}/{volume}/snapshot    the volume's content, a tar stream (application/x-tar)
    POST   /v1/volumes/{app}/{volume}/restore     body: a tar; replaces the volume's content
                                                  (?key=KEY: the tar is that snapshot in the object store)
    POST   /v1/volumes/{app}/{volume}/snapshots   a snapshot into the object store ([volumes] s3_*): its key
    GET    /v1/volumes/{app}/{volume}/snapshots   the volume's snapshots in the object store
    DELETE /v1/volumes/{app}[/{volume}]           remove (the holding node removes the Docker volume)

Snapshot and restore run on the node that holds the volume: asked of another node, they
answer 409 naming the holding node and its API address (there is no streaming between
nodes; the object store, too, is reached from the holding node, with its config). A restore
is refused (409) while a replica of the app runs: scale it to 0 first, restore, scale it up
again (stopping replicas behind the user's back would be a surprise).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from pleaco import logs
from pleaco.api.errors import ApiError
from pleaco.runtime import DockerRuntime
from pleaco.stacks.config import VolumeSettings
from pleaco.stacks.s3 import ObjectStore
from pleaco.stacks.volumes import NotATar, VolumeConflict, VolumeContent, VolumeRecord, Volumes, check_tar
from pleaco.store import Store

log = logs.get("pleaco.api.volumes")

CHUNK = 1 << 16


class VolumeRoutes:
    def __init__(self, volumes: Volumes, content: VolumeContent, runtime: DockerRuntime, store: Store, me: str,
                 live_nodes: Callable[[], Sequence[str]], running: Callable[[str], int], spool_dir: Path,
                 changed: Callable[[], None], settings: VolumeSettings | None = None) -> None:
        self.volumes = volumes
        # The object store's settings ([volumes] s3_*): a store is made per request, which
        # raises ObjectStoreNotConfigured (409, naming the settings) when there is none.
        self.settings = settings or VolumeSettings()
        self.content = content
        self.runtime = runtime
        self.store = store
        self.me = me
        self.live_nodes = live_nodes
        # How many replicas of an app run, cluster-wide (as ``apps show`` counts them).
        self.running = running
        # Where a restore's upload is written and checked before anything is changed.
        self.spool_dir = spool_dir
        # Called after a write (wakes the volume loop: a removal).
        self.changed = changed

    def add_to(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/volumes", self.listing)
        r.add_get("/v1/volumes/{app}/{volume}/snapshot", self.snapshot)
        r.add_post("/v1/volumes/{app}/{volume}/restore", self.restore)
        r.add_post("/v1/volumes/{app}/{volume}/snapshots", self.snapshot_to_store)
        r.add_get("/v1/volumes/{app}/{volume}/snapshots", self.stored_snapshots)
        r.add_delete("/v1/volumes/{app}", self.remove)
        r.add_delete("/v1/volumes/{app}/{volume}", self.remove)

    # -- where ---------------------------------------------------------------------------

    def _node(self, node_id: str) -> tuple[str, str]:
        """A node's name and API address, from its node record."""
        value = self.store.value("node", node_id) or {}
        return str(value.get("name") or node_id[:12]), str(value.get("address") or "unknown")

    def _here(self, rec: VolumeRecord) -> None:
        """Refuse (409) unless this node holds the volume, naming the node that does."""
        if rec.removing:
            raise VolumeConflict(f"volume {rec.volume} of app {rec.app} is being removed")
        if rec.node == self.me:
            return
        name, address = self._node(rec.node)
        if rec.node not in self.live_nodes():
            raise VolumeConflict(f"volume {rec.volume} of app {rec.app} is on node {name} ({rec.node[:12]}), "
                                 "which is down: it can be read only there, once the node is back")
        raise VolumeConflict(f"volume {rec.volume} of app {rec.app} is on node {name} ({rec.node[:12]}): "
                             f"ask that node's API, at {address} (--api http://{address})")

    # -- handlers ------------------------------------------------------------------------

    async def listing(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self._listing))

    def _listing(self) -> list[dict[str, Any]]:
        """Every volume with its state: mounted by its app with a replica running anywhere
        ("in_use") or none ("idle"), mounted by no app ("orphaned"), on its way out ("removing")."""
        live = set(self.live_nodes())
        out = []
        for rec in self.volumes.records():
            spec = self.volumes.apps.get(rec.app)
            mount = next((m for m in spec.volumes if m.name == rec.volume), None) if spec is not None else None
            if rec.removing:
                state = "removing"
            elif mount is None:
                state = "orphaned"
            else:
                state = "in_use" if self.running(rec.app) else "idle"
            out.append({"app": rec.app, "volume": rec.volume, "node": rec.node, "node_name": self._node(rec.node)[0],
                        "node_live": rec.node in live, "path": mount.path if mount else None, "state": state,
                        "created_ms": rec.created_ms})
        return out

    async def snapshot(self, request: web.Request) -> web.StreamResponse:
        app, volume = request.match_info["app"], request.match_info["volume"]
        rec = await asyncio.to_thread(self.volumes.lookup, app, volume)
        self._here(rec)
        stream = await asyncio.to_thread(self.content.snapshot, app, volume)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-tar",
                                           "Content-Disposition": f'attachment; filename="{app}-{volume}.tar"'})
        size = 0
        try:
            await resp.prepare(request)
            while chunk := await asyncio.to_thread(stream.read):
                size += len(chunk)
                await resp.write(chunk)
            await resp.write_eof()
            log.info("volume.snapshot", app=app, volume=volume, bytes=size)
        except ConnectionResetError:
            log.info("volume.snapshot_abandoned", app=app, volume=volume, bytes=size)
        finally:
            await asyncio.shield(asyncio.to_thread(stream.close))
        return resp

    async def restore(self, request: web.Request) -> web.Response:
        """The body's tar, or with ``?key=KEY`` that snapshot from the object store, into the
        volume: spooled to a file on this node and checked whole before anything changes."""
        app, volume = request.match_info["app"], request.match_info["volume"]
        key = request.query.get("key")
        store = ObjectStore(self.settings) if key is not None else None  # no store configured: refused first
        rec = await asyncio.to_thread(self._restore_target, app, volume)
        self._here(rec)
        busy = [c for c in await asyncio.to_thread(self.runtime.list_managed, self.me, app) if c.running]
        if busy:
            raise VolumeConflict(f"app {app} has {len(busy)} replica(s) running with volume {volume}: scale it to 0 "
                                 f"first (pleaco apps scale {app} 0), restore, then scale it up again")
        with self._spool("restore-") as spool:
            if store is not None and key is not None:
                size = await asyncio.to_thread(store.get, key, spool)
            else:
                size = 0
                with open(spool, "wb") as f:
                    while chunk := await request.content.read(CHUNK):
                        size += len(chunk)
                        await asyncio.to_thread(f.write, chunk)
            if size == 0:
                raise NotATar(f"{'snapshot ' + repr(key) if key else 'the request body'} is empty; "
                              "expected a tar archive")
            entries = await asyncio.to_thread(check_tar, spool)
            await asyncio.to_thread(self.content.restore, app, volume, spool)
        log.info("volume.restored", app=app, volume=volume, bytes=size, entries=entries, key=key)
        return web.json_response({"app": app, "volume": volume, "node": self.me, "bytes": size, "entries": entries,
                                  **({"key": key} if key is not None else {})})

    @contextlib.contextmanager
    def _spool(self, prefix: str) -> Iterator[Path]:
        """A file in the spool directory, removed afterwards whatever happens."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tar", dir=self.spool_dir)
        os.close(fd)
        try:
            yield Path(name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)

    async def snapshot_to_store(self, request: web.Request) -> web.Response:
        """A snapshot of the volume, written whole to a spool file on this node, then put
        into the object store under PREFIX/APP/VOLUME/TIMESTAMP.tar."""
        app, volume = request.match_info["app"], request.match_info["volume"]
        store = ObjectStore(self.settings)
        rec = await asyncio.to_thread(self.volumes.lookup, app, volume)
        self._here(rec)
        key = store.key_for(app, volume, datetime.datetime.now(datetime.UTC))
        with self._spool("snapshot-") as spool:
            stream = await asyncio.to_thread(self.content.snapshot, app, volume)
            try:
                with open(spool, "wb") as f:
                    while chunk := await asyncio.to_thread(stream.read):
                        await asyncio.to_thread(f.write, chunk)
            finally:
                await asyncio.shield(asyncio.to_thread(stream.close))
            size = await asyncio.to_thread(store.put, key, spool)
        log.info("volume.snapshot_stored", app=app, volume=volume, bytes=size, key=key, bucket=store.bucket)
        return web.json_response({"app": app, "volume": volume, "node": self.me, "key": key, "bytes": size,
                                  "bucket": store.bucket, "endpoint": store.endpoint})

    async def stored_snapshots(self, request: web.Request) -> web.Response:
        app, volume = request.match_info["app"], request.match_info["volume"]
        store = ObjectStore(self.settings)
        found = await asyncio.to_thread(store.list, f"{store.prefix}{app}/{volume}/")
        return web.json_response([{"key": s.key, "bytes": s.size, "last_modified": s.last_modified} for s in found])

    def _restore_target(self, app: str, volume: str) -> VolumeRecord:
        """The volume's record; a volume the app mounts that no node holds yet (no replica
        ran: ``apps deploy --replicas 0``) is claimed here, so it can be filled first."""
        try:
            return self.volumes.lookup(app, volume)
        except LookupError:
            spec = self.volumes.apps.get(app)
            if spec is None or volume not in {m.name for m in spec.volumes}:
                raise
        claimed = self.volumes.claim_for_use(spec, self.me)
        for r in claimed:
            log.info("volume.claimed", app=r.app, volume=r.volume, node=r.node, by="restore")
        found = self.volumes.get(app, volume)
        if found is None:  # pragma: no cover - written just above
            raise ApiError(500, "internal", f"volume {volume} of app {app} could not be claimed")
        return found

    async def remove(self, request: web.Request) -> web.Response:
        app, volume = request.match_info["app"], request.match_info.get("volume")
        marked = await asyncio.to_thread(self.volumes.remove, app, volume)
        for r in marked:
            log.info("volume.removing", app=r.app, volume=r.volume, node=r.node)
        self.changed()
        return web.json_response({"removing": [{"app": r.app, "volume": r.volume, "node": r.node} for r in marked]})

