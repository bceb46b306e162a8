"""The proxy's tunables: the ``[proxy]`` table of pleaco.toml (env ``PLEACO_PROXY_<NAME>``).

Where the proxy listens for traffic (``proxy_listen``) and its image (``proxy_image``) are
top-level settings of the interface contract; everything else about it lives here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from pleaco import hostport
from pleaco.hostport import HostPortError
from pleaco.reconcile.config import ReconcileSettings


def _split(value: str) -> tuple[str, int] | None:
    try:
        return hostport.split(value)
    except HostPortError:
        return None


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    # Caddy access logs feed per-app traffic metrics (requests/s, concurrency, latency: what
    # /metrics, `apps show` and the autoscaler read); off, the agent reads nothing and the
    # apps' load is unknown. Since the lean lines and the batched reader the measured cost
    # is within the noise of a bare Caddy (benchmarks/README.md, "per-app metrics").
    access_metrics: bool = True
    # The access log is sampled above access_log_first requests per second on this node
    # (per log level: 4xx and 5xx lines are counted apart): up to it every request is
    # written and counted exactly, beyond it one request in access_log_every. The agent
    # weighs each line by the requests it stands for (pleaco.ingress.traffic), so the
    # figures stay within about access_log_every requests per second per node of the truth.
    # A written line costs Caddy about 40 microseconds of CPU, a third of what proxying the
    # request costs: writing all, the proxy did 0.77x of a bare Caddy's requests/s, one in
    # 10 1.01x (benchmarks/README.md). Below 100 requests/s the cost is noise and the
    # figures exact. access_log_every = 1 writes every request.
    access_log_first: int = 100
    access_log_every: int = 10
    # Connections the proxy opens to one replica at most (Caddy's max_conns_per_host; more
    # requests wait in the proxy for one to free up); 0: no limit, Caddy's default. A
    # server with a short accept backlog (busybox httpd listens with 9) drops the SYNs of a
    # burst beyond it, and each dropped SYN costs its request a 1 s retransmission: 8 takes
    # the close-per-request benchmark's p99 from about 1 s to within 2x of direct. Not the
    # default, because it also caps requests in flight per replica through this proxy
    # (a long poll or WebSocket holds one): the right number is the app's.
    upstream_max_conns: int = 0
    # Seconds between this node's load reports (pleaco.ingress.load): its per-app traffic,
    # replicas and their CPU and memory, gossiped to every node. The autoscaler's panic
    # window is 6 s: a report every 2 s gives it three samples per window, at one small
    # piggybacked gossip item per node (no store write).
    load_interval: float = 2.0
    # Seconds between load reports instead, while some app of the cluster is autoscaled:
    # the reports are what the autoscaler's panic window reads, and their age is part of
    # how late a load step is seen: 1 s instead of 2 s moved the decision after a 2x step
    # about 0.5 s sooner, to 3.8-4.7 s against the 6 s panic window (benchmarks/README.md).
    # The cost is one small piggybacked gossip item per node a second instead of every 2 s,
    # and a cgroup read per replica with it.
    autoscale_load_interval: float = 1.0
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
    # The activator (pleaco.ingress.activator): where this node's proxy sends the requests
    # for an app scaled to zero, on the agent's loopback (validated), held there while the
    # first replica starts. Next to Caddy's admin port (2019), away from the API (7400)
    # and gossip (7401). Empty: no activator, such a request gets a 503 at once.
    activator_listen: str = "127.0.0.1:2020"
    # Requests held per app on this node at most; one more gets a 503 naming the bound.
    # Knative's activator buffers without a per-revision bound; a bound keeps a burst on a
    # cold app from holding the agent's memory and file descriptors: 100 is far more than
    # one replica answers in a start, and a held request costs two sockets.
    activator_max_held: int = 100
    # Seconds a held request waits for a first healthy replica, then a 503 naming the
    # timeout. A start is about a second for a small image already present, tens of seconds
    # with a pull or a slow health check; 30 s is before most clients give up on their own.
    activator_hold_timeout: float = 30.0

    def validate(self) -> list[str]:
        problems = []
        admin = _split(self.admin_listen)
        if admin is None:
            problems.append(f"proxy.admin_listen: expected HOST:PORT, got {self.admin_listen!r}")
        else:
            if not _loopback(admin[0]):
                problems.append("proxy.admin_listen: must be a loopback address (the admin API controls every route)")
        if _split(self.https_listen) is None:
            problems.append(f"proxy.https_listen: expected HOST:PORT, got {self.https_listen!r}")
        for name in ("interval", "try_duration", "health_interval", "admin_timeout", "orphan_check_interval",
                     "load_interval", "autoscale_load_interval"):
            if not getattr(self, name) > 0:
                problems.append(f"proxy.{name}: must be greater than 0")
        if self.access_log_first < 1:
            problems.append("proxy.access_log_first: must be at least 1")
        if self.access_log_every < 1:
            problems.append("proxy.access_log_every: must be at least 1 (1: every request)")
        if self.upstream_max_conns < 0:
            problems.append("proxy.upstream_max_conns: must be at least 0 (0: no limit)")
        if self.activator_listen:
            activator = _split(self.activator_listen)
            if activator is None:
                problems.append(f"proxy.activator_listen: expected HOST:PORT or empty, got {self.activator_listen!r}")
            elif not _loopback(activator[0]):
                problems.append("proxy.activator_listen: must be a loopback address (only this node's proxy "
                                "sends requests to it)")
        if self.activator_max_held < 1:
            problems.append("proxy.activator_max_held: must be at least 1")
        if not self.activator_hold_timeout > 0:
            problems.append("proxy.activator_hold_timeout: must be greater than 0")
        if self.orphan_grace < 0:
            problems.append("proxy.orphan_grace: must be at least 0")
        return problems


@dataclass
class IngressSettings(ReconcileSettings):
    """What the proxy loop reads: the app loop's settings (it routes to what that loop
    runs) and the proxy's own, top-level keys of pleaco.toml plus the [proxy] table."""

    # Where the reverse proxy listens, and its image.
    proxy_listen: str = "0.0.0.0:80"
    # The proxy's image; empty runs no proxy on this node (apps stay reachable on their
    # published ports only).
    proxy_image: str = "caddy:2"
    # Apps without a host name get NAME.<cluster_domain>. ".internal" is reserved by ICANN
    # (2024) for private use and will never be delegated, so no ACME is attempted for it and
    # Caddy's internal CA signs it; ".local" would collide with mDNS (RFC 6762), which
    # systemd-resolved and macOS send such names to instead of DNS.
    cluster_domain: str = "pleaco.internal"
    # The reverse proxy's tunables: the [proxy] table.
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
