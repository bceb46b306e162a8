"""The activator: holds requests for an app at zero replicas while its first replica starts.

An app autoscaled with scale to zero (``--min 0 --scale-to-zero-after S``) that has no
serving replica is routed by the proxy (every node's, pleaco.ingress.caddy) to this
server, on the agent's loopback (``[proxy] activator_listen``), as Knative routes a
revision at zero to its activator: the app's route is the same reverse proxy with or
without replicas, and the agent's DNS (pleaco.ingress.dns) answers with the activator's
address while there are none. So the config never changes between zero and one replica: a
reload would cut the requests in flight to the activator just as it releases them (Caddy
answered them 502 when the activator had a route of its own, swapped for the replicas'
when the first one turned healthy). Caddy passes the Host header on, which names the app.
For each request the activator:

1. takes a place in the app's queue on this node: at most ``activator_max_held`` requests
   are held at once; one more gets a 503 at once naming the bound, with a Retry-After;
2. wakes the app: writes its count to 1, only when the count is still 0 and the policy
   still allows scaling to zero (any node may: setting 1 when 0 is idempotent, and a node
   that finds the count above 0 writes nothing). The count goes with an entry in the app's
   decision history (``scale/NAME/decision``, as the autoscaler writes it, through
   ``AppStore.record_decision``: both or neither, and only while the count is still 0),
   reason "request while at zero", so ``apps show`` has the 0 -> 1 between the
   autoscaler's 1 -> 0 and what follows. While requests are held the wake is repeated each
   poll, so a count the owner set back to 0 before it saw the held demand (below) is set
   to 1 again;
3. waits until the app has a serving replica as the proxy's routes have it (this node's or
   another node's, ``ProxyReconciler.routes``), for at most ``activator_hold_timeout``
   seconds from its arrival (then a 503 naming the timeout, with a Retry-After);
4. forwards the request to that replica (method, path and query, headers, body streamed)
   and streams the answer back.

Why the owner does not decide 0 again at once: its idle rule (pleaco.scale.decide) wants
zero demand over the whole idle window, and a held request has not reached the access log
yet (a line is written when a request ends). So the held requests are demand this node
reports (``held``, read by pleaco.ingress.load): each counts as one request in flight and
as the one request it will be in the traffic window, in the app's concurrency and
requests/s. The samples of the idle window then hold demand, and once the requests are
answered the proxy's own figures take over. That needs no new record and no change to the
decision rules: the woken app is simply busy. (The ``cpu`` metric sees none of this: an app
scaled on CPU may go back to 0 before its first request is answered, and is woken again
while the request is held.) The report goes out at once when a wake is written
(``on_wake``), rather than at the next load interval.

Once the app has a serving replica the agent's DNS answers with the replicas, which the
proxy has within its DNS refresh (1 s); what still comes here meanwhile is forwarded at once.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from pleaco import hostport, logs
from pleaco.apps import AppStore
from pleaco.metrics import Counter, Gauge, Registry
from pleaco.reconcile.autoscale import decision_record, previous_of
from pleaco.scale import woken

log = logs.get("pleaco.ingress.activator")

# Seconds between looks at the routes (and wakes) while requests are held: a replica that
# turns healthy is seen within this, a small part of a container's start.
POLL = 0.05
# Headers of one connection, not of the request (RFC 9110 7.6.1): not forwarded.
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Proxy-Connection"))


@dataclass(frozen=True)
class ActivatorSettings:
    listen: str  # HOST:PORT on loopback
    max_held: int  # requests held per app on this node at most
    hold_timeout: float  # seconds a request waits for a replica at most


def retry_after(hold_timeout: float) -> str:
    """Seconds a refused client should wait: about one container start, at least 1."""
    return str(max(1, min(5, round(hold_timeout / 6))))


@dataclass
class _Queue:
    """One app's held requests on this node."""

    held: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None


