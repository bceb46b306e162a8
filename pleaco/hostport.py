"""HOST:PORT settings and addresses, parsed one way everywhere."""

from __future__ import annotations


class HostPortError(ValueError):
    """A value that is not HOST:PORT; the text names the setting and the value."""


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    """(host, port) of ``value``; an empty host means all interfaces ("0.0.0.0"), IPv6
    hosts may be bracketed. ``what`` names the setting in the error."""
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise HostPortError(f"{what}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
