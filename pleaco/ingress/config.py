"""The proxy's and the rollouts' tunables: the ``[proxy]`` and ``[rollout]`` tables of
pleaco.toml (env ``PLEACO_PROXY_<NAME>``, ``PLEACO_ROLLOUT_<NAME>``).

Where the proxy listens for traffic (``proxy_listen``) and its image (``proxy_image``) are
top-level settings of the interface contract; everything else about it lives here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


def _split(value: str) -> tuple[str, int] | None:
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


@dataclass
class ProxyConfig:
    # Caddy's admin API. Caddy's own default address; loopback only (validated), because
    # whoever reaches it can rewrite every route. The proxy runs in the host's network
    # namespace, so the agent reaches it here and nothing off the host does.
    admin_listen: str = "127.0.0.1:2019"
    # Where HTTPS is served for apps with https "on" or "redirect" (the standard port).
    https_listen: str = "0.0.0.0:443"
    # Seconds between passes of the proxy loop: container running, config applied. A route
    # change (a replica turned healthy) reaches the proxy within one interval.
    interval: float = 0.5
    # Caddy's lb_try_duration: for this many seconds a request whose upstream refuses the
    # connection is retried on another one, so a replica dying between two health checks
    # costs latency, not an error. Longer than a replica restart would hold clients too long.
    try_duration: float = 5.0
    # Caddy's active health check interval per upstream (seconds): its own view between
    # pleaco's probes, which remain the authority on what is routed at all.
    health_interval: float = 2.0
    # Seconds to wait for the admin API (a config load builds TLS state, hence generous).
    admin_timeout: float = 10.0
    # Caddy access logs feed per-app traffic metrics; off saves the agent parsing one JSON
    # line per request (measurable only at thousands of requests per second).
    access_metrics: bool = True
    # Seconds between looks for other agents' proxies that take this node's addresses (a
    # proxy left behind by an agent whose data dir was lost: both would bind the ports and
    # split the traffic). One container listing per look; a look also happens at once
    # when the admin API answers with another agent's config.
    orphan_check_interval: float = 5.0
    # Seconds the replicas of an identity found gone (its proxy served this node's data dir)
    # are left running before they are removed: other nodes' proxies may still route to
    # them until the cluster declares that node dead (seconds) and drains them (drain_grace
    # plus the mesh delay); a minute covers that with room, and they only cost resources.
    orphan_grace: float = 60.0

    def validate(self) -> list[str]:
        problems = []
        admin = _split(self.admin_listen)
        if admin is None:
            problems.append(f"proxy.admin_listen: expected HOST:PORT, got {self.admin_listen!r}")
        else:
            try:
                loopback = admin[0] == "localhost" or ipaddress.ip_address(admin[0]).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                problems.append("proxy.admin_listen: must be a loopback address (the admin API controls every route)")
        if _split(self.https_listen) is None:
            problems.append(f"proxy.https_listen: expected HOST:PORT, got {self.https_listen!r}")
        for name in ("interval", "try_duration", "health_interval", "admin_timeout", "orphan_check_interval"):
            if not getattr(self, name) > 0:
                problems.append(f"proxy.{name}: must be greater than 0")
        if self.orphan_grace < 0:
            problems.append("proxy.orphan_grace: must be at least 0")
        return problems


@dataclass
class RolloutConfig:
    # Replicas of a new release started at once ahead of the old ones. Equal to the
    # max_replicas default: a rollout takes one health-check round and old replicas serve
    # until then. Lower it when a node cannot hold two releases of an app at once.
    max_surge: int = 100
    # Replicas whose old container may be stopped before its replacement is healthy, once
    # the surge budget is spent. 0: strictly start-first, capacity never drops.
    max_unavailable: int = 0
    # Seconds between taking an old replica out of the proxy and stopping it, for the
    # requests it is serving to finish (the app then gets stop_timeout more after SIGTERM).
    # Small web apps answer in well under a second; Kamal drains for 30 s by default.
    drain_grace: float = 5.0
    # Seconds a new release has for all of this node's replicas to pass their health check
    # before it is rolled back automatically: three times health_grace's 30 s, so a slow
    # starter that is within its startup allowance is never rolled back for it.
    deadline: float = 90.0
    # Roll back automatically at all. Off: a failing release stays, old replicas keep serving.
    auto_rollback: bool = True

    def validate(self) -> list[str]:
        problems = []
        if self.max_surge < 0 or self.max_unavailable < 0:
            problems.append("rollout.max_surge and rollout.max_unavailable: must be at least 0")
        if self.max_surge == 0 and self.max_unavailable == 0:
            problems.append("rollout.max_surge and rollout.max_unavailable: both 0 would never replace a replica")
        if self.drain_grace < 0:
            problems.append("rollout.drain_grace: must be at least 0")
        if not self.deadline > 0:
            problems.append("rollout.deadline: must be greater than 0")
        return problems
