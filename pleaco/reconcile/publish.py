"""Where a replica's port is published, and the address each node dials it at, when the
agent does not manage the network (``[network] enabled = false``); with it, replicas are
dialled at their cluster address instead (``NodeView.address``).

The routing mesh: every node's proxy routes to the healthy replicas of every node. A
node's own replicas are dialled on their Docker network address; another node's on the
address their port is published on, as that node's ``route`` record says. So ports are
published on the node's advertised (cluster) address, reachable by the other nodes, and
never on all interfaces by default: apps are meant to be reached through the proxy.
"""

from __future__ import annotations

import ipaddress

ANY = ("", "0.0.0.0", "::")


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def publish_host(configured: str, advertise_host: str) -> str:
    """The host address replicas' ports are bound on: the configured one when set, else the
    advertised address, else (a loopback advertised address: one machine) 127.0.0.1."""
    if configured:
        return configured
    if advertise_host in ANY or is_loopback(advertise_host):
        return "127.0.0.1"
    return advertise_host


def local_dial_host(bound: str) -> str:
    """Where this node reaches a port bound on ``bound``."""
    return "127.0.0.1" if bound in ANY else bound


def mesh_address(host_ip: str, host_port: int, advertise_host: str) -> str:
    """Where other nodes reach a port published on ``host_ip``: a port bound on every
    address is reached at the node's advertised address."""
    host = advertise_host if host_ip in ANY else host_ip
    return f"{host}:{host_port}"
