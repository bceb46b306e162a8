"""``pleaco apps exec``: a command in a running replica, over a websocket.

    GET /v1/apps/{name}/exec?cmd=CMD&cmd=ARG...&replica=N&tty=1&rows=R&cols=C   (websocket)

Authenticated like every route (the bearer token on the upgrade request). The replica must
run on the node that answers: when it runs on another, the answer is 409 ``replica_elsewhere``
naming that node and its API address (the client asks there); an unknown app or replica is
404, a missing or bad ``cmd`` or ``replica`` 400: all before the upgrade, as plain JSON errors.

On the websocket, client to server: binary messages are the command's standard input; text
messages are JSON controls, ``{"resize": {"rows": R, "cols": C}}`` and ``{"eof": true}`` (end
of input). Server to client: binary messages are its output (stdout and stderr merged, as a
terminal shows them), then one text message ``{"exit_code": N}`` (or ``{"error": {...}}``),
then the close. A client that goes away hangs the command up (its input and terminal close).

The engine is reached through the runtime adapter (pleaco.runtime.docker.ExecSession): no
socket or HTTP of the engine's here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

from pleaco import errors, hostport, logs
from pleaco.api.errors import ApiError, error_json
from pleaco.apps import AppStore, validate_name
from pleaco.reconcile.routes import RouteTable
from pleaco.runtime.docker import DockerRuntime, ExecSession
from pleaco.stacks.jobs import MAX_ARGS, MAX_COMMAND_BYTES

log = logs.get("pleaco.api.exec")

# Seconds to wait for the engine to report the exit code once the output ended (it may
# answer "still running" for a moment after the stream closes).
EXIT_CODE_WAIT = 5.0
# The largest window the engine is asked for: far above any screen, a bound on junk input.
MAX_WINDOW = 10_000


class ReplicaElsewhere(errors.Conflict, RuntimeError, code="replica_elsewhere"):
    """The replica runs on another node; the message names it and its API address."""


class ReplicaNotFound(errors.NotFound, LookupError):
    pass


class ExecInputError(errors.InvalidInput, ValueError):
    pass


def node_api(node_id: str, record: dict[str, Any] | None) -> tuple[str, str]:
    """A node's name and the HOST:PORT its API answers on, from its ``node`` record, for
    the 409s that send a client there. An API listening on every address (0.0.0.0, the
    default) is named by the node's gossip host, the address the cluster reaches it on."""
    value = record or {}
    name = str(value.get("name") or node_id[:12])
    api = str(value.get("api") or value.get("address") or "")
    try:
        host, port = hostport.split(api)
    except ValueError:
        return name, api or "unknown"
    if host in ("", "0.0.0.0", "::"):
        with contextlib.suppress(ValueError):
            host = hostport.host_of(str(value.get("gossip") or "")) or host
    return name, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ExecRequest:
    app: str
    replica: int | None
    command: tuple[str, ...]
    tty: bool
    rows: int | None
    cols: int | None


def _number(query: Any, name: str, lo: int, hi: int) -> int | None:
    raw = query.get(name)
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or not lo <= int(raw) <= hi:
        raise ExecInputError(f"{name}: expected a whole number {lo}..{hi}, got {raw!r}")
    return int(raw)


def parse_request(name: str, query: Any) -> ExecRequest:
    """The request's app, replica and command, or ExecInputError naming what is wrong."""
    app = validate_name(name)
    command = tuple(query.getall("cmd", []))
    if not command or not command[0]:
        raise ExecInputError("cmd: give the command as cmd=CMD&cmd=ARG... (pleaco apps exec NAME -- CMD ...)")
    if len(command) > MAX_ARGS or sum(len(c.encode(errors="surrogatepass")) for c in command) > MAX_COMMAND_BYTES:
        raise ExecInputError(f"cmd: at most {MAX_ARGS} arguments and {MAX_COMMAND_BYTES} bytes")
    if any("\x00" in c for c in command):
        raise ExecInputError("cmd: an argument holds a NUL byte")
    tty = query.get("tty", "0")
    if tty not in ("0", "1"):
        raise ExecInputError(f"tty: expected 0 or 1, got {tty!r}")
    return ExecRequest(app, _number(query, "replica", 0, 1_000_000), command, tty == "1",
                       _number(query, "rows", 1, MAX_WINDOW), _number(query, "cols", 1, MAX_WINDOW))


