"""The ``run`` verb: a one-off job of an app's current release, its output on standard
output as it comes, and its exit code as the command's."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pleaco.api.client import Client
from pleaco.cli.usage import UsageError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("run", help="run a one-off command in a container of an app's current release",
                       usage="pleaco run APP -- CMD [ARG ...]")
    p.add_argument("app")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")


def run(client: Client, args: argparse.Namespace) -> int:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("run: give the command after --: pleaco run APP -- CMD [ARG ...]")
    out = sys.stdout.buffer
    for frame in client.run(args.app, command):
        if "output" in frame:
            out.write(str(frame["output"]).encode())
            out.flush()
        elif "exit_code" in frame:
            return int(frame["exit_code"])
        elif "error" in frame:
            print(f"error: {frame['error'].get('message', frame['error'])}", file=sys.stderr)
            return 1
    print("error: the job's output ended before its exit code (the agent stopped?)", file=sys.stderr)
    return 1
