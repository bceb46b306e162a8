"""The ``secrets`` verbs: set (the value on standard input), ls, rm. Values never go to
standard output or into an argument (where ``ps`` and shell history would see them)."""

from __future__ import annotations

import argparse
import sys
import urllib.parse
from typing import Any, BinaryIO

from pleaco.api.client import Client
from pleaco.cli.output import print_json, table, when
from pleaco.cli.usage import UsageError
from pleaco.stacks.secrets import MAX_SECRET_BYTES, MOUNTS


def add_parsers(sub: Any) -> None:
    secrets = sub.add_parser("secrets", help="an app's secrets, given to its replicas").add_subparsers(
        dest="secrets_verb", metavar="VERB", required=True
    )
    p = secrets.add_parser("set", help="set a secret from standard input (the app's replicas roll)")
    p.add_argument("app")
    p.add_argument("key")
    p.add_argument("--mount", choices=list(MOUNTS), default="env",
                   help="env: the environment variable KEY (default); file: the file /run/secrets/KEY")
    p.add_argument("--json", action="store_true")
    p = secrets.add_parser("ls", help="an app's secrets: keys and when set, never values")
    p.add_argument("app")
    p.add_argument("--json", action="store_true")
    p = secrets.add_parser("rm", help="remove a secret (the app's replicas roll)")
    p.add_argument("app")
    p.add_argument("key")


def read_value(stream: BinaryIO) -> str:
    """The secret on ``stream``, without the one newline ``echo`` ends it with."""
    raw = stream.read(MAX_SECRET_BYTES + 2)
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if len(raw) > MAX_SECRET_BYTES:
        raise UsageError(f"the value on standard input is over the limit of {MAX_SECRET_BYTES} bytes")
    if not raw:
        raise UsageError("no value on standard input (pipe it in: printf %s \"$VALUE\" | pleaco secrets set APP KEY)")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise UsageError("the value on standard input is not valid UTF-8") from None


def _path(app: str, key: str | None = None) -> str:
    path = f"/v1/apps/{urllib.parse.quote(app, safe='')}/secrets"
    return path if key is None else f"{path}/{urllib.parse.quote(key, safe='')}"


def dispatch(client: Client, args: argparse.Namespace) -> int:
    verb = args.secrets_verb
    if verb == "set":
        if sys.stdin.isatty():
            print(f"value of {args.key} (end with Ctrl-D):", file=sys.stderr)
        value = read_value(sys.stdin.buffer)
        info = client.request("PUT", _path(args.app, args.key), {"value": value, "mount": args.mount})
        if args.json:
            return print_json(info)
        print(f"secret {info['key']} of {info['app']} set ({info['mount']}); its replicas roll")
        return 0
    if verb == "ls":
        found = client.request("GET", _path(args.app))
        if args.json:
            return print_json(found)
        table(["KEY", "MOUNT", "SET"], [[s["key"], s["mount"], when(int(s["set_ms"]))] for s in found])
        return 0
    if verb == "rm":
        client.request("DELETE", _path(args.app, args.key))
        print(f"secret {args.key} of {args.app} removed; its replicas roll")
        return 0
    raise UsageError(f"unknown secrets verb {verb}")
