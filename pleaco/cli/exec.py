"""``pleaco apps exec NAME [--replica N] -- CMD ...``: a command in a running replica, over
the API's websocket (pleaco/api/exec.py).

With a terminal on standard input, the session is interactive: the terminal is put in raw
mode (restored at the end), keys go to the command as typed, and the window size follows
the terminal's (SIGWINCH). Without one, standard input is copied to the command until its
end and the output comes back as is. Either way the command's exit code is this one's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import termios
import threading
import tty
import urllib.parse
from typing import Any

import aiohttp

from pleaco.api.client import Client
from pleaco.api.errors import ApiError
from pleaco.cli.usage import UsageError

USAGE = "pleaco apps exec NAME [--replica N] -- CMD [ARG ...]"


def add_parser(apps: Any) -> None:
    p = apps.add_parser("exec", help="run a command in a running replica (interactive with a terminal)",
                        usage=USAGE)
    p.add_argument("name")
    p.add_argument("--replica", type=int, default=None, help="the replica's number (default: the lowest here)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")


def _options(args: argparse.Namespace) -> list[str]:
    """The command, and ``--replica`` given after NAME (argparse's REMAINDER took it)."""
    rest = list(args.command)
    if "--" in rest:
        options, command = rest[:rest.index("--")], rest[rest.index("--") + 1:]
        late = argparse.ArgumentParser(prog="pleaco apps exec", add_help=False, exit_on_error=False)
        late.add_argument("--replica", type=int)
        try:
            parsed = late.parse_args(options)
        except argparse.ArgumentError as exc:
            raise UsageError(f"apps exec: {exc}") from None
        if parsed.replica is not None:
            args.replica = parsed.replica
    else:
        command = rest
    if not command:
        raise UsageError(f"apps exec: give the command after --: {USAGE}")
    if args.replica is not None and args.replica < 0:
        raise UsageError("apps exec: --replica must be 0 or more")
    return command


def _window() -> os.terminal_size:
    """The terminal's own size (not $COLUMNS/$LINES, which describe some other moment)."""
    for fd in (sys.stdin.fileno(), sys.stdout.fileno()):
        with contextlib.suppress(OSError):
            return os.get_terminal_size(fd)
    return os.terminal_size((80, 24))


def run(client: Client, args: argparse.Namespace) -> int:
    command = _options(args)
    interactive = sys.stdin.isatty()
    query: list[tuple[str, str]] = [("cmd", c) for c in command] + [("tty", "1" if interactive else "0")]
    if args.replica is not None:
        query.append(("replica", str(args.replica)))
    if interactive:
        size = _window()
        query += [("rows", str(size.lines)), ("cols", str(size.columns))]
    path = f"/v1/apps/{urllib.parse.quote(args.name, safe='')}/exec?{urllib.parse.urlencode(query)}"
    return asyncio.run(_session(client, path, interactive))


async def _session(client: Client, path: str, interactive: bool) -> int:
    url = client.base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + path
    headers = {"Authorization": f"Bearer {client.token}"} if client.token else {}
    try:
        async with aiohttp.ClientSession() as http:
            try:
                ws = await http.ws_connect(url, headers=headers, heartbeat=30.0, max_msg_size=0)
            except aiohttp.WSServerHandshakeError:
                # The server refused before the upgrade (unknown app, replica elsewhere, bad
                # input): the same request as plain HTTP gets its message.
                client.request("GET", path)
                raise ApiError(0, "exec_refused", "the server refused the exec") from None
            async with ws:
                return await _relay(ws, interactive)
    except aiohttp.ClientConnectionError as exc:
        raise ApiError(0, "unreachable", f"cannot reach the pleaco API at {client.base_url}: {exc}") from None


async def _relay(ws: aiohttp.ClientWebSocketResponse, interactive: bool) -> int:
    loop = asyncio.get_running_loop()
    stdin_fd, out = sys.stdin.fileno(), sys.stdout.buffer
    saved = termios.tcgetattr(stdin_fd) if interactive else None
    # Standard input (bytes) and controls (text: window sizes), in the order they came.
    inputs: asyncio.Queue[bytes | str] = asyncio.Queue()

    def read_stdin() -> None:
        # A thread, not add_reader: standard input may be a regular file, which epoll refuses.
        while True:
            try:
                data = os.read(stdin_fd, 1 << 15)
            except OSError:
                data = b""
            try:
                loop.call_soon_threadsafe(inputs.put_nowait, data)
            except RuntimeError:
                return  # the session ended and its loop closed
            if not data:
                return

    async def send_input() -> None:
        while data := await inputs.get():
            if isinstance(data, str):
                await ws.send_str(data)
            else:
                await ws.send_bytes(data)
        await ws.send_str(json.dumps({"eof": True}))

    def resized() -> None:
        size = _window()
        inputs.put_nowait(json.dumps({"resize": {"rows": size.lines, "cols": size.columns}}))

    if interactive:
        tty.setraw(stdin_fd, termios.TCSANOW)  # keeps what was typed ahead (TCSAFLUSH would drop it)
        loop.add_signal_handler(signal.SIGWINCH, resized)
    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()
    sender = asyncio.create_task(send_input())
    code: int | None = None
    error = ""
    try:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                out.write(msg.data)
                out.flush()
            elif msg.type == aiohttp.WSMsgType.TEXT:
                frame = json.loads(msg.data)
                if "exit_code" in frame:
                    code = int(frame["exit_code"])
                elif "error" in frame:
                    error = str(frame["error"].get("message", frame["error"]))
            else:
                break
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
        if saved is not None:
            loop.remove_signal_handler(signal.SIGWINCH)
            termios.tcsetattr(stdin_fd, termios.TCSADRAIN, saved)
    if code is not None:
        return code
    print(f"error: {error or 'the session ended before the exit code (the agent stopped?)'}", file=sys.stderr)
    return 1
