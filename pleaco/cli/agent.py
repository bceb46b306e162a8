"""``pleaco agent``: run the agent in the foreground."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pleaco.config import ConfigError

# Flags that override the config (file < env < flags); their names are the config's.
OVERRIDES = ("data_dir", "name", "api_listen", "gossip_listen", "proxy_listen", "proxy_image", "seeds", "join_token",
             "discovery", "docker_url", "log_level", "bootstrap", "bootstrap_secret", "advertise")


def add_parser(sub: Any) -> None:
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
    p.add_argument("--bootstrap", choices=["manual", "auto", "first"],
                   help="found or join a cluster by itself: auto over mDNS; first: found one at the first start")
    p.add_argument("--bootstrap-secret", metavar="SECRET", help="shared by the nodes of a bootstrap = auto cluster")
    p.add_argument("--advertise", metavar="HOST[:PORT]", help="the address other nodes reach this one's gossip at")
    p.add_argument("--docker-url", metavar="URL", help="Docker Engine endpoint")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    # Imported here: the client verbs start faster without asyncio and the agent's modules.
    import asyncio

    from pleaco import config
    from pleaco.agent import Agent, AgentError

    try:
        cfg = config.load(args.config, overrides={k: getattr(args, k) for k in OVERRIDES})
    except ConfigError as exc:
        print(f"error: config: {exc}", file=sys.stderr)
        return 2
    agent = Agent(cfg)
    try:
        asyncio.run(agent.run())
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if agent.restart_command:  # an upgrade (or its rollback): the same process, the other slot
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(agent.restart_command[0], agent.restart_command)
    return 0
