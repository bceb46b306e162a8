"""Services listening on this host's own addresses, and a shell probe a container runs to
try them: what a Dockerfile's RUN step must not reach (build.network)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading

TOKEN = "host-service-answered"


class Listeners:
    """A TCP listener on each given address of this host; each answers TOKEN and records
    who connected."""

    def __init__(self, addresses: list[str]) -> None:
        self.socks: dict[str, socket.socket] = {}
        self.peers: list[str] = []
        self._lock = threading.Lock()
        for addr in addresses:
            s = socket.socket()
            s.bind((addr, 0))
            s.listen(16)
            self.socks[addr] = s
            threading.Thread(target=self._serve, args=(s,), daemon=True).start()

    def _serve(self, s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, peer = s.accept()
                with self._lock:
                    self.peers.append(peer[0])
                with contextlib.suppress(OSError):
                    conn.sendall(TOKEN.encode() + b"\n")
                conn.close()

    def targets(self) -> list[str]:
        return [f"{addr}:{s.getsockname()[1]}" for addr, s in self.socks.items()]

    def close(self) -> None:
        for s in self.socks.values():
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def host_addresses() -> list[str]:
    """Every IPv4 address of this host: loopback, the engine's bridges' gateways (docker0,
    the build network's), the node's own."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    return sorted({line.split()[3].split("/")[0] for line in out.splitlines()})


def probe_script(targets: list[str]) -> str:
    """A shell loop that tries each ADDR:PORT and says whether it was reached (busybox nc
    has no -z: it connects, prints what the listener sends, and exits 0 if connected)."""
    return ("for t in " + " ".join(targets) + "; do "
            "if nc -w2 ${t%:*} ${t#*:} </dev/null; then echo \"reached $t\"; else echo \"refused $t\"; fi; done")
