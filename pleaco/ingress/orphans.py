"""Other agents' proxies and replicas this node must clean up: those of an identity that is
gone, and proxies that take this node's addresses.

How it happens: an agent is killed and its data dir lost; a new agent (a new identity)
starts with the same flags. The old proxy container keeps running (the engine restarts it),
and Caddy binds its ports with SO_REUSEPORT, so both proxies listen on the HTTP port and on
the admin address, each connection landing on either: half the traffic goes to routes
nobody updates, and half the admin requests to a config nobody owns. The old identity's
replicas keep running too, managed by no one.

Several agents may share one engine (a test cluster, or independent agents with their own
ports), so another node's container is only touched with evidence:

- a proxy is an orphan when its node is not a known member of this node's cluster and
  either its identity is gone (its boot directory is this node's, i.e. the data dir now
  holds another identity, or that directory no longer exists) or it conflicts with this
  node: it listens on one of this node's addresses (read from its boot file), or the admin
  API answered with its node's config (pleaco.ingress.caddy's identity marker);
- it is removed at once (it splits this node's traffic). When its identity is gone, that
  node's replicas are removed too, after ``proxy.orphan_grace`` seconds (other nodes'
  proxies may still route to them until that node is declared dead and drained). The gone
  identities are kept in ``DATA_DIR/proxy/orphans.json``, so a restart keeps counting.

A member of this node's cluster is never touched: a member that conflicts is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pleaco import hostport, logs
from pleaco.hostport import HostPortError
from pleaco.ingress.caddy import ProxySettings
from pleaco.ingress.config import ProxyConfig
from pleaco.runtime import NotFound
from pleaco.runtime.docker import InfraInfo
from pleaco.runtime.engine import Engine
from pleaco.store import Store

log = logs.get("pleaco.ingress.orphans")

Address = tuple[str, int]  # (host, port); host "" means every address
_WILDCARDS = ("", "0.0.0.0", "::", "*")


def parse_address(value: str) -> Address | None:
    try:
        host, port = hostport.split(value)
    except HostPortError:
        return None
    # A Caddy listener may carry a network ("tcp/127.0.0.1:80").
    host = host.rpartition("/")[2].strip("[]")
    host = "127.0.0.1" if host == "localhost" else host
    return ("" if host in _WILDCARDS else host), port


def overlap(mine: Iterable[Address], theirs: Iterable[Address]) -> bool:
    """Whether two sets of listen addresses share a port on a common address."""
    theirs = list(theirs)
    return any(p == q and (h == "" or g == "" or h == g) for h, p in mine for g, q in theirs)


def config_addresses(config: Any) -> set[Address]:
    """The admin and server listen addresses of a Caddy config (as build_config writes it)."""
    values: list[str] = []
    with contextlib.suppress(KeyError, TypeError, AttributeError):
        values.append(str(config["admin"]["listen"]))
    with contextlib.suppress(KeyError, TypeError, AttributeError):
        for server in config["apps"]["http"]["servers"].values():
            values += [str(v) for v in server.get("listen", [])]
    return {a for v in values if (a := parse_address(v)) is not None}


def settings_addresses(s: ProxySettings) -> set[Address]:
    """Every address a proxy with these settings may listen on."""
    return {a for v in (s.listen, s.https_listen, s.admin_listen) if (a := parse_address(v)) is not None}


def known_members(store: Store) -> set[str]:
    """Node ids of this node's cluster (its own included), revoked ones left out."""
    return {r.key for r in store.records("node")
            if r.value and "/" not in r.key and store.revoked_at(r.key) is None}


@dataclass(frozen=True)
class Orphan:
    container: InfraInfo
    reason: str  # same_data_dir | data_dir_gone | address_conflict | admin_answered
    identity_gone: bool


def find_orphans(proxies: Iterable[InfraInfo], node_id: str, members: set[str], boot_dir: str, own_dir: Path,
                 own_addresses: set[Address], foreign: set[str]) -> tuple[list[Orphan], list[InfraInfo]]:
    """(the other nodes' proxies to remove, members' proxies that conflict with this node).

    ``boot_dir`` is where a proxy's boot directory is mounted in its container: its host
    side is that node's ``DATA_DIR/proxy``. ``foreign`` holds the nodes whose config the
    admin API answered with."""
    orphans, member_conflicts = [], []
    for p in proxies:
        if not p.node or p.node == node_id:
            continue
        source = next((src for src, dst in p.mounts if dst == boot_dir), "")
        if source and os.path.realpath(source) == os.path.realpath(own_dir):
            reason, gone = "same_data_dir", True
        elif source and _missing(source):
            reason, gone = "data_dir_gone", True
        elif p.node in foreign:
            reason, gone = "admin_answered", False
        elif source and overlap(own_addresses, _boot_addresses(Path(source))):
            reason, gone = "address_conflict", False
        else:
            continue
        if p.node in members:
            member_conflicts.append(p)
        else:
            orphans.append(Orphan(p, reason, gone))
    return orphans, member_conflicts


