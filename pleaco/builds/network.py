"""The network a build's Dockerfile ``RUN`` steps get (``build.network``).

A Dockerfile comes from the app's git repository, so its ``RUN`` steps run whatever anyone
who can push there wrote. On the engine's default bridge they reach everything the host
does not firewall: the agent's API and gossip (listening on all addresses), the Docker
Engine's TCP port if any, app containers and their published ports, and every other
machine on the node's private networks. The test step already runs without a network;
the build cannot simply do the same, because most real Dockerfiles fetch packages
(``apt-get install``, ``pip install``, ``npm ci``) while they build. So three modes:

- ``isolated`` (the default): a bridge network pleaco makes (``pleaco-build``), with
  containers on it unable to reach each other (``enable_icc=false``), and firewall rules
  pleaco owns that refuse (REJECT, so a step fails at once with "connection refused"
  rather than hanging) everything sent from that bridge to the host itself (any of its
  addresses: the INPUT chain sees all of them) and everything forwarded to private,
  loopback, link-local (cloud metadata at 169.254.169.254), shared, multicast and reserved
  ranges, or to a port the engine publishes (DNAT'd). The public internet, where package
  registries are, stays reachable; name resolution goes through the engine's embedded DNS
  inside the container's namespace, so it keeps working. ``build.network_allow`` lists
  private networks a build may still reach (a package mirror on the LAN).
- ``none``: no network at all, for Dockerfiles that only copy and compile what the
  repository holds (and base images already on the node). The safest, but a step that
  installs packages fails.
- ``host-reachable``: the engine's default bridge, as a plain ``docker build`` has it.
  Only for repositories whose every pusher is trusted with the node's services.

The network and its rules are the node's, shared by every build and every agent process
on the engine: they are made (or repaired) before each build, atomically, and are not
removed when the agent stops, like the engine's own ``docker0``. If they cannot be made
(no ``iptables``, not root), the build fails with the reason: it never silently runs with
the host reachable.
"""

from __future__ import annotations

import subprocess
import threading
from typing import Protocol

from pleaco import logs
from pleaco.builds.config import NETWORK_MODES
from pleaco.builds.engine import BuildFailed
from pleaco.net import firewall

log = logs.get("pleaco.builds")

NETWORK = "pleaco-build"
LABEL_NETWORK = "pleaco.build-network"

# Not reachable from an isolated build unless listed in build.network_allow: RFC 6890's
# special-purpose IPv4 ranges that are not globally routable, i.e. where this node, its
# peers, its LAN and its cloud provider's services (metadata) live. The documentation
# ranges (TEST-NET-*) route nowhere and are left out.
DENIED_NETWORKS = (
    "0.0.0.0/8",        # "this" network
    "10.0.0.0/8",       # private use
    "100.64.0.0/10",    # carrier-grade NAT, often a cloud's internal network
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local: cloud metadata services (169.254.169.254)
    "172.16.0.0/12",    # private use: the engine's bridges and their containers
    "192.0.0.0/24",     # IETF protocol assignments
    "192.168.0.0/16",   # private use
    "198.18.0.0/15",    # benchmarking
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, and broadcast
)


class NetworkEngine(Protocol):
    """The engine calls the build network needs (BuildEngine has them)."""

    def network_inspect(self, name: str) -> dict[str, object] | None: ...

    def network_create(self, name: str, options: dict[str, str], labels: dict[str, str]) -> None: ...

    def network_remove(self, name: str) -> None: ...


