"""The build verbs: ``apps connect``, ``builds ls|show|logs|cancel``, ``vulndb import``,
and the build line of ``apps show``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from pleaco.api.client import Client
from pleaco.api.errors import ApiError
from pleaco.cli.output import print_json, table, when


def add_apps_parsers(apps: Any) -> None:
    p = apps.add_parser("connect", help="build an app from a git repository on every push")
    p.add_argument("name")
    p.add_argument("--repo", required=True, help="repository URL (https, ssh, git:// or a local path)")
    p.add_argument("--branch", default=None, help="branch to build (default main)")
    p.add_argument("--webhook-secret", default=None, help="webhook secret (default: a random one)")
    p.add_argument("--repo-token", default=None, help="HTTPS token for a private repository (env PLEACO_REPO_TOKEN)")
    p.add_argument("--deploy-key", type=Path, default=None, help="SSH deploy key file for a private repository")
    p.add_argument("--json", action="store_true")


def add_parsers(sub: Any) -> None:
    builds = sub.add_parser("builds", help="builds of connected apps").add_subparsers(
        dest="builds_verb", metavar="VERB", required=True)
    p = builds.add_parser("ls", help="builds, newest first")
    p.add_argument("--app", default=None)
    p.add_argument("--json", action="store_true")
    p = builds.add_parser("show", help="one build: state, steps, test, scan")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p = builds.add_parser("logs", help="a build's log")
    p.add_argument("id")
    p.add_argument("--follow", "-f", action="store_true")
    p = builds.add_parser("cancel", help="cancel an unfinished build")
    p.add_argument("id")
    vulndb = sub.add_parser("vulndb", help="the offline vulnerability database").add_subparsers(
        dest="vulndb_verb", metavar="VERB", required=True)
    p = vulndb.add_parser("import", help="install OSV advisories (a JSON file or a directory) on this node")
    p.add_argument("path", type=Path)
    p.add_argument("--data-dir", type=Path, default=None, help="the agent's data dir (env PLEACO_DATA_DIR)")


def connect(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"repo": args.repo}
    if args.branch is not None:
        body["branch"] = args.branch
    if args.webhook_secret is not None:
        body["webhook_secret"] = args.webhook_secret
    token = args.repo_token or os.environ.get("PLEACO_REPO_TOKEN")
    if token:
        body["repo_token"] = token
    if args.deploy_key is not None:
        try:
            body["deploy_key"] = args.deploy_key.read_text()
        except OSError as exc:
            raise ApiError(0, "usage", f"--deploy-key {args.deploy_key}: {exc.strerror or exc}") from None
    out = client.connect(args.name, body)
    if args.json:
        return print_json(out)
    print(f"connected {out['app']} to {out['repo']} (branch {out['branch']})"
          + (", app created" if out["app_created"] else ""))
    print("add this webhook to the repository (Settings > Webhooks), content type application/json:")
    print(f"  payload URL  {out['webhook_url']}")
    print(f"  secret       {out['webhook_secret']}")
    return 0


def dispatch(client: Client, args: argparse.Namespace) -> int:
    if args.verb == "vulndb":
        return vulndb_import(args)
    verb = args.builds_verb
    if verb == "ls":
        builds = client.builds(args.app)
        if args.json:
            return print_json(builds)
        rows = [[b["id"], b["app"], b["commit"][:12], b["state"], when(b["created_ms"]), _took(b),
                 str(b["release"] or "-"), b["reason"][:60]] for b in builds]
        table(["ID", "APP", "COMMIT", "STATE", "CREATED", "TOOK", "RELEASE", "REASON"], rows)
        return 0
    if verb == "show":
        b = client.build(args.id)
        if args.json:
            return print_json(b)
        show(b)
        return 0
    if verb == "logs":
        for chunk in client.build_logs(args.id, follow=args.follow):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        if args.follow:
            b = client.build(args.id)
            return 0 if b["state"] == "succeeded" else 1
        return 0
    if verb == "cancel":
        b = client.cancel_build(args.id)
        print(f"build {b['id']}: {b['state']}")
        return 0
    raise ApiError(0, "usage", f"unknown builds verb {verb}")


def vulndb_import(args: argparse.Namespace) -> int:
    from pleaco.builds.vulndb import VulnDbError, import_db

    data_dir = args.data_dir or Path(os.environ.get("PLEACO_DATA_DIR") or "/var/lib/pleaco")
    try:
        n = import_db(args.path, data_dir)
    except (VulnDbError, OSError) as exc:
        print(f"error: vulndb import: {exc}", file=sys.stderr)
        return 1
    print(f"imported {n} advisories into {data_dir / 'vulndb'}")
    return 0


def show(b: dict[str, Any]) -> None:
    print(f"build      {b['id']}")
    print(f"app        {b['app']}  ({b['repo']} {b['branch']} @ {b['commit']})")
    print(f"state      {b['state']}" + (f": {b['reason']}" if b["reason"] else ""))
    print(f"trigger    {b['trigger'] or '-'}" + (f", delivery {b['delivery']}" if b["delivery"] else "")
          + f", attempt {b['attempt']}, node {b['node'][:12] or '-'}")
    if b["steps"]:
        print("steps      " + ", ".join(f"{k} {v:.1f}s" for k, v in b["steps"].items()))
    if b["image"]:
        print(f"image      {b['image']} ({b['tag']})")
    if b.get("pushed"):
        print(f"pushed     {b['pushed']} ({b.get('pushed_digest') or 'no digest reported'})")
    test = b["test"]
    if test:
        print("test       " + (test["skipped"] if "skipped" in test else
                               f"exit code {test['exit_code']}" + (" (timed out)" if test["timed_out"] else "")))
    scan = b["scan"]
    if scan:
        counted = f"{scan['packages']} packages, " if scan.get("packages") is not None else ""
        print(f"scan       {counted}{len(scan['findings'])} findings, "
              f"{scan['blocking']} at or above {scan['fail_on']} ({scan['scanner']})")
        for f in scan["findings"]:
            print(f"           {f['severity']:8} {f['id']}  {f['package']} {f['installed']}"
                  f" -> {f['fixed'] or 'no fix'}")
    if b["release"] and not b.get("compose"):
        print(f"release    revision {b['release']}")
    if b.get("compose"):  # a repository with a compose file: its stack, service by service
        print(f"stack      {b['app']} ({b['compose']})")
        for name, svc in sorted(b.get("services", {}).items()):
            done = (f"revision {svc['revision']}, {'updated' if svc['changed'] else 'unchanged'}"
                    if "revision" in svc else "not deployed")
            print(f"  {name:12} {svc['app']}: {svc.get('image') or 'image as given'} ({done})")


def app_build(client: Client, name: str) -> dict[str, Any] | None:
    """The app's newest build, for `apps show` (None when it has none)."""
    builds = client.builds(name)
    return builds[0] if builds else None


def show_app_build(b: dict[str, Any] | None) -> None:
    if b is None:
        return
    print(f"build      {b['id']} {b['state']} ({b['commit'][:12]}, {when(b['created_ms'])})"
          + (f": {b['reason']}" if b["reason"] else ""))


def _took(b: dict[str, Any]) -> str:
    if not b["started_ms"]:
        return "-"
    end = b["finished_ms"] or int(time.time() * 1000)
    return f"{(end - b['started_ms']) / 1000:.1f}s"
