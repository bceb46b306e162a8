"""The ``run`` verb: a one-off job of an app's current release, its output on standard
output as it comes, and its exit code as the command's. The ``jobs`` verbs: scheduled
jobs (pleaco/stacks/schedule.py): schedule, unschedule, ls, logs."""

from __future__ import annotations

import argparse
import sys
import time
import urllib.parse
from typing import Any

from pleaco.api.client import Client
from pleaco.cli.output import print_json, table
from pleaco.cli.usage import UsageError


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("run", help="run a one-off command in a container of an app's current release",
                       usage="pleaco run APP -- CMD [ARG ...]")
    p.add_argument("app")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    jobs = sub.add_parser("jobs", help="scheduled jobs: cron schedules of an app's commands").add_subparsers(
        dest="jobs_verb", metavar="VERB", required=True)
    p = jobs.add_parser("schedule", help="run a command of the app's current release on a cron schedule",
                        usage='pleaco jobs schedule APP NAME --cron "*/5 * * * *" -- CMD [ARG ...]')
    p.add_argument("app")
    p.add_argument("name")
    p.add_argument("--cron", help="minute hour day-of-month month day-of-week (UTC); required")
    p.add_argument("--json", action="store_true")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    p = jobs.add_parser("unschedule", help="remove a scheduled job and its history")
    p.add_argument("app")
    p.add_argument("name")
    p = jobs.add_parser("ls", help="scheduled jobs with their next tick, and their last runs")
    p.add_argument("app", nargs="?")
    p.add_argument("--runs", type=int, default=5, help="runs shown per schedule (default 5)")
    p.add_argument("--json", action="store_true")
    p = jobs.add_parser("logs", help="a run's output (RUN as `jobs ls` shows it: APP/NAME/TICK)")
    p.add_argument("run")


def _command(args: argparse.Namespace, usage: str) -> list[str]:
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError(f"give the command after --: {usage}")
    return command


def _schedule_options(args: argparse.Namespace) -> None:
    """The options given after APP NAME (argparse's REMAINDER took them with the command):
    ``--cron`` and ``--json`` before the ``--``."""
    rest = list(args.command)
    if "--" in rest:
        options, args.command = rest[:rest.index("--")], rest[rest.index("--"):]
        late = argparse.ArgumentParser(prog="pleaco jobs schedule", add_help=False, exit_on_error=False)
        late.add_argument("--cron")
        late.add_argument("--json", action="store_true")
        try:
            parsed = late.parse_args(options)
        except argparse.ArgumentError as exc:
            raise UsageError(f"jobs schedule: {exc}") from None
        args.cron = parsed.cron or args.cron
        args.json = parsed.json or args.json
    if not args.cron:
        raise UsageError('jobs schedule: --cron is required: pleaco jobs schedule APP NAME --cron "* * * * *" -- CMD')


def _q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def run(client: Client, args: argparse.Namespace) -> int:
    command = _command(args, "pleaco run APP -- CMD [ARG ...]")
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


def _at(seconds: float | None) -> str:
    return "never" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + "Z"


def dispatch(client: Client, args: argparse.Namespace) -> int:
    verb = args.jobs_verb
    if verb == "schedule":
        _schedule_options(args)
        command = _command(args, 'pleaco jobs schedule APP NAME --cron "* * * * *" -- CMD [ARG ...]')
        shown = client.request("PUT", f"/v1/apps/{_q(args.app)}/jobs/{_q(args.name)}",
                               {"cron": args.cron, "command": command})
        if args.json:
            return print_json(shown)
        print(f"scheduled {args.app}/{args.name} ({shown['cron']}): next at {_at(shown['next_at'])}")
        return 0
    if verb == "unschedule":
        client.request("DELETE", f"/v1/apps/{_q(args.app)}/jobs/{_q(args.name)}")
        print(f"unscheduled {args.app}/{args.name}")
        return 0
    if verb == "ls":
        query = urllib.parse.urlencode({k: v for k, v in (("app", args.app), ("limit", args.runs)) if v is not None})
        listing = client.request("GET", f"/v1/jobs?{query}")
        if args.json:
            return print_json(listing)
        table(["APP", "JOB", "CRON", "NEXT", "SOURCE", "COMMAND"],
              [[s["app"], s["name"], s["cron"], _at(s["next_at"]), s["source"], " ".join(s["command"])]
               for s in listing["schedules"]])
        if listing["runs"]:
            print()
            table(["RUN", "AT", "NODE", "STATE", "EXIT", "DURATION", "REASON"],
                  [[r["id"], _at(r["at"]), r["node"][:12], r["state"], "" if r["exit_code"] is None else
                    str(r["exit_code"]), "" if r["duration"] is None else f"{r['duration']:.1f}s", r["reason"]]
                   for r in listing["runs"]])
        return 0
    if verb == "logs":
        parts = args.run.split("/")
        if len(parts) != 3:
            raise UsageError(f"run {args.run!r}: expected APP/NAME/TICK, as `pleaco jobs ls` shows it")
        sys.stdout.buffer.write(client.read_bytes(f"/v1/jobs/runs/{'/'.join(_q(p) for p in parts)}/logs"))
        sys.stdout.flush()
        return 0
    raise UsageError(f"unknown jobs verb {verb}")
