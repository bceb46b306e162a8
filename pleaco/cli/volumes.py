"""The ``volumes`` verbs: ls, snapshot (a tarball of a volume to a file, or to the object
store of [volumes] s3_*), snapshots (those in the object store), restore (a tarball into a
volume, from a file or the object store), rm. Snapshot and restore go to the API of the node that holds the volume;
asked of another, the agent answers which node that is and its API address."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from pleaco.api.client import Client
from pleaco.cli.output import print_json, table, when
from pleaco.cli.usage import UsageError


def add_parsers(sub: Any) -> None:
    volumes = sub.add_parser("volumes", help="apps' persistent volumes").add_subparsers(
        dest="volumes_verb", metavar="VERB", required=True)
    p = volumes.add_parser("ls", help="every volume: its app, node and state")
    p.add_argument("--json", action="store_true")
    p = volumes.add_parser("snapshot", help="write a tarball of a volume's content to a file (on its node's API)")
    p.add_argument("app")
    p.add_argument("volume")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="FILE", help="the tarball to write ('-': standard output)")
    where.add_argument("--s3", action="store_true",
                       help="into the object store the holding node's config names ([volumes] s3_*)")
    p = volumes.add_parser("snapshots", help="a volume's snapshots in the object store ([volumes] s3_*)")
    p.add_argument("app")
    p.add_argument("volume")
    p.add_argument("--json", action="store_true")
    p = volumes.add_parser("restore", help="replace a volume's content with a tarball (the app scaled to 0)")
    p.add_argument("app")
    p.add_argument("volume")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--from", dest="source", metavar="FILE", help="a tar, as snapshot writes")
    where.add_argument("--s3", metavar="KEY", help="a snapshot in the object store, by its key (volumes snapshots)")
    p = volumes.add_parser("rm", help="remove an app's volume (or all its volumes) that no app mounts")
    p.add_argument("app")
    p.add_argument("volume", nargs="?")


def dispatch(client: Client, args: argparse.Namespace) -> int:
    verb = args.volumes_verb
    if verb == "ls":
        found = client.volumes()
        if args.json:
            return print_json(found)
        rows = [[v["app"], v["volume"], v["node_name"] + ("" if v["node_live"] else " (down)"), v["path"] or "-",
                 v["state"], when(v["created_ms"])] for v in found]
        table(["APP", "VOLUME", "NODE", "PATH", "STATE", "CREATED"], rows)
        return 0
    if verb == "snapshot":
        if args.s3:
            done = client.volume_snapshot_to_store(args.app, args.volume)
            print(f"stored {done['app']}/{done['volume']} as {done['key']} in bucket {done['bucket']}: "
                  f"{done['bytes']} bytes")
            return 0
        return snapshot(client, args.app, args.volume, args.out)
    if verb == "snapshots":
        stored = client.volume_stored_snapshots(args.app, args.volume)
        if args.json:
            return print_json(stored)
        table(["KEY", "BYTES", "STORED"], [[s["key"], str(s["bytes"]), s["last_modified"]] for s in stored])
        return 0
    if verb == "restore" and args.s3:
        done = client.volume_restore_from_store(args.app, args.volume, args.s3)
        print(f"restored {done['app']}/{done['volume']} from {done['key']}: {done['entries']} entries, "
              f"{done['bytes']} bytes")
        return 0
    if verb == "restore":
        source = Path(args.source)
        if not source.is_file():
            raise UsageError(f"--from: {source} is not a file")
        done = client.volume_restore(args.app, args.volume, source)
        print(f"restored {done['app']}/{done['volume']}: {done['entries']} entries, {done['bytes']} bytes")
        return 0
    if verb == "rm":
        removing = client.remove_volumes(args.app, args.volume)["removing"]
        for v in removing:
            print(f"removing volume {v['app']}/{v['volume']} (on node {v['node'][:12]})")
        return 0
    raise UsageError(f"unknown volumes verb {verb}")


def snapshot(client: Client, app: str, volume: str, out: str) -> int:
    """Stream the tarball to ``out``, through a temporary name beside it: a snapshot cut
    short leaves no file that looks whole."""
    chunks = client.volume_snapshot(app, volume)
    if out == "-":
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        return 0
    target = Path(out)
    partial = target.with_name(f".{target.name}.partial")
    size = 0
    try:
        with open(partial, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
        os.replace(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
    print(f"wrote {target}: {size} bytes from {app}/{volume}")
    return 0
