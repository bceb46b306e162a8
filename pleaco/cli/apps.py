"""The ``apps`` verbs: deploy, ls, show, scale, autoscale, rollback, logs, rm (and connect, a
build verb)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pleaco.api.client import Client
from pleaco.apps import format_memory
from pleaco.cli import builds
from pleaco.cli import exec as exec_cli
from pleaco.cli.output import print_json, table
from pleaco.cli.usage import UsageError, parse_env


def add_parsers(sub: Any) -> None:
    apps = sub.add_parser("apps", help="deploy and manage apps").add_subparsers(
        dest="apps_verb", metavar="VERB", required=True
    )
    p = apps.add_parser("ls", help="list apps")
    p.add_argument("--json", action="store_true")
    p = apps.add_parser("show", help="one app with its replicas")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p = apps.add_parser("rm", help="remove an app and its containers (its volumes stay, orphaned, unless --volumes)")
    p.add_argument("name")
    p.add_argument("--volumes", action="store_true", help="remove its volumes too, and their data")
    p = apps.add_parser("deploy", help="create or update an app from an image")
    p.add_argument("name")
    p.add_argument("--image", required=True)
    p.add_argument("--replicas", type=int)
    p.add_argument("--port", type=int)
    p.add_argument("--env", action="append", default=[], metavar="K=V")
    p.add_argument("--health", metavar="PATH")
    p.add_argument("--health-cmd", metavar="SHELL_LINE",
                   help="health as a command run in each replica by the engine (redis-cli ping): "
                        "for apps without HTTP; not with --health")
    p.add_argument("--host", metavar="HOSTNAME")
    p.add_argument("--https", choices=["on", "off", "redirect"],
                   help="HTTPS at the proxy: on (default), off, or redirect HTTP to HTTPS")
    p.add_argument("--memory", metavar="SIZE", help="memory limit of every replica: 256m, 1g (at least 6m)")
    p.add_argument("--cpus", type=float, metavar="N", help="CPU limit of every replica: 0.5 is half a core's time")
    p.add_argument("--pids", type=int, metavar="N", help="processes and threads per replica")
    p.add_argument("--max-conns", type=int, metavar="N",
                   help="connections each proxy opens to one replica at most, more requests wait in the proxy "
                        "(0: no cap; default: [proxy] upstream_max_conns)")
    p.add_argument("--constraint", action="append", default=[], metavar="EXPR",
                   help="run only on nodes whose labels meet EXPR: node.labels.KEY==VALUE or !=VALUE "
                        "(repeat for several; label nodes with `pleaco nodes label`)")
    p.add_argument("--volume", action="append", default=[], metavar="NAME:/PATH",
                   help="mount the app's named volume NAME at PATH in every replica (repeat for several); "
                        "an app with volumes runs on the one node that holds them")
    p.add_argument("--json", action="store_true")
    p = apps.add_parser("scale", help="set an app's replica count")
    p.add_argument("name")
    p.add_argument("replicas", type=int)
    p = apps.add_parser("autoscale", help="scale an app with its traffic between --min and --max replicas")
    p.add_argument("name")
    p.add_argument("--min", type=int, dest="min_replicas", metavar="N")
    p.add_argument("--max", type=int, dest="max_replicas", metavar="N")
    p.add_argument("--metric", choices=["concurrency", "rps", "cpu"],
                   help="what a replica's target counts: in-flight requests (default), requests/s, CPU cores")
    p.add_argument("--target", type=float, metavar="X",
                   help="per replica (defaults: concurrency 100, rps 200, cpu 0.7)")
    p.add_argument("--stable-window", type=float, metavar="S", help="seconds averaged (default 60)")
    p.add_argument("--panic-window", type=float, metavar="S", help="seconds averaged for surges (default 6)")
    p.add_argument("--scale-to-zero-after", type=float, metavar="S",
                   help="seconds without traffic before 0 replicas (needs --min 0)")
    p.add_argument("--off", action="store_true", help="stop autoscaling; the replica count stays")
    p.add_argument("--json", action="store_true")
    p = apps.add_parser("rollback", help="go back to the previous release")
    p.add_argument("name")
    p = apps.add_parser("logs", help="an app's output, all replicas")
    p.add_argument("name")
    p.add_argument("--follow", "-f", action="store_true")
    p.add_argument("--tail", default="100", help="lines per replica, or 'all' (default 100)")
    builds.add_apps_parsers(apps)
    exec_cli.add_parser(apps)


def dispatch(client: Client, args: argparse.Namespace) -> int:
    verb = args.apps_verb
    if verb == "exec":
        return exec_cli.run(client, args)
    if verb == "ls":
        apps = client.apps()
        if args.json:
            return print_json(apps)
        rows = [[a["name"], a["image"], str(a["revision"]), f"{a['healthy']}/{a['replicas']}",
                 a["state"], a["message"]] for a in apps]
        table(["NAME", "IMAGE", "REV", "READY", "STATE", "MESSAGE"], rows)
        return 0
    if verb == "show":
        app = client.app(args.name)
        build = builds.app_build(client, args.name)
        if args.json:
            return print_json({**app, "build": build})
        show(app)
        builds.show_app_build(build)
        return 0
    if verb == "connect":
        return builds.connect(client, args)
    if verb == "rm":
        client.remove(args.name)
        print(f"removed {args.name}")
        if args.volumes:
            gone = client.remove_volumes(args.name)["removing"] if any(
                v["app"] == args.name for v in client.volumes()) else []
            print(f"removing its volumes: {', '.join(v['volume'] for v in gone)}" if gone else "it had no volumes")
        return 0
    if verb == "deploy":
        spec: dict[str, Any] = {"image": args.image}
        for field_name in ("replicas", "port", "health", "health_cmd", "host", "https", "memory", "cpus", "pids",
                           "max_conns"):
            if getattr(args, field_name) is not None:
                spec[field_name] = getattr(args, field_name)
        if args.constraint:
            spec["constraints"] = args.constraint
        if args.volume:
            spec["volumes"] = args.volume  # NAME:/path, parsed (and checked) by the agent
        if args.env:
            spec["env"] = parse_env(args.env)
        app = client.deploy(args.name, spec)
        if args.json:
            return print_json(app)
        print(f"deployed {app['name']} revision {app['revision']}: {app['image']}, {app['replicas']} replicas")
        print(f"see it with: pleaco apps show {app['name']}")
        return 0
    if verb == "scale":
        app = client.scale(args.name, args.replicas)
        print(f"scaled {app['name']} to {app['replicas']} replicas")
        return 0
    if verb == "autoscale":
        return autoscale(client, args)
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


AUTOSCALE_OPTIONS = ("min_replicas", "max_replicas", "metric", "target", "stable_window", "panic_window",
                     "scale_to_zero_after")


def autoscale(client: Client, args: argparse.Namespace) -> int:
    given = {k: getattr(args, k) for k in AUTOSCALE_OPTIONS if getattr(args, k) is not None}
    if args.off:
        if given:
            raise UsageError("--off takes no other option")
        app = client.autoscale_off(args.name)
    else:
        if "min_replicas" not in given or "max_replicas" not in given:
            raise UsageError("--min N and --max N are required (or --off)")
        app = client.autoscale(args.name, given)
    if args.json:
        return print_json(app)
    print(f"{app['name']}: " + (f"autoscale {describe_autoscale(app['autoscale'])}" if app.get("autoscale")
                                else f"autoscaling off, {app['replicas']} replicas"))
    return 0


def describe_autoscale(p: dict[str, Any]) -> str:
    text = (f"{p['min_replicas']}..{p['max_replicas']} replicas, {p['metric']} target {p['target']:g} per replica, "
            f"windows {p['stable_window']:g}s stable / {p['panic_window']:g}s panic")
    if p.get("scale_to_zero_after") is not None:
        text += f", to zero after {p['scale_to_zero_after']:g}s idle"
    return text


def describe_autoscaler(policy: dict[str, Any], scaler: dict[str, Any]) -> list[str]:
    """The autoscaler's lines of ``apps show``: the metric now and over its windows, who
    decides, and the last decisions with their reasons."""
    lines = []
    fig = scaler.get("figures")
    if fig:
        def num(x: float | None) -> str:
            return "-" if x is None else f"{x:.3g}"

        lines.append(f"metric     {fig['metric']} {num(fig['value'])} now, {num(fig['stable_average'])} over "
                     f"{policy['stable_window']:g}s, {num(fig['panic_average'])} over {policy['panic_window']:g}s"
                     + ("; panic" if scaler.get("panic") else "")
                     + (f"; owner {fig['owner'][:12]}" if fig.get("owner") else ""))
    decisions = scaler.get("decisions") or []
    if not decisions:
        lines.append("decisions  (none yet)")
    for i, d in enumerate(reversed(decisions)):  # newest first
        when = time.strftime("%H:%M:%S", time.localtime(d["at_ms"] / 1000))
        lines.append(f"{'decisions' if i == 0 else '':<10} {when} {d['from']} -> {d['to']} on {d['node']}: "
                     f"{d['reason']}")
    return lines


def show(app: dict[str, Any]) -> None:
    print(f"name       {app['name']}")
    print(f"image      {app['image']} (revision {app['revision']})")
    print(f"state      {app['state']}" + (f": {app['message']}" if app["message"] else ""))
    print(f"replicas   {app['healthy']} healthy, {app['running']} running, {app['replicas']} desired")
    if app["port"]:
        print(f"port       {app['port']}" + (f", health {app['health']}" if app["health"] else ""))
    if check := app.get("health_cmd"):
        print(f"health     command {' '.join(check['test'][1:])!r}, every {check['interval']:g} s")
    if app["host"]:
        print(f"host       {app['host']}")
    if app.get("https") and app["https"] != "on":
        print(f"https      {app['https']}")
    limits = [f"memory {format_memory(app['memory'])}" if app.get("memory") else "",
              f"cpus {app['cpus']:g}" if app.get("cpus") else "", f"pids {app['pids']}" if app.get("pids") else ""]
    if any(limits):
        print(f"limits     {', '.join(x for x in limits if x)}")
    if app.get("max_conns") is not None:
        print("max conns  " + (f"{app['max_conns']} per replica from each proxy" if app["max_conns"]
                               else "no cap (whatever [proxy] upstream_max_conns says)"))
    if app.get("autoscale"):
        print(f"autoscale  {describe_autoscale(app['autoscale'])}")
        for line in describe_autoscaler(app["autoscale"], app.get("autoscaler") or {}):
            print(line)
    if app.get("rollback"):
        rb = app["rollback"]
        print(f"rollback   from revision {rb['from']} to {rb['to']}'s spec: {rb['reason']}")
    for c in app.get("constraints") or []:
        print(f"constraint {c}")
    for v in app.get("volumes") or []:
        print(f"volume     {v['name']} at {v['path']}")
    for k, v in sorted(app["env"].items()):
        print(f"env        {k}={v}")
    if app.get("secrets"):
        print(f"secrets    {', '.join(app['secrets'])} (pleaco secrets ls {app['name']})")
    if app["instances"]:
        print()
        rows = [[str(i["replica"]), i.get("node", "")[:12], i["container"], str(i["release"]), i["state"],
                 "yes" if i["healthy"] else "no",
                 i.get("address") or (f"127.0.0.1:{i['host_port']}" if i["host_port"] else "-"),
                 str(i["restarts"]), (f"retry in {i['backoff_s']}s " if i["backoff_s"] else "") + i["error"]]
                for i in app["instances"]]
        table(["REPLICA", "NODE", "CONTAINER", "REV", "STATE", "HEALTHY", "ADDRESS", "RESTARTS", "NOTE"], rows)
