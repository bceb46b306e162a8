"""Persistent volumes: which node holds each app volume, and the loop that claims and removes them.

An app's spec names its volumes (pleaco.mounts); each is a Docker named volume on one
node (pleaco.runtime.docker.volume_name). The node is recorded once, by a ``volume`` record
(key ``APP/VOLUME``, value {"node", "created_ms"}), and from then on every replica of the app
is placed on that node only (placement.Demand.only): an app with volumes runs on one node,
as a Swarm service with local volumes does. The volume outlives redeploys, agent restarts
and node reboots (it is Docker's; the replica is made again with it mounted), and ``apps rm``
(its record stays, orphaned, until ``volumes rm`` or ``apps rm --volumes``).

The claim: the first time an app with volumes wants replicas, its owner (the rendezvous
owner, pleaco.placement.Owners, as for the autoscaler's decisions) writes the records of the
volumes that have none, all on one node: the one its volumes already claimed are on, else
the node that ranks first for the app's replica 0 among those that meet its constraints
(placement.owner). Only the owner writes, and only where there is no record: no double
claim while the nodes agree on who is live; were two nodes to believe themselves owner at
once, both choose by the same rule, and the store's last-writer-wins keeps one of the
records all nodes then place by. Until the claim, the app's replicas are placed nowhere:
never empty on one node and then somewhere else.

While the holding node is not live, the app is not started elsewhere either: it says why
(``apps show``: state ``volume_unavailable``) and comes back with the node.

Removal marks the records ``removing``; the holding node's loop removes the Docker volume
once no container uses it, then the record.
"""

from __future__ import annotations

import tarfile
import time
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from pleaco import errors, logs
from pleaco.apps import AppSpec, AppStore, validate_name
from pleaco.constraints import eligible
from pleaco.mounts import validate_volume_name
from pleaco.placement import Owners, owner
from pleaco.reconcile.loop import Loop
from pleaco.runtime import Conflict, DockerRuntime, EngineUnavailable
from pleaco.stacks.config import VolumeSettings
from pleaco.store import Store

log = logs.get("pleaco.stacks.volumes")

KIND = "volume"


class VolumeNotFound(errors.NotFound, LookupError):
    pass


class VolumeConflict(errors.Conflict, RuntimeError, code="volume_conflict"):
    """Valid, but not now: the volume is held by another node, or in use."""


@dataclass(frozen=True)
class VolumeRecord:
    app: str
    volume: str
    node: str
    created_ms: int
    removing: bool = False

    @property
    def key(self) -> str:
        return f"{self.app}/{self.volume}"

    def to_value(self) -> dict[str, Any]:
        value: dict[str, Any] = {"node": self.node, "created_ms": self.created_ms}
        if self.removing:
            value["removing"] = True
        return value

    @classmethod
    def from_record(cls, key: str, value: Mapping[str, Any]) -> VolumeRecord:
        app, _, volume = key.partition("/")
        return cls(app, volume, str(value["node"]), int(value.get("created_ms", 0)), bool(value.get("removing")))


@dataclass(frozen=True)
class Pin:
    """Where an app's replicas may run: ``only`` those nodes (None: any, the app has no
    volumes), and when that is none, ``why`` in words for ``apps show``; ``claim`` when the
    app's volumes must be claimed first."""

    only: frozenset[str] | None
    why: str = ""
    claim: bool = False


def pin(spec: AppSpec, records: Mapping[str, VolumeRecord], live: Collection[str]) -> Pin:
    """Where ``spec``'s replicas may run, given its volumes' records (by volume name)."""
    if not spec.volumes:
        return Pin(None)
    mine = [records[m.name] for m in spec.volumes if m.name in records]
    if going := [r for r in mine if r.removing]:
        return Pin(frozenset(), f"volume {going[0].volume} is being removed from node {going[0].node[:12]}; "
                                "the app starts once that is done")
    nodes = sorted({r.node for r in mine})
    if len(nodes) > 1:
        held = ", ".join(f"{r.volume} on {r.node[:12]}" for r in mine)
        return Pin(frozenset(), f"its volumes are on different nodes ({held}): an app's volumes must share one")
    if not nodes:
        return Pin(frozenset(), "waiting for its owner to choose the node of its volumes", claim=True)
    node = nodes[0]
    if node not in live:
        names = ", ".join(r.volume for r in mine)
        return Pin(frozenset(), f"volume {names} is on node {node[:12]}, which is down: the app runs only "
                                "there and starts when the node is back")
    return Pin(frozenset({node}), claim=len(mine) < len(spec.volumes))


