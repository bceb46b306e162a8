"""The proxy container's /etc/hosts: the upstream names it dials, without a DNS query.

Caddy dials SRV targets by name (``ip-A-B-C-D.pleaco.``, see pleaco.ingress.dns), and Go
resolves a name on every new connection: for an app that closes each connection, two
queries (A and AAAA) to the agent's DNS per request, with the agent's event loop on the
request's path. Go reads /etc/hosts first (and caches it for 5 s), so the agent writes
every upstream name there and the DNS is only asked for names the file does not have yet.

A name spells its address, so an entry is never wrong, only perhaps no longer used: entries
are kept until there are MAX_ENTRIES, then the file is rewritten with the current ones.
The file is bind-mounted into the container, so it is rewritten in place (a rename would
leave the container with the old inode); a reader that sees it half written misses some
names and asks the DNS for them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pleaco.ingress.dns import target_name

MAX_ENTRIES = 4096
MOUNT_AT = "/etc/hosts"


class HostsFile:
    def __init__(self, path: Path, base: str = "") -> None:
        self.path = path
        # The host's own entries first: in the host's network namespace the container would
        # otherwise get a copy of the host's /etc/hosts from Docker.
        self.base = base if base.endswith("\n") or not base else base + "\n"
        self.ips: set[str] = set()
        self.written = False

    @classmethod
    def for_host(cls, path: Path, host_file: Path = Path("/etc/hosts")) -> HostsFile:
        try:
            base = host_file.read_text()
        except OSError:
            base = "127.0.0.1 localhost\n::1 localhost\n"
        return cls(path, base)

    def ensure(self, ips: Iterable[str]) -> bool:
        """Make the file name these addresses; True when it was (re)written."""
        wanted = set(ips)
        if self.written and wanted <= self.ips:
            return False
        self.ips = wanted if len(self.ips | wanted) > MAX_ENTRIES else self.ips | wanted
        body = self.base + "# pleaco: proxy upstreams\n" + "".join(
            f"{ip} {target_name(ip)}\n" for ip in sorted(self.ips))
        with open(self.path, "w") as f:  # in place: see the module doc
            f.write(body)
        self.written = True
        return True