class BuildNetwork:
    """What ``build.network`` means for one engine: ``prepare()`` before each build gives
    the ``network_mode`` a build's containers get."""

    def __init__(self, engine: NetworkEngine, mode: str = "isolated", allow: list[str] | None = None,
                 name: str = NETWORK, bridge: str = NETWORK) -> None:
        if mode not in NETWORK_MODES:
            raise ValueError(f"build.network: expected one of {', '.join(NETWORK_MODES)}, got {mode!r}")
        if len(bridge) > 15:  # Linux interface names
            raise ValueError(f"bridge name {bridge!r} is longer than 15 characters")
        self.engine = engine
        self.mode = mode
        self.allow = list(allow or [])
        self.name = name
        self.bridge = bridge
        # Firewall chains of this bridge, named after it so two networks never share one.
        self.chain_in = f"PLEACO-{bridge}-in"
        self.chain_fwd = f"PLEACO-{bridge}-fwd"
        self._lock = threading.Lock()

    def prepare(self) -> str | None:
        """The ``network_mode`` for a build's containers (None: the engine's default
        bridge), having made or repaired the isolated network and its rules."""
        if self.mode == "none":
            return "none"
        if self.mode == "host-reachable":
            return None
        with self._lock:
            try:
                self._ensure_network()
                self._ensure_rules()
            except BuildFailed:
                raise
            except (OSError, subprocess.SubprocessError) as exc:
                raise BuildFailed(f"cannot isolate the build network {self.name!r} ({exc}); "
                                  "set build.network = \"none\" or run the agent as root with iptables") from exc
        return self.name

    # -- the network ----------------------------------------------------------------------

    def _ensure_network(self) -> None:
        info = self.engine.network_inspect(self.name)
        if info is None:
            try:
                self.engine.network_create(self.name, {
                    "com.docker.network.bridge.name": self.bridge,
                    # Builds running at once cannot reach each other.
                    "com.docker.network.bridge.enable_icc": "false",
                }, {LABEL_NETWORK: "1"})
                log.info("build.network_created", network=self.name, bridge=self.bridge)
            except Exception as exc:
                # Another agent on this engine may have made it first (the engine refuses
                # a second network of one name): that one is checked like any other.
                if self.engine.network_inspect(self.name) is None:
                    raise BuildFailed(f"cannot create the build network {self.name!r}: {exc}") from exc
            info = self.engine.network_inspect(self.name)
        options = info.get("Options") if info else None
        options = options if isinstance(options, dict) else {}
        # A network of that name that is not ours would take the builds without the rules.
        if (info is None or info.get("Driver") != "bridge"
                or options.get("com.docker.network.bridge.name") != self.bridge
                or options.get("com.docker.network.bridge.enable_icc") != "false"):
            raise BuildFailed(f"the engine's network {self.name!r} is not the isolated bridge pleaco makes "
                              f"(bridge {self.bridge!r}, enable_icc=false); remove it (docker network rm "
                              f"{self.name}) and pleaco makes it again")

    # -- the firewall ---------------------------------------------------------------------

    def _ensure_rules(self) -> None:
        """Replace this bridge's chains in one transaction, then hook them in where
        missing: a build never runs while the chains are half written."""
        v4 = [f"-A {self.chain_in} -j REJECT"]
        # Published ports are DNAT'd to containers before FORWARD: refused whatever their
        # destination became, before the allow list can match it.
        v4.append(f"-A {self.chain_fwd} -m conntrack --ctstate DNAT -j REJECT")
        v4 += [f"-A {self.chain_fwd} -d {net} -j RETURN" for net in self.allow]
        v4 += [f"-A {self.chain_fwd} -d {net} -j REJECT" for net in DENIED_NETWORKS]
        try:
            firewall.restore("iptables-restore", [self.chain_in, self.chain_fwd], v4, "the build network's rules")
            firewall.hook("iptables", "INPUT", self.chain_in, ["-i", self.bridge])
            firewall.hook("iptables", firewall.forward_parent(), self.chain_fwd, ["-i", self.bridge])
            # The network has no IPv6, but the host's link-local IPv6 addresses on the bridge
            # answer anyone on it: refused as well.
            if firewall.has_ipv6():
                firewall.restore("ip6tables-restore", [self.chain_in], [f"-A {self.chain_in} -j REJECT"],
                                 "the build network's rules")
                firewall.hook("ip6tables", "INPUT", self.chain_in, ["-i", self.bridge])
        except firewall.FirewallError as exc:
            raise BuildFailed(str(exc)) from exc

    def remove(self) -> None:
        """Remove the network, then its rules (tests, and an operator turning isolation
        off). The engine refuses to remove a network a build still uses: then the rules
        stay too, so that build is never left on the bridge without them."""
        with self._lock:
            if self.engine.network_inspect(self.name) is not None:
                self.engine.network_remove(self.name)
            hooks = (("iptables", self.chain_in, "INPUT"), ("iptables", self.chain_fwd, "DOCKER-USER"),
                     ("iptables", self.chain_fwd, "FORWARD"), ("ip6tables", self.chain_in, "INPUT"))
            for tool, chain, parent in hooks:
                firewall.remove(tool, parent, chain, ["-i", self.bridge])
