"""Build logs from any node: a build's log is written on the node that runs it (the app's
owner), and any node answers ``builds logs`` by reading it there.

Read locally, or else over the cluster's authenticated node-to-node streams: the asking
node opens a sealed stream to the building member on channel ``L`` with the header
``{"build": ID, "follow": BOOL}``; the member answers ``{"ok": true}`` (or an error) and then
the log in sealed chunks, following it while the build runs when asked, ending with an
empty chunk. The cluster authenticates the stream before this module sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from pleaco import logs
from pleaco.builds.model import TERMINAL
from pleaco.builds.service import BuildService
from pleaco.cluster import wire
from pleaco.cluster.messages import MessageError
from pleaco.cluster.service import Cluster
from pleaco.cluster.transport import SealedStream, TransportError

log = logs.get("pleaco.builds.logship")

CHANNEL_LOGS = b"L"
CHUNK = 1 << 16
FOLLOW_POLL = 0.2  # seconds between looks at a log that is still being written
MAX_ID = 200


class LogNotFound(LookupError):
    """No log for that build here (and, asked of the building node, none there)."""


async def follow_log(service: BuildService, build_id: str, follow: bool) -> AsyncIterator[bytes]:
    """This node's log of a build in chunks; with ``follow``, until the build is over."""
    path = service.log_path(build_id)
    offset = 0
    while True:
        chunk = await asyncio.to_thread(_read_from, path, offset)
        if chunk:
            offset += len(chunk)
            yield chunk
            continue
        if not follow:
            return
        current = service.builds.get(build_id)
        if current is None or current.state in TERMINAL:
            # One last read: the worker writes its last line before the state.
            if chunk := await asyncio.to_thread(_read_from, path, offset):
                yield chunk
            return
        await asyncio.sleep(FOLLOW_POLL)


def _read_from(path: Any, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(CHUNK)
    except FileNotFoundError:
        return b""


class BuildLogs:
    """Serves this node's build logs to the other members, and reads theirs."""

    def __init__(self, cluster: Cluster, service: BuildService) -> None:
        self.cluster = cluster
        self.service = service
        self.timeout = cluster.gossip.stream_timeout
        self._refused = logs.Burst(log, "build.log_request_refused")
        cluster.register_channel(CHANNEL_LOGS, self.serve)

    async def serve(self, stream: SealedStream, header: dict[str, Any]) -> None:
        bid, follow = header.get("build"), header.get("follow", False)
        if not isinstance(bid, str) or not bid or len(bid) > MAX_ID or not isinstance(follow, bool):
            self._refused.log(peer=stream.sender, error='expected {"build": ID, "follow": BOOL}')
            return
        if not self.service.log_path(bid).exists():
            await stream.send_message({"error": f"build {bid} has no log on node {self.service.node_id}"})
            return
        try:
            await stream.send_message({"ok": True})
            async for chunk in follow_log(self.service, bid, follow):
                await stream.send(chunk)
            await stream.send(b"")
        except (OSError, asyncio.IncompleteReadError) as exc:  # the asking node went away
            log.debug("build.log_send_ended", build=bid, to=stream.sender, error=str(exc))

    async def read_from(self, node_id: str, build_id: str, follow: bool) -> AsyncIterator[bytes]:
        """The log of a build run by another member, as it streams it. Raises LogNotFound
        when that member is not live or has no log, TransportError when the stream fails."""
        member = next((m for m in self.cluster.live_peers() if m.node_id == node_id), None)
        if member is None:
            raise LogNotFound(f"the log of build {build_id} is kept on node {node_id}, which is not reachable now")
        stream = await self.cluster.open_stream(member.addr, CHANNEL_LOGS, {"build": build_id, "follow": follow})
        try:
            answer = await asyncio.wait_for(stream.receive_message(), self.timeout)
            if not answer.get("ok"):
                raise LogNotFound(str(answer.get("error", f"node {node_id} has no log of build {build_id}")))
            while True:
                # Following a build, a chunk may be minutes apart (a long step): no deadline
                # then; a plain read of a finished log has the stream timeout per chunk.
                chunk = await (stream.receive() if follow else asyncio.wait_for(stream.receive(), self.timeout))
                if not chunk:
                    return
                yield chunk
        except (wire.Drop, MessageError, TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            raise TransportError(f"log of build {build_id} from {node_id}: {exc.__class__.__name__}: {exc}") from None
        finally:
            await stream.close()
