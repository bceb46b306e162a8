"""The ``pleaco`` command: the agent, and the client verbs that talk to its API.

Human-readable tables by default, ``--json`` for scripts. On an error the server's message
goes to standard error and the exit status is 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pleaco import __version__
from pleaco.api.client import DEFAULT_API, Client, resolve_token
from pleaco.api.errors import ApiError
from pleaco.builds import cli as build_cli
from pleaco.config import ConfigError


def _agent_parser(sub: Any) -> None:
    p = sub.add_parser("agent", help="run the pleaco agent in the foreground")
    p.add_argument("--config", type=Path, help="config file (default /etc/pleaco/pleaco.toml if present)")
    p.add_argument("--data-dir", type=str)
    p.add_argument("--name", type=str)
    p.add_argument("--api-listen", metavar="HOST:PORT")
    p.add_argument("--gossip-listen", metavar="HOST:PORT")
    p.add_argument("--proxy-listen", metavar="HOST:PORT")
    p.add_argument("--proxy-image", metavar="IMAGE")
    p.add_argument("--seed", action="append", dest="seeds", metavar="HOST:PORT")
    p.add_argument("--join-token", metavar="TOKEN")
    p.add_argument("--discovery", choices=["mdns", "seeds", "none"])
    p.add_argument("--bootstrap", choices=["manual", "auto"], help="found or join a cluster by itself (mDNS)")
    p.add_argument("--bootstrap-secret", metavar="SECRET", help="shared by the nodes of a bootstrap = auto cluster")
    p.add_argument("--advertise", metavar="HOST[:PORT]", help="the address other nodes reach this one's gossip at")
    p.add_argument("--docker-url", metavar="URL", help="Docker Engine endpoint")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pleaco", description="pleaco: an easy container platform")
    parser.add_argument("--version", action="version", version=f"pleaco {__version__}")
    parser.add_argument("--api", default=None, help=f"API URL (env PLEACO_API, default {DEFAULT_API})")
    parser.add_argument("--token", default=None, help="API token (env PLEACO_TOKEN, else the admin token file)")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    _agent_parser(sub)

    p = sub.add_parser("status", help="the answering node and its engine")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("nodes", help="cluster members")
    p.add_argument("--json", action="store_true")
    nodes = p.add_subparsers(dest="nodes_verb", metavar="VERB")
    q = nodes.add_parser("rm", help="remove a node: its key is revoked everywhere")
    q.add_argument("node", help="node id, unique id prefix, or name")
    cluster = sub.add_parser("cluster", help="found or join a cluster").add_subparsers(
        dest="cluster_verb", metavar="VERB", required=True
    )
    cluster.add_parser("init", help="found a cluster with this node as its first member")
    cluster.add_parser("token", help="print a join token (alone, for scripts)")

    apps = sub.add_parser("apps", help="deploy and manage apps").add_subparsers(
        dest="apps_verb", metavar="VERB", required=True
    )
    p = apps.add_parser("ls", help="list apps")
    p.add_argument("--json", action="store_true")
    p = apps.add_parser("show", help="one app with its replicas")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p = apps.add_parser("rm", help="remove an app and its containers")
    p.add_argument("name")
    p = apps.add_parser("deploy", help="create or update an app from an image")
    p.add_argument("name")
    p.add_argument("--image", required=True)
    p.add_argument("--replicas", type=int)
    p.add_argument("--port", type=int)
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--health", metavar="PATH")
    p.add_argument("--host", metavar="HOSTNAME")
    p.add_argument("--https", choices=["on", "off", "redirect"],
                   help="HTTPS at the proxy: on (default), off, or redirect HTTP to HTTPS")
    p.add_argument("--json", action="store_true")
    p = apps.add_parser("scale", help="set an app's replica count")
    p.add_argument("name")
    p.add_argument("replicas", type=int)
    p = apps.add_parser("rollback", help="go back to the previous release")
    p.add_argument("name")
    p = apps.add_parser("logs", help="an app's output, all replicas")
    p.add_argument("name")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--tail", default="100", help="lines per replica, or 'all' (default 100)")
    build_cli.add_apps_parsers(apps)
    build_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb == "agent":
        return run_agent(args)
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


class UsageError(ValueError):
    pass


def run_agent(args: argparse.Namespace) -> int:
    # Imported here: the client verbs start faster without asyncio and the agent's modules.
    import asyncio

    from pleaco import config
    from pleaco.agent import Agent, AgentError

    overrides = {
        k: getattr(args, k)
        for k in ("data_dir", "name", "api_listen", "gossip_listen", "proxy_listen", "proxy_image",
                  "seeds", "join_token", "discovery", "docker_url", "log_level", "bootstrap", "bootstrap_secret",
                  "advertise")
    }
    try:
        cfg = config.load(args.config, overrides=overrides)
    except ConfigError as exc:
        print(f"error: config: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(Agent(cfg).run())
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def dispatch(client: Client, args: argparse.Namespace) -> int:
    if args.verb == "status":
        st = client.status()
        if args.json:
            return _json(st)
        eng = st["engine"]
        print(f"node     {st['node_name']} ({st['node_id']})")
        print(f"version  {st['version']}, up {st['uptime_s']:.0f}s")
        print(f"engine   {'reachable' if eng['reachable'] else 'UNREACHABLE: ' + eng['error']}")
        print(f"apps     {st['apps']}, containers {st['containers']} ({st['running']} running)")
        return 0
    if args.verb == "nodes" and args.nodes_verb == "rm":
        removed = client.request("DELETE", f"/v1/nodes/{args.node}")["removed"]
        print(f"removed node {removed}: its key is revoked and the join token rotated")
        return 0
    if args.verb == "cluster":
        if args.cluster_verb == "init":
            out = client.request("POST", "/v1/cluster/init")
            print(f"founded cluster {out['cluster_id']}; add nodes with the token from `pleaco cluster token`")
        else:
            print(client.request("GET", "/v1/cluster/token")["token"])
        return 0
    if args.verb == "nodes":
        nodes = client.nodes()
        if args.json:
            return _json(nodes)
        rows = [[n["id"][:12], n["name"], n["state"], n["address"], n["version"],
                 _ago(n["last_seen"]), str(n.get("load", {}).get("containers", "-"))] for n in nodes]
        _table(["ID", "NAME", "STATE", "ADDRESS", "VERSION", "LAST SEEN", "CONTAINERS"], rows)
        return 0
    if args.verb == "apps":
        return dispatch_apps(client, args)
    if args.verb in ("builds", "vulndb"):
        return build_cli.dispatch(client, args)
    raise UsageError(f"unknown verb {args.verb}")


def dispatch_apps(client: Client, args: argparse.Namespace) -> int:
    verb = args.apps_verb
    if verb == "ls":
        apps = client.apps()
        if args.json:
            return _json(apps)
        rows = [[a["name"], a["image"], str(a["revision"]), f"{a['healthy']}/{a['replicas']}",
                 a["state"], a["message"]] for a in apps]
        _table(["NAME", "IMAGE", "REV", "READY", "STATE", "MESSAGE"], rows)
        return 0
    if verb == "show":
        app = client.app(args.name)
        build = build_cli.app_build(client, args.name)
        if args.json:
            return _json({**app, "build": build})
        _show_app(app)
        build_cli.show_app_build(build)
        return 0
    if verb == "connect":
        return build_cli.connect(client, args)
    if verb == "rm":
        client.remove(args.name)
        print(f"removed {args.name}")
        return 0
    if verb == "deploy":
        spec: dict[str, Any] = {"image": args.image}
        for field_name in ("replicas", "port", "health", "host", "https"):
            if getattr(args, field_name) is not None:
                spec[field_name] = getattr(args, field_name)
        if args.env:
            spec["env"] = parse_env(args.env)
        app = client.deploy(args.name, spec)
        if args.json:
            return _json(app)
        print(f"deployed {app['name']} revision {app['revision']}: {app['image']}, {app['replicas']} replicas")
        print(f"see it with: pleaco apps show {app['name']}")
        return 0
    if verb == "scale":
        app = client.scale(args.name, args.replicas)
        print(f"scaled {app['name']} to {app['replicas']} replicas")
        return 0
    if verb == "rollback":
        app = client.rollback(args.name)
        print(f"rolled back {app['name']}: revision {app['revision']} runs {app['image']}")
        return 0
    if verb == "logs":
        tail = args.tail
        if tail != "all" and not str(tail).isdigit():
            raise UsageError("--tail: expected a number or 'all'")
        for chunk in client.logs(args.name, follow=args.follow, tail=tail):
            sys.stdout.buffer.write(chunk)
            if args.follow:
                sys.stdout.buffer.flush()
        return 0
    raise UsageError(f"unknown apps verb {verb}")


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--env {pair!r}: expected NAME=VALUE")
        env[key] = value
    return env


def _show_app(app: dict[str, Any]) -> None:
    print(f"name       {app['name']}")
    print(f"image      {app['image']} (revision {app['revision']})")
    print(f"state      {app['state']}" + (f": {app['message']}" if app["message"] else ""))
    print(f"replicas   {app['healthy']} healthy, {app['running']} running, {app['replicas']} desired")
    if app["port"]:
        print(f"port       {app['port']}" + (f", health {app['health']}" if app["health"] else ""))
    if app["host"]:
        print(f"host       {app['host']}")
    if app.get("https") and app["https"] != "on":
        print(f"https      {app['https']}")
    if app.get("rollback"):
        rb = app["rollback"]
        print(f"rollback   from revision {rb['from']} to {rb['to']}'s spec: {rb['reason']}")
    for k, v in sorted(app["env"].items()):
        print(f"env        {k}={v}")
    if app["instances"]:
        print()
        rows = [[str(i["replica"]), i.get("node", "")[:12], i["container"], str(i["release"]), i["state"],
                 "yes" if i["healthy"] else "no",
                 f"127.0.0.1:{i['host_port']}" if i["host_port"] else "-",
                 str(i["restarts"]), (f"retry in {i['backoff_s']}s " if i["backoff_s"] else "") + i["error"]]
                for i in app["instances"]]
        _table(["REPLICA", "NODE", "CONTAINER", "REV", "STATE", "HEALTHY", "ADDRESS", "RESTARTS", "NOTE"], rows)


def _json(value: Any) -> int:
    print(json.dumps(value, indent=2, sort_keys=True))
    return 0


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def _ago(ts: float) -> str:
    delta = max(0.0, time.time() - ts)
    if delta < 2:
        return "now"
    if delta < 120:
        return f"{delta:.0f}s ago"
    if delta < 7200:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.0f}h ago"
