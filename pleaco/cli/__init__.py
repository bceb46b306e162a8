"""The ``pleaco`` command: the agent, and the client verbs that talk to its API.

Human-readable tables by default (pleaco/cli/output.py), ``--json`` for scripts. On an
error the server's message goes to standard error and the exit status is 1 (2 for bad
usage). This module parses and routes; each group of verbs has its own module.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from pleaco import __version__
from pleaco.api.client import DEFAULT_API, Client, resolve_token
from pleaco.api.errors import ApiError
from pleaco.cli import agent, apps, builds, cluster, jobs, release, secrets, stacks, upgrade, volumes
from pleaco.cli.usage import UsageError

__all__ = ["UsageError", "build_parser", "dispatch", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pleaco", description="pleaco: an easy container platform")
    parser.add_argument("--version", action="version", version=f"pleaco {__version__}")
    parser.add_argument("--api", default=None, help=f"API URL (env PLEACO_API, default {DEFAULT_API})")
    parser.add_argument("--token", default=None, help="API token (env PLEACO_TOKEN, else the admin token file)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    agent.add_parser(sub)
    cluster.add_parsers(sub)
    apps.add_parsers(sub)
    builds.add_parsers(sub)
    release.add_parsers(sub)
    upgrade.add_parsers(sub)
    secrets.add_parsers(sub)
    jobs.add_parsers(sub)
    volumes.add_parsers(sub)
    stacks.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "agent":
        return agent.run(args)
    if args.verb == "release":  # local: keys and bundles
        return release.run(args)
    base = args.api or os.environ.get("PLEACO_API") or DEFAULT_API
    client = Client(base, resolve_token(args.token))
    try:
        return dispatch(client, args)
    except ApiError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


# Each verb's handler: the module that owns the verb (its parsers are added above).
VERBS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "status": cluster.status, "nodes": cluster.nodes, "cluster": cluster.cluster,
    "apps": apps.dispatch, "builds": builds.dispatch, "vulndb": builds.dispatch,
    "upgrade": upgrade.dispatch, "secrets": secrets.dispatch, "run": jobs.run, "volumes": volumes.dispatch,
    "jobs": jobs.dispatch, "stack": stacks.dispatch,
}


def dispatch(client: Client, args: argparse.Namespace) -> int:
    handler = VERBS.get(args.verb)
    if handler is None:
        raise UsageError(f"unknown verb {args.verb}")
    return handler(client, args)