def claim_node(spec: AppSpec, held: Sequence[VolumeRecord], live: Sequence[str],
               labels: Mapping[str, Mapping[str, str]], weights: Mapping[str, float]) -> str | None:
    """The node to claim ``spec``'s unclaimed volumes on: the node of those already claimed,
    else the live node that ranks first for its replica 0 among those that meet its
    constraints (None: no live node does)."""
    if held:
        return held[0].node
    candidates = eligible(spec.placement_constraints(), live, labels)
    return owner(spec.name, 0, candidates, weights) if candidates else None


class Volumes:
    """The volume records over the replicated store."""

    def __init__(self, store: Store, apps: AppStore, claim_settle: float = 0.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.store = store
        self.apps = apps
        self.claim_settle = claim_settle  # [volumes] claim_settle, for claim_for_use
        self._sleep = sleep

    def records(self, app: str | None = None) -> list[VolumeRecord]:
        found = []
        for rec in self.store.peek_records(KIND, prefix=f"{app}/" if app else ""):
            value = self.store.value(KIND, rec.key)
            if value is not None:
                try:
                    found.append(VolumeRecord.from_record(rec.key, value))
                except (KeyError, TypeError, ValueError) as exc:
                    log.warning("volume.record_invalid", key=rec.key, error=str(exc))
        return sorted(found, key=lambda r: r.key)

    def of_app(self, app: str) -> dict[str, VolumeRecord]:
        return {r.volume: r for r in self.records(app)}

    def get(self, app: str, volume: str) -> VolumeRecord | None:
        return self.of_app(app).get(volume)

    def pin(self, spec: AppSpec, live: Collection[str]) -> Pin:
        return pin(spec, self.of_app(spec.name) if spec.volumes else {}, live)

    def claim(self, spec: AppSpec, node: str) -> list[VolumeRecord]:
        """Write the records of ``spec``'s volumes that have none, on ``node``; those written."""
        held = self.of_app(spec.name)
        now = int(time.time() * 1000)
        new = [VolumeRecord(spec.name, m.name, node, now) for m in spec.volumes if m.name not in held]
        if new:
            self.store.put_many([(KIND, r.key, r.to_value()) for r in new])
        return new

    def claim_for_use(self, spec: AppSpec, node: str) -> list[VolumeRecord]:
        """``claim``, for a container ``node`` starts at once on what it claimed (a job, a
        restore): it blocks ``claim_settle`` seconds after a claim, long enough for a claim
        another node wrote at the same moment to arrive (the store keeps one of the two,
        the same on every node), and raises VolumeConflict naming the node whose claim was
        kept when it is not ``node``: the caller must not fill a volume no replica will mount."""
        claimed = self.claim(spec, node)
        if not claimed or self.claim_settle <= 0:
            return claimed
        self._sleep(self.claim_settle)
        held = self.of_app(spec.name)  # read once: each get() would read all the app's records
        for r in claimed:
            kept = held.get(r.volume)
            if kept is None or kept.node != node:
                where = f"by node {kept.node[:12]}" if kept is not None else "and its claim is gone"
                raise VolumeConflict(f"volume {r.volume} of app {r.app} was claimed at the same moment {where}: "
                                     "try again (it runs where the volume is)")
        return claimed

    def holder(self, spec: AppSpec, live: Collection[str]) -> str | None:
        """The live node that holds ``spec``'s volumes, where every container that mounts
        them runs (None: the app has none, or no live node holds them)."""
        only = self.pin(spec, live).only
        return next(iter(only)) if only else None

    def node_for(self, spec: AppSpec, me: str, live: Collection[str]) -> tuple[str, bool]:
        """Where a container of ``spec`` that mounts its volumes (a job) must run: the live
        node holding them, or ``me`` (the node taking the job) for volumes no node holds yet;
        and whether ``me`` must claim some first (``claim``, as a restore does). ``me`` for
        an app without volumes; VolumeConflict saying why when no node can run it."""
        where = self.pin(spec, live)
        if where.only is None:
            return me, False
        if not where.only and not where.claim:
            raise VolumeConflict(where.why)
        node = next(iter(where.only)) if where.only else me
        return node, where.claim and node == me

    def lookup(self, app: str, volume: str) -> VolumeRecord:
        """The record of one volume; VolumeNotFound naming what is missing."""
        validate_name(app)
        validate_volume_name(volume)
        found = self.get(app, volume)
        if found is None:
            spec = self.apps.get(app)
            if spec is None:
                raise VolumeNotFound(f"no volume {volume!r} of app {app!r} (no such app, nor a volume it left)")
            if volume not in {m.name for m in spec.volumes}:
                raise VolumeNotFound(f"app {app!r} has no volume {volume!r} "
                                     f"(its volumes: {', '.join(m.name for m in spec.volumes) or 'none'})")
            raise VolumeNotFound(f"volume {volume!r} of app {app!r} is on no node yet (no replica has run)")
        return found

    def remove(self, app: str, volume: str | None = None) -> list[VolumeRecord]:
        """Mark the app's volumes (or one) for removal; the holding node's loop removes
        them. Refused while the app exists and mounts one of them."""
        validate_name(app)
        if volume is not None:
            validate_volume_name(volume)
        records = self.records(app)
        if volume is not None:
            records = [r for r in records if r.volume == volume]
        if not records:
            raise VolumeNotFound(f"app {app!r} has no volume {volume!r}" if volume else f"app {app!r} has no volumes")
        spec = self.apps.get(app)
        mounted = {m.name for m in spec.volumes} if spec is not None else set()
        if used := sorted(r.volume for r in records if r.volume in mounted):
            raise VolumeConflict(f"app {app!r} still mounts volume {', '.join(used)}: remove the app first "
                                 f"(pleaco apps rm {app} --volumes) or deploy it without the volume")
        marked = [VolumeRecord(r.app, r.volume, r.node, r.created_ms, removing=True) for r in records]
        self.store.put_many([(KIND, r.key, r.to_value()) for r in marked])
        return marked


class VolumeLoop(Loop):
    """Claims the volumes of the apps this node owns, and removes this node's volumes that
    are marked for removal."""

    name = "volumes"

    def __init__(self, settings: VolumeSettings, volumes: Volumes, runtime: DockerRuntime, owners: Owners,
                 live_nodes: Callable[[], Sequence[str]], labels: Callable[[], dict[str, dict[str, str]]],
                 weights: Callable[[], dict[str, float]], on_claim: Callable[[], None]) -> None:
        super().__init__()
        self.interval = settings.interval
        self.volumes = volumes
        self.runtime = runtime
        self.owners = owners
        self.me = owners.me
        self.live_nodes = live_nodes
        self.labels = labels
        self.weights = weights
        self.on_claim = on_claim

    async def setup(self) -> None:
        # Helpers an earlier life of this agent left (it died mid-snapshot): nobody's now.
        for cid in await self.blocking(self.runtime.list_volume_helpers, self.me):
            await self.blocking(self.runtime.remove_volume_helper, cid)

    async def step(self) -> str | None:
        live = list(self.live_nodes())
        if not live:
            return None
        claimed = False
        for spec in self.volumes.apps.wanted_specs():
            if not spec.volumes or not self.owners.owns(spec.name):
                continue
            where = self.volumes.pin(spec, live)
            if not where.claim:
                continue
            held = list(self.volumes.of_app(spec.name).values())
            node = claim_node(spec, held, live, self.labels(), self.weights())
            if node is None:
                continue  # no node meets its constraints: the app loop says so
            for r in self.volumes.claim(spec, node):
                claimed = True
                log.info("volume.claimed", app=r.app, volume=r.volume, node=r.node)
        if claimed:
            self.on_claim()
        try:
            await self._remove_marked()
        except EngineUnavailable as exc:
            log.debug("volume.engine_unreachable", error=str(exc))
            return "engine_unreachable"
        return None

    async def _remove_marked(self) -> None:
        for r in self.volumes.records():
            if not r.removing or r.node != self.me:
                continue
            try:
                await self.blocking(self.runtime.remove_volume, r.app, r.volume, self.me)
            except Conflict as exc:  # its replicas are still being removed: next pass
                log.debug("volume.still_in_use", app=r.app, volume=r.volume, error=str(exc))
                continue
            self.volumes.store.delete(KIND, r.key)
            log.info("volume.removed", app=r.app, volume=r.volume, node=self.me)


class NotATar(errors.InvalidInput, ValueError, code="not_a_tar"):
    """A restore's upload that is not a tar archive pleaco can extract safely."""


def check_tar(path: Path) -> int:
    """Read the whole tar at ``path`` (streamed, nothing extracted): its member count, or
    NotATar naming what is wrong. Entries must stay inside the volume: relative, without
    '..', and files, directories or links only (no devices)."""
    count = 0
    try:
        with tarfile.open(path, mode="r|") as archive:
            for member in archive:
                name = member.name
                if name.startswith("/") or ".." in PurePosixPath(name).parts:
                    raise NotATar(f"the archive's entry {name!r} points outside the volume")
                if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                    raise NotATar(f"the archive's entry {name!r} is a device or a fifo, which a volume does not take")
                if member.islnk() and (member.linkname.startswith("/") or ".." in PurePosixPath(member.linkname).parts):
                    raise NotATar(f"the archive's hard link {name!r} points outside the volume")
                count += 1
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise NotATar(f"the upload is not a valid tar archive ({exc})") from None
    if count == 0:
        raise NotATar("the upload is not a tar archive (no entries)")
    return count


class Snapshot:
    """A volume's tar stream: ``read()`` the next chunk (b"" at the end), then ``close()``."""

    def __init__(self, chunks: Iterator[bytes], cleanup: Callable[[], None]) -> None:
        self._chunks = chunks
        self._cleanup: Callable[[], None] | None = cleanup

    def read(self) -> bytes:
        return next(self._chunks, b"")

    def close(self) -> None:
        cleanup, self._cleanup = self._cleanup, None
        if cleanup is not None:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
            cleanup()


class VolumeContent:
    """A volume's content out (snapshot) and in (restore), through a short-lived helper
    container on this node that has the volume at /v: Docker copies the files (its
    archive API), pleaco streams them."""

    def __init__(self, settings: VolumeSettings, runtime: DockerRuntime, node_id: str) -> None:
        self.image = settings.helper_image
        self.runtime = runtime
        self.node_id = node_id

    def snapshot(self, app: str, volume: str) -> Snapshot:
        """The volume's content as a tar stream (entries relative to its root: ``./...``),
        read as it is sent; ``close()`` it (removes the helper)."""
        self.runtime.ensure_volume(app, volume, self.node_id)
        cid = self.runtime.create_volume_helper(self.image, app, volume, self.node_id)
        try:
            return Snapshot(self.runtime.get_archive(cid, "/v/."), lambda: self.runtime.remove_volume_helper(cid))
        except BaseException:
            self.runtime.remove_volume_helper(cid)
            raise

    def restore(self, app: str, volume: str, archive: Path) -> None:
        """Replace the volume's content with the tar at ``archive`` (checked first)."""
        self.runtime.ensure_volume(app, volume, self.node_id)
        # Emptied first: a restore gives back the snapshot's content, not a mix of both.
        cid = self.runtime.create_volume_helper(self.image, app, volume, self.node_id,
                                                ("sh", "-c", "rm -rf /v/* /v/.[!.]* /v/..?*"))
        try:
            code = self.runtime.run_volume_helper(cid)
            if code != 0:
                raise errors.PleacoError(f"emptying volume {volume} before the restore failed (exit {code})")
            with open(archive, "rb") as f:
                self.runtime.put_archive(cid, "/v", f)
        finally:
            self.runtime.remove_volume_helper(cid)