class Activator:
    def __init__(self, settings: ActivatorSettings, apps: AppStore, app_of: Callable[[str], str | None],
                 upstreams: Callable[[str], list[str]], registry: Registry,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.apps = apps
        self.app_of = app_of  # host name (a Host header) -> the app served under it
        self.upstreams = upstreams  # app -> the addresses (HOST:PORT) of its serving replicas
        self.clock = clock
        self.queues: dict[str, _Queue] = {}
        # Called before a wake is written: the load report goes out at once, with the held
        # demand in it (the agent sets it to the load loop's wake).
        self.on_wake: Callable[[], None] = lambda: None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.m_requests = registry.register(Counter(
            "pleaco_activator_requests_total", "Requests the activator took for apps at zero replicas, by app and "
            "result (proxied, full: over max_held, timeout: no replica within hold_timeout, failed: the replica "
            "did not answer).", ("app", "result")))
        self.m_wakes = registry.register(Counter(
            "pleaco_activator_wakes_total", "Apps at zero set to 1 replica by this node's activator.", ("app",)))
        registry.register(Gauge(
            "pleaco_activator_held", "Requests the activator holds now, by app.", ("app",),
            collect=lambda: {(app,): float(n) for app, n in self.held().items()}))

    # -- what the load report reads --------------------------------------------------------

    def held(self) -> dict[str, int]:
        """Requests held now, by app (only apps with some)."""
        return {app: q.held for app, q in self.queues.items() if q.held}

    # -- the wake --------------------------------------------------------------------------

    def wake(self, app: str) -> bool:
        """Ask for a first replica: the count set to 1 when it is 0 and the app's policy
        scales to zero; True when this call wrote it."""
        policy = self.apps.autoscale(app)
        if policy is None or policy.scale_to_zero_after is None or self.apps.get(app) is None:
            return False
        if self.apps.replicas(app) != 0:
            return False
        self.on_wake()
        now = time.time()  # wall clock, as the autoscaler's records (they move between nodes)
        stored = self.apps.decision(app)
        decision = woken(policy, previous_of(stored, policy), now)
        record = decision_record(app, decision, 0, policy, self.apps.store.identity.node_id, now, stored)
        if not self.apps.record_decision(app, policy, 0, 1, record):
            return False  # the count or the policy changed meanwhile: nothing written
        self.m_wakes.inc(app=app)
        log.info("activator.woke", app=app, held=self.queues[app].held if app in self.queues else 0)
        return True

    # -- the server ------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=0)  # bodies are streamed, not read whole
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = hostport.split(self.settings.listen)
        await web.TCPSite(self._runner, host, port).start()
        # No pooling limit: held requests go out together once a replica is there. A new
        # connection each (only the requests of a cold start come here): a kept one could
        # outlive its replica, and a later one at the same address would get a dead socket.
        # No decompression: the body is passed on as the replica sent it.
        self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None),
                                              connector=aiohttp.TCPConnector(limit=0, force_close=True))
        log.info("activator.listening", address=self.settings.listen)

    async def stop(self) -> None:
        for q in self.queues.values():
            if q.watcher is not None:
                q.watcher.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _refuse(self, app: str, result: str, message: str) -> web.Response:
        self.m_requests.inc(app=app, result=result)
        return web.Response(status=503, text=message + "\n",
                            headers={"Retry-After": retry_after(self.settings.hold_timeout)})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        app = self.app_of(request.host) or ""
        if not app or self.apps.get(app) is None:
            return web.Response(status=404, text="no app is served under this host name\n")
        s = self.settings
        arrived = self.clock()
        queue = self.queues.setdefault(app, _Queue())
        if queue.held >= s.max_held:
            log.warning("activator.full", app=app, held=queue.held, max_held=s.max_held)
            return self._refuse(app, "full", f"{app} is starting from zero replicas and this node already holds "
                                             f"{s.max_held} requests for it (activator_max_held): retry later")
        queue.held += 1
        try:
            if queue.watcher is None or queue.watcher.done():
                queue.ready.clear()
                queue.watcher = asyncio.create_task(self._watch(app, queue))
            address = await self._replica(app, queue, arrived + s.hold_timeout)
        finally:
            queue.held -= 1
        if address is None:
            log.warning("activator.timeout", app=app, hold_timeout=s.hold_timeout)
            return self._refuse(app, "timeout", f"no replica of {app} became healthy within {s.hold_timeout:g}s "
                                                "(activator_hold_timeout): retry later")
        return await self._forward(app, address, request, arrived)

    async def _watch(self, app: str, queue: _Queue) -> None:
        """While the app's requests are held: wake it, and tell them when it has a replica."""
        try:
            while queue.held:
                if self.upstreams(app):
                    queue.ready.set()
                    return
                try:
                    self.wake(app)
                except Exception as exc:  # the store refused (app removed meanwhile...): the next poll tries again
                    log.warning("activator.wake_failed", app=app, error=str(exc))
                await asyncio.sleep(POLL)
        finally:
            if not queue.held and not queue.ready.is_set():
                self.queues.pop(app, None)

    async def _replica(self, app: str, queue: _Queue, deadline: float) -> str | None:
        """A serving replica's address, once there is one; None at the deadline."""
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(queue.ready.wait(), remaining)
            except TimeoutError:
                return None
            found = self.upstreams(app)
            if found:
                return random.choice(found)
            # Gone again in between (rare): watch anew.
            queue.ready.clear()
            if queue.watcher is None or queue.watcher.done():
                queue.watcher = asyncio.create_task(self._watch(app, queue))

    async def _forward(self, app: str, address: str, request: web.Request, arrived: float) -> web.StreamResponse:
        assert self._session is not None
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP]
        body = request.content if request.body_exists else None
        response: web.StreamResponse | None = None
        try:
            async with self._session.request(request.method, f"http://{address}{request.rel_url}", headers=headers,
                                             data=body, allow_redirects=False) as upstream:
                log.info("activator.proxied", app=app, replica=address, status=upstream.status,
                         waited_ms=round((self.clock() - arrived) * 1000))
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for k, v in upstream.headers.items():
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length":
                        response.headers.add(k, v)
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("activator.forward_failed", app=app, replica=address, error=str(exc))
            self.m_requests.inc(app=app, result="failed")
            if response is not None and response.prepared:
                raise  # the answer has begun: all that is left is to cut the connection
            return web.Response(status=502, text=f"the replica of {app} at {address} did not answer: {exc}\n")
        self.m_requests.inc(app=app, result="proxied")
        return response
