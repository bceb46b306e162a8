"""The upgrade verbs: ``upgrade --bundle FILE [--no-wait]`` and ``upgrade status [--json]``.

``upgrade --bundle`` uploads the bundle to the node it talks to (which keeps it and plans
the rollout, pleaco/api/upgrade.py), then follows the plan until every node is done or one
failed. That node upgrades last; while it restarts its API does not answer for a moment,
and the follower keeps asking.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pleaco.api.client import Client
from pleaco.api.errors import ApiError
from pleaco.cli.output import print_json, table, when
from pleaco.cli.usage import UsageError

POLL = 1.0  # seconds between looks at the plan while following it


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("upgrade", help="upgrade every node to a release bundle, one node at a time")
    p.add_argument("--bundle", type=Path, default=None, help="the release bundle (`pleaco release build`)")
    p.add_argument("--no-wait", action="store_true", help="upload and plan only; do not follow the rollout")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow the rollout (default 3600)")
    verbs = p.add_subparsers(dest="upgrade_verb", metavar="VERB")
    q = verbs.add_parser("status", help="the last upgrade plan and each node's state")
    q.add_argument("--json", action="store_true")


def dispatch(client: Client, args: argparse.Namespace) -> int:
    if args.upgrade_verb == "status":
        return status(client, args)
    if args.bundle is None:
        raise UsageError("upgrade: give --bundle FILE (or `pleaco upgrade status`)")
    return upgrade(client, args)


def upgrade(client: Client, args: argparse.Namespace) -> int:
    bundle: Path = args.bundle
    if not bundle.is_file():
        raise UsageError(f"--bundle {bundle}: no such file")
    shown = [-1]

    def progress(sent: int, total: int) -> None:
        percent = sent * 100 // max(total, 1)
        if percent != shown[0] and sys.stderr.isatty():
            print(f"\ruploading {bundle.name}: {percent}% of {total / 1e6:.1f} MB", end="", file=sys.stderr)
        shown[0] = percent

    # The node verifies the whole bundle before it answers: allow for that beyond the upload.
    out = client.upload("/v1/upgrade", bundle, progress, timeout=max(client.timeout, 300.0))
    if sys.stderr.isatty():
        print(file=sys.stderr)
    plan = out["plan"]
    print(f"upgrade {plan['id']} to {plan['version']}: {len(plan['order'])} node(s), one at a time")
    if args.no_wait:
        return 0
    return follow(client, plan["id"], args.timeout)


def follow(client: Client, plan_id: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    unreachable = False
    while time.monotonic() < deadline:
        try:
            st = client.request("GET", "/v1/upgrade")
        except ApiError as exc:
            if exc.code != "unreachable":
                raise
            if not unreachable:
                print("the API does not answer (its node is restarting into the new release); waiting")
            unreachable = True
            time.sleep(POLL)
            continue
        unreachable = False
        if (st.get("plan") or {}).get("id") != plan_id:
            print(f"error: the plan {plan_id} was replaced by another", file=sys.stderr)
            return 1
        for n in st["nodes"]:
            line = f"{n['state']} {n['version']}"
            if seen.get(n["id"]) != line:
                seen[n["id"]] = line
                why = f" ({n['reason']})" if n["reason"] else ""
                print(f"  {n['name'] or n['id'][:12]}: {n['state']}, running {n['version'] or '?'}{why}")
        if st["status"] == "done":
            print(f"upgrade {plan_id} done: every node runs {st['plan']['version']}")
            return 0
        if st["status"] == "failed":
            print(f"upgrade {plan_id} failed on node {st['failed_node'][:12]}: {st['reason']}; "
                  "the nodes after it were not upgraded", file=sys.stderr)
            return 1
        time.sleep(POLL)
    print(f"error: upgrade {plan_id} still running after {timeout:g}s; see `pleaco upgrade status`", file=sys.stderr)
    return 1


def status(client: Client, args: argparse.Namespace) -> int:
    st = client.request("GET", "/v1/upgrade")
    if args.json:
        return print_json(st)
    plan = st.get("plan")
    if not plan:
        print("no upgrade has been planned")
        return 0
    print(f"upgrade {plan['id']} to {plan['version']}: {st['status']}"
          + (f" (failed on {st['failed_node'][:12]}: {st['reason']})" if st["status"] == "failed" else ""))
    print(f"planned {when(plan['created_ms'])} on {plan['origin'][:12]}, bundle sha256 {plan['sha256'][:12]},"
          f" {plan['size'] / 1e6:.1f} MB")
    rows = [[str(i + 1), n["id"][:12], n["name"], n["state"], n["version"], n["phase"] or "-", n["reason"]]
            for i, n in enumerate(st["nodes"])]
    table(["#", "ID", "NAME", "STATE", "VERSION", "PHASE", "REASON"], rows)
    return 0


def upgrade_column(node: dict[str, Any]) -> str:
    """A node's last upgrade for ``pleaco nodes``: "confirmed 0.3.0", or "-"."""
    up = node.get("upgrade") or {}
    return f"{up.get('phase', '')} {up.get('version', '')}".strip() or "-"
