"""The cluster protocol's tunables, in one place, starting from memberlist's LAN defaults.

These are the ``[gossip]`` table of pleaco.toml (env ``PLEACO_GOSSIP_<NAME>``). The
defaults start from hashicorp/memberlist's ``DefaultLANConfig``, which Consul and Nomad
have run on LANs for years; where pleaco differs, the comment says why. The figures quoted
come from ``make bench`` (benchmarks/gossip.py: the real protocol code on a simulated
network).
"""

from __future__ import annotations

from dataclasses import dataclass


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
    # Each update is piggybacked retransmit_mult * log10(N + 1) times (memberlist: 4).
    retransmit_mult: int = 4
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
    # Seconds a TCP exchange (push-pull, join) may take.
    stream_timeout: float = 10.0

    def validate(self) -> list[str]:
        """Problems with these values, one message each (empty when all is well)."""
        problems = []
        for name in ("probe_interval", "probe_timeout", "gossip_interval", "push_pull_interval",
                     "replay_window", "seed_retry", "stream_timeout"):
            if not getattr(self, name) > 0:
                problems.append(f"gossip.{name}: must be greater than 0")
        if self.probe_timeout >= self.probe_interval:
            problems.append("gossip.probe_timeout: must be less than probe_interval")
        for name in ("indirect_checks", "gossip_nodes", "retransmit_mult", "suspicion_mult",
                     "suspicion_max_timeout_mult", "awareness_max_multiplier"):
            if getattr(self, name) < 1:
                problems.append(f"gossip.{name}: must be at least 1")
        if not 512 <= self.max_packet <= 65000:
            problems.append("gossip.max_packet: must be between 512 and 65000")
        return problems
