"""The ``stack`` verbs: deploy (a compose file), ls, show, rm. The file is read here (with
its env_files, pleaco.stacks.compose.load, and the values of its secrets given by ``file``
or ``environment``, read_secrets, sent beside the document) and checked by the server, so
every client of the API gets the same errors."""

from __future__ import annotations

import argparse
import urllib.parse
from pathlib import Path
from typing import Any

from pleaco.api.client import Client
from pleaco.cli.output import print_json, table
from pleaco.cli.usage import UsageError
from pleaco.stacks.compose import ComposeError, load, read_secrets
from pleaco.stacks.service import DEFAULT_WAIT

# Seconds the client waits for the deploy's answer beyond the deploy's own wait for
# dependencies: the writes and the answer itself.
ANSWER_MARGIN = 30.0


def add_parsers(sub: Any) -> None:
    stack = sub.add_parser("stack", help="stacks of apps from a compose file").add_subparsers(
        dest="stack_verb", metavar="VERB", required=True)
    p = stack.add_parser("deploy", help="deploy a compose file as stack NAME (service S becomes app NAME-S)")
    p.add_argument("name")
    p.add_argument("-f", "--file", required=True, help="the compose file (compose.yaml)")
    p.add_argument("--wait", type=float, default=DEFAULT_WAIT,
                   help=f"seconds to wait for a service's dependencies to be healthy (default {DEFAULT_WAIT:g})")
    p.add_argument("--json", action="store_true")
    p = stack.add_parser("ls", help="every stack and its services")
    p.add_argument("--json", action="store_true")
    p = stack.add_parser("show", help="a stack's services and their status")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p = stack.add_parser("rm", help="remove every app of a stack")
    p.add_argument("name")


def _path(name: str | None = None) -> str:
    return "/v1/stacks" if name is None else f"/v1/stacks/{urllib.parse.quote(name, safe='')}"


def dispatch(client: Client, args: argparse.Namespace) -> int:
    verb = args.stack_verb
    if verb == "deploy":
        try:
            path = Path(args.file)
            doc = load(path)
            secrets = read_secrets(doc, path.parent)
        except ComposeError as exc:
            raise UsageError(str(exc)) from None
        body: dict[str, Any] = {"compose": doc, "wait": args.wait}
        if secrets:
            body["secrets"] = secrets
        result = client.request("PUT", _path(args.name), body, timeout=args.wait + ANSWER_MARGIN)
        if args.json:
            return print_json(result)
        table(["SERVICE", "APP", "REVISION", "DEPLOYED"],
              [[s["service"], s["app"], str(s["revision"]),
                "created" if s["created"] else "updated" if s["changed"] else "unchanged"]
               for s in result["services"]])
        for app in result["removed"]:
            print(f"removed {app} (no longer in the file)")
        return 0
    if verb == "ls":
        found = client.request("GET", _path())
        if args.json:
            return print_json(found)
        table(["STACK", "SERVICES"], [[s["name"], " ".join(x["service"] for x in s["services"])] for s in found])
        return 0
    if verb == "show":
        shown = client.request("GET", _path(args.name))
        if args.json:
            return print_json(shown)
        table(["SERVICE", "APP", "REVISION", "STATE", "HEALTHY", "MESSAGE"],
              [[s["service"], s["name"], str(s["revision"]), s["state"], f"{s['healthy']}/{s['replicas']}",
                s["message"]] for s in shown["services"]])
        return 0
    if verb == "rm":
        removed = client.request("DELETE", _path(args.name))
        print(f"stack {args.name} removed: {' '.join(removed['apps'])}")
        return 0
    raise UsageError(f"unknown stack verb {verb}")
