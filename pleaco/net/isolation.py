"""What app containers on the ``pleaco`` bridge may reach.

They reach other apps' containers (on this node over the bridge, on other nodes through
the mesh) and the outside world, but none of the hosts' own services: the agent's API,
the proxy's admin API and activator, the Docker Engine's TCP port if any, the gossip port,
whatever else listens on the host. Two chains the agent owns and rewrites whole at every
pass (pleaco/net/firewall.py):

- ``PLEACO-BRIDGE-in`` (INPUT, packets from the bridge to any address of this host):
  answers to connections the host opened (the proxy and health checks dialling replicas)
  pass, as do the ``open_ports`` (the cluster DNS on the bridge's gateway, and the proxy's
  public ports so an app can call another app by its public name); the rest is refused
  (REJECT: "connection refused" at once, not a hang).
- ``PLEACO-BRIDGE-fwd`` (DOCKER-USER, packets from the bridge forwarded elsewhere): new
  connections to other nodes' addresses are refused (their agent, proxy admin and gossip
  listen there) but for the open ports: their host addresses, and their bridges' addresses,
  which the mesh routes to them and which they answer as their own (pleaco.net.mesh.
  other_hosts); answers to connections those hosts opened pass.

The rules stay when the agent stops (like the Docker network and the replicas on it,
which outlive the agent): an app is never left unisolated during a restart or upgrade.
``close()`` is for tests and for turning the network off.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Sequence

from pleaco import logs
from pleaco.net import firewall

log = logs.get("pleaco.net")

# DNS: the cluster names (NAME.internal) are answered on the bridge's gateway.
DNS_PORT = 53


class Isolation:
    """The isolation rules of one bridge: ``apply()`` them (again and again), ``close()``."""

    def __init__(self, bridge: str, open_ports: Sequence[int] = (DNS_PORT,)) -> None:
        if not 1 <= len(bridge) <= 15:  # Linux interface names
            raise ValueError(f"bridge name {bridge!r} must be 1-15 characters")
        for port in open_ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is not 1..65535")
        self.bridge = bridge
        self.open_ports = sorted(set(open_ports))
        self.chain_in = f"PLEACO-{bridge}-in"
        self.chain_fwd = f"PLEACO-{bridge}-fwd"
        self._lock = threading.Lock()

    def rules(self, hosts: Sequence[str]) -> tuple[list[str], list[str]]:
        """The (INPUT, forward) chains' rules."""
        for h in hosts:
            ipaddress.IPv4Address(h)  # a clear ValueError before anything is written
        answers = "-m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"
        inp = [f"-A {self.chain_in} {answers}"]
        fwd = [f"-A {self.chain_fwd} {answers}"]
        for port in self.open_ports:
            for chain in (inp, fwd):
                name = self.chain_in if chain is inp else self.chain_fwd
                chain += [f"-A {name} -p {proto} -m {proto} --dport {port} -j RETURN" for proto in ("udp", "tcp")]
        inp += [f"-A {self.chain_in} -p tcp -j REJECT --reject-with tcp-reset", f"-A {self.chain_in} -j REJECT"]
        for h in sorted(set(hosts)):
            fwd += [f"-A {self.chain_fwd} -d {h}/32 -p tcp -j REJECT --reject-with tcp-reset",
                    f"-A {self.chain_fwd} -d {h}/32 -j REJECT"]
        return inp, fwd

    def apply(self, hosts: Sequence[str] = ()) -> None:
        """Refuse the bridge's containers this host's services and the ``hosts`` (the
        other nodes' host and bridge addresses), except the open ports."""
        inp, fwd = self.rules(hosts)
        with self._lock:
            firewall.restore("iptables-restore", [self.chain_in, self.chain_fwd], inp + fwd,
                             "the app network's isolation rules")
            # First: an ACCEPT the host's own firewall has for its LAN must not let the bridge in.
            firewall.hook("iptables", "INPUT", self.chain_in, ["-i", self.bridge], first=True)
            firewall.hook("iptables", firewall.forward_parent(), self.chain_fwd, ["-i", self.bridge])
            if firewall.has_ipv6():
                # No IPv6 on the network, but the host's link-local address on the bridge answers.
                firewall.restore("ip6tables-restore", [self.chain_in], [f"-A {self.chain_in} -j REJECT"],
                                 "the app network's isolation rules")
                firewall.hook("ip6tables", "INPUT", self.chain_in, ["-i", self.bridge])

    def close(self) -> None:
        with self._lock:
            match = ["-i", self.bridge]
            firewall.remove("iptables", "INPUT", self.chain_in, match)
            for parent in ("DOCKER-USER", "FORWARD"):
                firewall.remove("iptables", parent, self.chain_fwd, match)
            firewall.remove("ip6tables", "INPUT", self.chain_in, match)
        log.info("isolation.removed", bridge=self.bridge)

