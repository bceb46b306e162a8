"""``pleaco release``: release keys and signed bundles, made locally (no API).

    pleaco release keygen --out DIR
    pleaco release build --key KEY --out FILE [--version V] [--tree DIR] [--wheels DIR]

Hidden, for the node itself: ``release guard`` (the upgrade guard an upgrade starts, see
pleaco/host/trial.py) and ``release apply --bundle F [--data-dir D]`` (asks the agent on
this node's data dir to upgrade itself to a bundle; the cluster-wide ``pleaco upgrade``
goes through the API instead).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pleaco.errors import PleacoError

DEFAULT_DATA_DIR = "/var/lib/pleaco"
# Seconds `release apply` waits for the agent's answer: verifying and installing a bundle
# (a venv and a pip install from local wheels) takes well under a minute on a loaded host.
APPLY_TIMEOUT = 600.0


def add_parsers(sub: Any) -> None:
    release = sub.add_parser("release", help="release keys and signed bundles (local)").add_subparsers(
        dest="release_verb", metavar="VERB", required=True)
    p = release.add_parser("keygen", help="make a release key pair: DIR/release.key (0600), DIR/release.pub")
    p.add_argument("--out", type=Path, required=True, metavar="DIR")
    p = release.add_parser("build", help="make a signed bundle of a pleaco source tree")
    p.add_argument("--key", type=Path, required=True, help="the release key (release.key)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE")
    p.add_argument("--version", help="the version to release (default: the tree's)")
    p.add_argument("--tree", type=Path, default=Path("."), help="the pleaco source tree (default: .)")
    p.add_argument("--wheels", type=Path, default=None, metavar="DIR",
                   help="dependency wheel cache (default ~/.cache/pleaco/wheels)")
    p = release.add_parser("guard")  # hidden: started by an upgrade
    p.add_argument("--data-dir", type=Path, required=True)
    p = release.add_parser("apply")  # hidden: a node-local upgrade of the agent on --data-dir
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data-dir", type=Path, default=None)


def run(args: argparse.Namespace) -> int:
    try:
        if args.release_verb == "keygen":
            return keygen(args)
        if args.release_verb == "build":
            return build(args)
        if args.release_verb == "guard":
            return guard(args)
        if args.release_verb == "apply":
            return apply(args)
    except PleacoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    raise AssertionError(args.release_verb)


def keygen(args: argparse.Namespace) -> int:
    from pleaco.host.bundle import key_id, keygen

    args.out.mkdir(parents=True, exist_ok=True)
    private, public = keygen(args.out)
    print(f"private key {private} (keep it secret)")
    print(f"public key  {public}: id {key_id(bytes.fromhex(public.read_text().strip()))}")
    print(f'trust it:    [upgrade] trusted_keys = ["{public.read_text().strip()}"]')
    return 0


def build(args: argparse.Namespace) -> int:
    from pleaco.host.bundle import build_bundle

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    manifest = build_bundle(args.tree.resolve(), args.key, args.out, args.version, wheels=args.wheels,
                            progress=progress)
    print(f"{args.out}: pleaco {manifest.version}, {len(manifest.files)} wheels, signed by {manifest.key_id}")
    return 0


def guard(args: argparse.Namespace) -> int:
    from pleaco import logs
    from pleaco.host.trial import run_guard

    logs.setup("info")
    return run_guard(args.data_dir)


def apply(args: argparse.Namespace) -> int:
    from pleaco.host.trial import REPLY_FILE, REQUEST_FILE, agent_pid

    data_dir = args.data_dir or Path(os.environ.get("PLEACO_DATA_DIR", DEFAULT_DATA_DIR))
    bundle = args.bundle.resolve()
    if not bundle.is_file():
        print(f"error: bundle {bundle} does not exist", file=sys.stderr)
        return 1
    pid = agent_pid(data_dir)
    if pid is None:
        print(f"error: no agent runs on data dir {data_dir}", file=sys.stderr)
        return 1
    reply = data_dir / REPLY_FILE
    reply.unlink(missing_ok=True)
    request = data_dir / REQUEST_FILE
    tmp = request.with_name(request.name + ".tmp")
    tmp.write_text(json.dumps({"bundle": str(bundle)}))
    os.replace(tmp, request)
    os.kill(pid, signal.SIGUSR1)
    print(f"asked the agent (pid {pid}) to upgrade to {bundle}; verifying and installing", file=sys.stderr)
    deadline = time.monotonic() + APPLY_TIMEOUT
    while time.monotonic() < deadline:
        try:
            outcome = json.loads(reply.read_text())
        except (OSError, ValueError):
            time.sleep(0.2)
            continue
        if "error" in outcome:
            print(f"error: {outcome['error']}", file=sys.stderr)
            return 1
        print(f"switched to {outcome['version']}; the agent restarts on it (`upgrade.json` in {data_dir} "
              "tells when it is confirmed)")
        return 0
    print(f"error: no answer from the agent within {APPLY_TIMEOUT:.0f} s", file=sys.stderr)
    return 1
