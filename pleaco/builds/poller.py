"""Polling connected repositories for new commits (``build.poll_interval``), a loop.

For repositories that cannot send webhooks. Only each app's owner polls its repository
(pleaco.placement.Owners), so a cluster of N nodes asks the git host once per interval,
not N times; when the owner dies the next one polls from its next step on.
"""

from __future__ import annotations

import asyncio

from pleaco import logs
from pleaco.builds import source as sourcemod
from pleaco.builds.service import BuildService
from pleaco.placement import Owners
from pleaco.reconcile.loop import Loop

log = logs.get("pleaco.builds.poller")


class RepoPoller(Loop):
    name = "poll"

    def __init__(self, service: BuildService, owners: Owners) -> None:
        super().__init__()
        self.service = service
        self.owners = owners
        self.interval = service.cfg.poll_interval
        self.last: dict[str, str] = {}  # app -> head seen at the last poll
        self._polling = 0  # repositories the running step polls, one after the other

    def step_bound(self, default: float) -> float:
        # Each repository may take git_timeout when its host does not answer: a git host
        # down must not make the agent look stuck (pleaco.reconcile.loop.LoopRunner.stuck).
        return default + self._polling * self.service.cfg.git_timeout

    async def step(self) -> str | None:
        svc = self.service
        connections = svc.builds.connections()
        self._polling = len(connections)
        for conn in connections:
            if not self.owners.owns(conn.app):
                self.last.pop(conn.app, None)
                continue
            try:
                head = await asyncio.to_thread(sourcemod.ls_remote, conn.repo, conn.branch, svc.cfg.git_timeout,
                                               svc.git_auth(conn.app), svc.data_dir / "build" / "keys")
            except sourcemod.SourceError as exc:
                log.warning("build.poll_failed", app=conn.app, repo=conn.repo, error=str(exc))
                continue
            if head and head != self.last.get(conn.app) and head != conn.last_commit:
                result = await asyncio.to_thread(svc.push, conn, head, "", "poll")
                log.info("build.poll_found", app=conn.app, commit=head, outcome=result.outcome)
            if head:
                self.last[conn.app] = head
        return None