class ReplicaLocator:
    """Which container a request means, on this node; or where it runs instead."""

    def __init__(self, me: str, apps: AppStore, runtime: DockerRuntime, routes: RouteTable,
                 live_nodes: Callable[[], Sequence[str]], node_address: Callable[[str], tuple[str, str]]) -> None:
        self.me = me
        self.apps = apps
        self.runtime = runtime
        self.routes = routes
        self.live_nodes = live_nodes
        self.node_address = node_address

    def locate(self, req: ExecRequest) -> str:
        """The container id of the requested replica (the lowest-numbered running one here
        when none is named); ReplicaElsewhere or ReplicaNotFound."""
        if self.apps.get(req.app) is None:
            raise ReplicaNotFound(f"app {req.app!r} does not exist")
        here = [c for c in self.runtime.list_managed(self.me, req.app)
                if c.running and (req.replica is None or c.replica == req.replica)]
        if here:
            # The lowest replica; during a rollout a replica has two containers: the newest
            # release's is the one.
            return min(here, key=lambda c: (c.replica, -c.release)).id
        live: Collection[str] = list(self.live_nodes())
        elsewhere = [i for i in self.routes.instances(req.app, live) if i.state == "running" and i.node != self.me
                     and (req.replica is None or i.replica == req.replica)]
        which = f"replica {req.replica}" if req.replica is not None else "a running replica"
        if elsewhere:
            found = min(elsewhere, key=lambda i: i.replica)
            name, api = self.node_address(found.node)
            raise ReplicaElsewhere(f"{which} of app {req.app!r} runs on node {name} ({found.node[:12]}), not on "
                                   f"this one; exec through that node's API: --api http://{api}")
        raise ReplicaNotFound(f"app {req.app!r} has no {which.replace('a running', 'running')} "
                              "(pleaco apps show NAME lists its replicas)")


def add_routes(app: web.Application, locator: ReplicaLocator) -> None:
    async def exec_ws(request: web.Request) -> web.StreamResponse:
        req = parse_request(request.match_info["name"], request.query)
        container = await asyncio.to_thread(locator.locate, req)
        if not web.WebSocketResponse().can_prepare(request).ok:
            raise ApiError(400, "not_websocket", "exec is a websocket: connect with a websocket client "
                                                 "(pleaco apps exec NAME -- CMD)")
        session = await asyncio.to_thread(locator.runtime.exec_start, container, locator.me, req.command, req.tty)
        ws = web.WebSocketResponse(heartbeat=30.0)
        # A command's name is logged, never its arguments (they may hold what a log must not).
        log.info("exec.started", app=req.app, container=container[:12], command=req.command[0], tty=req.tty)
        try:
            await ws.prepare(request)
            if req.rows and req.cols:
                resized = await asyncio.to_thread(session.resize, req.rows, req.cols)
                log.debug("exec.resized", container=container[:12], rows=req.rows, cols=req.cols, ok=resized)
            code = await _relay(ws, session)
            if code is not None:
                await ws.send_str(json.dumps({"exit_code": code}))
            log.info("exec.ended", app=req.app, container=container[:12], exit_code=code)
        except errors.PleacoError as exc:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(json.dumps(error_json(exc)))
        finally:
            await asyncio.shield(asyncio.to_thread(session.close))
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.close()
        return ws

    app.router.add_get("/v1/apps/{name}/exec", exec_ws)


async def _relay(ws: web.WebSocketResponse, session: ExecSession) -> int | None:
    """Copy input to the session and its output to the client until the output ends (its
    exit code) or the client goes away (None)."""
    loop = asyncio.get_running_loop()
    output: asyncio.Queue[bytes] = asyncio.Queue(maxsize=64)
    done = threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                chunk = session.read()
                with contextlib.suppress(RuntimeError):  # the loop closed: nobody reads
                    asyncio.run_coroutine_threadsafe(output.put(chunk), loop).result()
                if not chunk:
                    return
        except Exception as exc:
            log.debug("exec.read_failed", error=str(exc))
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(output.put(b""), loop).result()

    async def pump_output() -> None:
        while chunk := await output.get():
            await ws.send_bytes(chunk)

    threading.Thread(target=reader, name="exec output", daemon=True).start()
    pump = asyncio.create_task(pump_output())
    inputs = asyncio.create_task(_pump_input(ws, session))
    try:
        await asyncio.wait({pump, inputs}, return_when=asyncio.FIRST_COMPLETED)
        if not pump.done():
            # The client closed (or went away) before the output ended: hang up.
            return None
        pump.result()
        return await asyncio.to_thread(_exit_code, session)
    finally:
        done.set()
        for task in (pump, inputs):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.gather(pump, inputs, return_exceptions=True)


async def _pump_input(ws: web.WebSocketResponse, session: ExecSession) -> None:
    async for msg in ws:
        if msg.type == WSMsgType.BINARY:
            await asyncio.to_thread(session.write, msg.data)
        elif msg.type == WSMsgType.TEXT:
            try:
                control = json.loads(msg.data)
                if control.get("eof"):
                    await asyncio.to_thread(session.close_input)
                elif "resize" in control:
                    rows, cols = int(control["resize"]["rows"]), int(control["resize"]["cols"])
                    if 1 <= rows <= MAX_WINDOW and 1 <= cols <= MAX_WINDOW:
                        resized = await asyncio.to_thread(session.resize, rows, cols)
                        log.debug("exec.resized", rows=rows, cols=cols, ok=resized)
            except (ValueError, TypeError, KeyError, AttributeError):
                log.debug("exec.bad_control", message=str(msg.data)[:100])
        else:
            return


def _exit_code(session: ExecSession) -> int | None:
    deadline = time.monotonic() + EXIT_CODE_WAIT
    while True:
        code = session.exit_code()
        if code is not None or time.monotonic() > deadline:
            return code
        time.sleep(0.05)
