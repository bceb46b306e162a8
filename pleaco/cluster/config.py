"""The cluster's settings: where it listens and how it finds and joins others
(``ClusterSettings``, top-level keys of pleaco.toml, which the agent's ``Config`` inherits),
and the protocol's tunables (``GossipConfig``), starting from memberlist's LAN defaults.

These are the ``[gossip]`` table of pleaco.toml (env ``PLEACO_GOSSIP_<NAME>``). The
defaults start from hashicorp/memberlist's ``DefaultLANConfig``, which Consul and Nomad
have run on LANs for years; where pleaco differs, the comment says why. The figures quoted
come from ``make bench`` (benchmarks/gossip.py: the real protocol code on a simulated
network).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GossipConfig:
    # Seconds between failure-detector probes of one random member (memberlist: 1 s).
    # pleaco probes twice as often: with suspicion_mult 3 that detects a dead node among
    # 100 in about 4.5 s instead of memberlist's 9.5 s, at 42 kbit/s per node and with no
    # false positive at 10% packet loss (memberlist's defaults: 10 s, 24 kbit/s).
    probe_interval: float = 0.5
    # Seconds to wait for a direct ack before asking others to probe (memberlist: 500 ms
    # for a 1 s interval; the same proportion here). A slow node stretches its own timeout
    # through Lifeguard's awareness score rather than accusing healthy peers.
    probe_timeout: float = 0.25
    # Members asked to probe indirectly when a direct probe fails (memberlist: 3).
    indirect_checks: int = 3
    # Suspicion timeout = suspicion_mult * log10(N) * probe_interval at least, and
    # suspicion_max_timeout_mult times that at most (Lifeguard: the timeout starts at the
    # max and shrinks towards the min as other members independently confirm). memberlist
    # uses 4; 3 still waits for one independent confirmation (k = mult - 2) before the
    # short timeout applies, which is what keeps false positives at zero.
    suspicion_mult: int = 3
    suspicion_max_timeout_mult: int = 6
    # Lifeguard's local health awareness: the probe interval and timeout are stretched up
    # to this factor while this node misses nacks (it is the slow one, not its peers).
    awareness_max_multiplier: int = 8
    # Seconds between gossip rounds and members gossiped to per round (memberlist: 200 ms, 3).
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    # Each update and record is piggybacked retransmit_mult * ceil(log10(N + 1)) times by
    # every node it is new to (memberlist: 4). 8, not 4: with 4, a fleet booting together
    # (four nodes joining a first at once, each labelling itself at once) left one node
    # without one label in 6 of 30 runs until the next push-pull, 15 to 45 s later; with
    # 6 in 1 of 40; with 8 in none of 68. A joiner knows only some members at first, so
    # its own sends and its relays reach few nodes. The price, measured by
    # benchmarks/gossip.py (100 nodes, 10% loss): 46 -> 58 kbit/s per node (memberlist's
    # figure is 330); dissemination times are unchanged.
    retransmit_mult: int = 8
    # The same for load reports (pleaco.cluster.load): each is replaced by the next within
    # [proxy] load_interval, so a lost one costs a second of staleness, and more sends
    # would only crowd the room they share in packets.
    load_retransmit_mult: int = 4
    # Seconds between full state exchanges with one random member over TCP (memberlist:
    # 30 s). They repair whatever gossip lost and bring a node that was away up to date.
    push_pull_interval: float = 30.0
    # Seconds a dead member is still gossiped to, so it learns it was declared dead and
    # refutes (memberlist: 30 s).
    gossip_to_dead: float = 30.0
    # Largest UDP packet (bytes). 1400 stays under a 1500-byte Ethernet MTU with room for
    # IP/UDP headers and tunnels (memberlist: 1400).
    max_packet: int = 1400
    # A packet stamped more than this many seconds from the receiver's clock is dropped as
    # a replay (or a badly wrong clock). Wide enough for NTP-synced machines.
    replay_window: float = 60.0
    # Seconds a returning node must stay alive before placement gives it replicas again:
    # the hysteresis that stops replicas flapping with a node that comes and goes.
    placement_settle: float = 10.0
    # Seconds between retries of seeds when joining, doubling up to 30 s.
    seed_retry: float = 1.0
    # Seconds a TCP exchange (push-pull, join) may take; also the time a connection has to
    # prove who it is (its join request, or its stream's first sealed frame).
    stream_timeout: float = 10.0
    # TCP connections on the gossip port that have not yet proven who they are, at once;
    # more are closed unread (counted as drops, reason "busy"). Honest ones are a join now
    # and then and the push-pulls in flight (about one per member every push_pull_interval,
    # each a few milliseconds before it authenticates): 32 is far above that, and bounds
    # what a flood of strangers holds to 32 x 64 KiB of buffered frames.
    max_pending_streams: int = 32

    # Seconds a node's load report (pleaco.cluster.load) counts in the cluster-wide figures
    # without a newer one: nodes report every [proxy] load_interval (2 s) and a report
    # reaches every node within a second or two, so 10 s outlasts a few lost reports and
    # drops a silent node's traffic soon after; a dead node's goes when it is declared dead.
    load_stale_after: float = 10.0

    def validate(self) -> list[str]:
        """Problems with these values, one message each (empty when all is well)."""
        problems = []
        for name in ("probe_interval", "probe_timeout", "gossip_interval", "push_pull_interval",
                     "replay_window", "seed_retry", "stream_timeout", "load_stale_after"):
            if not getattr(self, name) > 0:
                problems.append(f"gossip.{name}: must be greater than 0")
        if self.probe_timeout >= self.probe_interval:
            problems.append("gossip.probe_timeout: must be less than probe_interval")
        for name in ("indirect_checks", "gossip_nodes", "retransmit_mult", "load_retransmit_mult", "suspicion_mult",
                     "suspicion_max_timeout_mult", "awareness_max_multiplier", "max_pending_streams"):
            if getattr(self, name) < 1:
                problems.append(f"gossip.{name}: must be at least 1")
        if not 512 <= self.max_packet <= 65000:
            problems.append("gossip.max_packet: must be between 512 and 65000")
        return problems


@dataclass
class ClusterSettings:
    """What the cluster layer reads of the node's configuration (pleaco.config.Config is a
    subclass: these are top-level keys of pleaco.toml, env ``PLEACO_<NAME>``)."""

    # Where the node key, the store and the admin token live. Under /var/lib like other
    # daemons' state, so it survives upgrades of /opt/pleaco.
    data_dir: Path = Path("/var/lib/pleaco")
    # Human name of the node; the host name is what operators recognise.
    name: str = field(default_factory=socket.gethostname)
    # The REST API. All interfaces: every node answers every call (DESIGN principle 1).
    # Members announce it to each other.
    api_listen: str = "0.0.0.0:7400"
    # Gossip, UDP and TCP on one port.
    gossip_listen: str = "0.0.0.0:7401"
    # Address other nodes reach this one's gossip port at. Empty: the gossip_listen host,
    # or this host's outbound address when that is 0.0.0.0.
    advertise: str = ""
    seeds: list[str] = field(default_factory=list)
    join_token: str = ""
    # How nodes find each other: mDNS on the LAN (plus seeds), seeds only, or neither.
    discovery: str = "mdns"
    # "manual": a node founds a cluster only on `pleaco cluster init`. "auto": nodes that
    # see each other over mDNS without a cluster let the lowest node id found one and join
    # it, proving they share bootstrap_secret (cloud-init writes it into every node).
    # "first": this node founds a cluster at its first start, as `pleaco cluster init`
    # would (the first node's user data says so; the others join it with seeds and the
    # token `pleaco cluster token` prints there). A node that has a cluster keeps it.
    bootstrap: str = "manual"
    bootstrap_secret: str = ""
    # The cluster protocol's tunables: the [gossip] table.
    gossip: GossipConfig = field(default_factory=GossipConfig)