def _missing(path: str) -> bool:
    """True only when the path surely does not exist (not when it cannot be looked at)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def _boot_addresses(boot_dir: Path) -> set[Address]:
    try:
        return config_addresses(json.loads((boot_dir / "caddy.json").read_text()))
    except (OSError, ValueError):
        return set()


class OrphanSweeper:
    """Runs find_orphans on the proxy loop's passes and removes what it finds."""

    def __init__(self, cfg: ProxyConfig, runtime: Engine, node_id: str, role: str, boot_dir: str,
                 own_dir: Path, members: Callable[[], set[str]], own_addresses: Callable[[], set[Address]],
                 blocking: Callable[..., Awaitable[Any]] = asyncio.to_thread) -> None:
        self.cfg = cfg
        self.blocking = blocking  # the loop runner's executor for engine calls
        self.runtime = runtime
        self.node_id = node_id
        self.role = role
        self.boot_dir = boot_dir
        self.own_dir = own_dir
        self.members = members
        self.own_addresses = own_addresses
        self.state_path = own_dir / "orphans.json"
        self.foreign: set[str] = set()  # nodes whose config the admin API answered with
        self._next_at = 0.0
        self._warned: set[str] = set()

    def note_foreign(self, node: str) -> None:
        """The admin API answered with another agent's config (or none of ours after a
        load): look at the containers on the next pass."""
        if node not in self.foreign:
            log.warning("proxy.foreign_admin_answer", foreign_node=node or "unknown")
        self.foreign.add(node)
        self._next_at = 0.0

    async def sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_at:
            return
        self._next_at = now + self.cfg.orphan_check_interval
        proxies: list[InfraInfo] = await self.blocking(self.runtime.list_infra, self.role)
        members = await asyncio.to_thread(self.members)
        orphans, conflicts = find_orphans(proxies, self.node_id, members, self.boot_dir, self.own_dir,
                                          self.own_addresses(), self.foreign)
        for p in conflicts:
            if p.id not in self._warned:
                self._warned.add(p.id)
                log.warning("proxy.member_conflict", member=p.node, container=p.id[:12],
                            error="a member's proxy takes this node's addresses; left alone")
        gone = self._load_gone()
        for o in orphans:
            with contextlib.suppress(NotFound):
                await self.blocking(self.runtime.remove_infra, o.container.id, o.container.node, self.role)
            log.warning("orphan.proxy_removed", orphan_node=o.container.node, container=o.container.id[:12],
                        reason=o.reason, state=o.container.state)
            if o.identity_gone and o.container.node not in gone:
                gone[o.container.node] = time.time()
                log.warning("orphan.identity_gone", orphan_node=o.container.node, reason=o.reason,
                            replicas_removed_after=self.cfg.orphan_grace)
        self.foreign.clear()
        if orphans:
            self._save_gone(gone)
        if gone:
            await self._remove_replicas(gone, members)

    async def _remove_replicas(self, gone: dict[str, float], members: set[str]) -> None:
        changed = False
        for node, since in sorted(gone.items()):
            if node in members or node == self.node_id:
                del gone[node]  # back in the cluster: not ours to judge
                changed = True
                continue
            if time.time() - since < self.cfg.orphan_grace:
                continue
            left = await self.blocking(self.runtime.list_managed, node)
            for c in left:
                with contextlib.suppress(NotFound):
                    await self.blocking(self.runtime.remove, c.id, node)
                log.warning("orphan.replica_removed", orphan_node=node, app=c.app, replica=c.replica,
                            release=c.release, container=c.id[:12], state=c.state)
            if not left:
                del gone[node]
                changed = True
                log.info("orphan.identity_cleaned", orphan_node=node)
        if changed:
            self._save_gone(gone)

    def _load_gone(self) -> dict[str, float]:
        try:
            raw = json.loads(self.state_path.read_text())
            return {str(k): float(v) for k, v in raw.items()}
        except (OSError, ValueError, AttributeError, TypeError):
            return {}

    def _save_gone(self, gone: dict[str, float]) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(gone, sort_keys=True))
        os.replace(tmp, self.state_path)
