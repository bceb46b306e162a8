"""The verbs about this node and the cluster: ``status``, ``nodes [rm|label]``, ``cluster init|token``."""

from __future__ import annotations

import argparse
import urllib.parse
from typing import Any

from pleaco.api.client import Client
from pleaco.cli.output import ago, print_json, table
from pleaco.cli.upgrade import upgrade_column


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("status", help="the answering node and its engine")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("nodes", help="cluster members")
    p.add_argument("--json", action="store_true")
    nodes = p.add_subparsers(dest="nodes_verb", metavar="VERB")
    q = nodes.add_parser("rm", help="remove a node: its key is revoked everywhere")
    q.add_argument("node", help="node id, unique id prefix, or name")
    q = nodes.add_parser("label", help="set (KEY=VALUE) or remove (KEY-) a node's labels, for apps' constraints")
    q.add_argument("node", help="node id, unique id prefix, or name")
    q.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-")
    cluster = sub.add_parser("cluster", help="found or join a cluster").add_subparsers(
        dest="cluster_verb", metavar="VERB", required=True
    )
    cluster.add_parser("init", help="found a cluster with this node as its first member")
    cluster.add_parser("token", help="print a join token (alone, for scripts)")


def status(client: Client, args: argparse.Namespace) -> int:
    st = client.status()
    if args.json:
        return print_json(st)
    eng = st["engine"]
    print(f"node     {st['node_name']} ({st['node_id']})")
    print(f"version  {st['version']}, up {st['uptime_s']:.0f}s")
    print(f"engine   {'reachable' if eng['reachable'] else 'UNREACHABLE: ' + eng['error']}")
    print(f"apps     {st['apps']}, containers {st['containers']} ({st['running']} running)")
    return 0


def nodes(client: Client, args: argparse.Namespace) -> int:
    if args.nodes_verb == "rm":
        removed = client.request("DELETE", f"/v1/nodes/{args.node}")["removed"]
        print(f"removed node {removed}: its key is revoked and the join token rotated")
        return 0
    if args.nodes_verb == "label":
        out = client.request("PUT", f"/v1/nodes/{urllib.parse.quote(args.node, safe='')}/labels",
                             {"labels": args.labels})
        print(f"node {out['name'] or out['id']}: labels {format_labels(out['labels']) or '(none)'}")
        return 0
    members = client.nodes()
    if args.json:
        return print_json(members)
    rows = [[n["id"][:12], n["name"], n["state"], n["address"], n["version"],
             upgrade_column(n), ago(n["last_seen"]), str(n.get("load", {}).get("containers", "-")),
             n.get("subnet") or "-", format_labels(n.get("labels") or {}) or "-"] for n in members]
    table(["ID", "NAME", "STATE", "ADDRESS", "VERSION", "UPGRADE", "LAST SEEN", "CONTAINERS", "SUBNET", "LABELS"], rows)
    return 0


def format_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def cluster(client: Client, args: argparse.Namespace) -> int:
    if args.cluster_verb == "init":
        out = client.request("POST", "/v1/cluster/init")
        print(f"founded cluster {out['cluster_id']}; add nodes with the token from `pleaco cluster token`")
    else:
        print(client.request("GET", "/v1/cluster/token")["token"])
    return 0
