"""Server-sent events for the live pages: ``GET /v1/events?topics=nodes,apps,jobs``.

Each topic is the JSON its own endpoint answers (``nodes``: ``GET /v1/nodes``, ``apps``:
``GET /v1/apps``, ``jobs``: ``GET /v1/jobs?limit=5``), computed by the same functions; the
stream sends a topic's JSON as an event when it differs from what it last sent, looking
every ``[ui] live_interval`` seconds, and a comment line as a keep-alive otherwise. The
browser's EventSource reconnects by itself when the stream breaks (an agent restart), and
gets every topic again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from pleaco.api.errors import ApiError

# Seconds between keep-alive comments on a quiet stream: under the API's idle timeout and
# the 60 s after which common proxies drop a silent response.
KEEPALIVE = 15.0


class LiveEvents:
    def __init__(self, interval: float, topics: dict[str, Callable[[], Any]]) -> None:
        self.interval = interval
        self.topics = topics
        self._closing = asyncio.Event()

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v1/events", self.stream)
        app.on_shutdown.append(self._shutdown)

    async def _shutdown(self, app: web.Application) -> None:
        self._closing.set()  # open streams end now instead of holding the agent's stop

    def _wanted(self, request: web.Request) -> list[str]:
        raw = request.query.get("topics", ",".join(self.topics))
        wanted = [t for t in raw.split(",") if t]
        unknown = [t for t in wanted if t not in self.topics]
        if unknown or not wanted:
            raise ApiError(400, "invalid", f"topics: {', '.join(unknown) or '(none)'} unknown "
                                           f"(known: {', '.join(sorted(self.topics))})")
        return wanted

    async def stream(self, request: web.Request) -> web.StreamResponse:
        wanted = self._wanted(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-store"})
        await resp.prepare(request)
        sent: dict[str, str] = {}
        quiet_since = time.monotonic()
        try:
            while not self._closing.is_set():
                out = []
                for topic in wanted:
                    data = json.dumps(self.topics[topic](), separators=(",", ":"))
                    if sent.get(topic) != data:
                        sent[topic] = data
                        out.append(f"event: {topic}\ndata: {data}\n\n")
                if not out and time.monotonic() - quiet_since >= KEEPALIVE:
                    out.append(": keep-alive\n\n")
                if out:
                    quiet_since = time.monotonic()
                    await resp.write("".join(out).encode())
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), self.interval)
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        return resp
