"""HOST:PORT settings and addresses, parsed one way everywhere."""

from __future__ import annotations


class HostPortError(ValueError):
    """A value that is not HOST:PORT; the text names the setting and the value."""


def split(addr: str) -> tuple[str, int]:
    """(host, port) of ``HOST:PORT``: the host as written, an IPv6 one without its brackets,
    "" when empty. Raises HostPortError when it is not HOST:PORT with a port of 1-65535."""
    host, sep, port = addr.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise HostPortError(f"expected HOST:PORT, got {addr!r}")
    return host.strip("[]"), int(port)


def host_of(addr: str) -> str:
    """The host of ``HOST:PORT`` (see ``split``)."""
    return split(addr)[0]


def request_host(value: str) -> str:
    """The host name an HTTP Host header (or an access log's request host) names: lower
    case, without its port; an IPv6 literal keeps its brackets."""
    return value.rsplit(":", 1)[0].lower() if not value.endswith("]") else value.lower()


def parse_host_port(value: str, what: str) -> tuple[str, int]:
    """(host, port) of a setting; an empty host means all interfaces ("0.0.0.0"). ``what``
    names the setting in the error."""
    try:
        host, port = split(value)
    except HostPortError:
        raise HostPortError(f"{what}: expected HOST:PORT, got {value!r}") from None
    return host or "0.0.0.0", port
