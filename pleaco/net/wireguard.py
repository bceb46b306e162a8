"""WireGuard between nodes: the node's key pair, its signed announcement, and one interface
whose peers are made to match a list.

The key pair is made at first start and kept in ``DATA_DIR/wireguard.key`` (0600, the
base64 form ``wg`` reads). The public key and port travel in the node's ``node`` record
(``wg_key``, ``wg_port``), signed with the node's Ed25519 identity (``wg_sig``): a member
takes a peer's WireGuard key only when that signature checks against the record's public
key, which must be the one the node id is derived from, so nobody can slip their own key in for someone else's
node id (and receive its traffic).

The interface is kernel WireGuard where the kernel has it, else ``wireguard-go`` (a
userspace daemon with a TUN device; its control socket is /var/run/wireguard/IFACE.sock,
shared by every network namespace of the machine). Either way ``wg`` configures it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from pleaco import logs
from pleaco.identity import Identity, node_id_for, verify, write_secret_file

log = logs.get("pleaco.net")

KEY_FILE = "wireguard.key"
# The node record's fields (pleaco/agent.py writes them, the network loop reads them).
FIELD_KEY = "wg_key"
FIELD_PORT = "wg_port"
FIELD_SIG = "wg_sig"
_SIGNED = b"pleaco wireguard key v1\n"
# WireGuard's recommended keepalive (wg(8)): keeps NAT and stateful firewall mappings open
# between nodes that only answer each other.
KEEPALIVE = 25
# How long wireguard-go may take to make its interface (it is up in milliseconds).
START_TIMEOUT = 10.0


class WireGuardError(RuntimeError):
    """The interface cannot be made or configured (no wireguard-go, no /dev/net/tun...)."""


@dataclass(frozen=True)
class KeyPair:
    private: str  # base64, as wg(8) reads it
    public: str


def _public_of(private: X25519PrivateKey) -> str:
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_or_create_key(data_dir: Path) -> KeyPair:
    """This node's WireGuard key pair, made once and kept in ``data_dir``."""
    path = data_dir / KEY_FILE
    if path.exists():
        text = path.read_text().strip()
        try:
            raw = base64.b64decode(text, validate=True)
            key = X25519PrivateKey.from_private_bytes(raw)
        except (binascii.Error, ValueError) as exc:
            raise WireGuardError(f"{path} does not hold a WireGuard private key ({exc})") from exc
        return KeyPair(text, _public_of(key))
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                            serialization.NoEncryption())
    text = base64.b64encode(raw).decode()
    write_secret_file(path, (text + "\n").encode())
    return KeyPair(text, _public_of(key))


def _message(node_id: str, key: str, port: int) -> bytes:
    return _SIGNED + f"{node_id}\n{key}\n{port}".encode()


def record_fields(identity: Identity, public_key: str, port: int) -> dict[str, str]:
    """The fields of this node's ``node`` record that announce its WireGuard key and port,
    signed with its identity."""
    sig = identity.sign(_message(identity.node_id, public_key, port))
    return {FIELD_KEY: public_key, FIELD_PORT: str(port), FIELD_SIG: base64.b64encode(sig).decode()}


def verified_key(node_id: str, record: Mapping[str, object]) -> tuple[str, int]:
    """The (WireGuard key, port) in ``node_id``'s ``node`` record when signed by the
    Ed25519 key of that record, which must be the node id's own (the id is a hash of
    it); ("", 0) when missing, malformed or forged."""
    key, port_text, sig_text, node_key = (record.get(f) for f in (FIELD_KEY, FIELD_PORT, FIELD_SIG, "public_key"))
    if not (isinstance(key, str) and isinstance(sig_text, str) and isinstance(node_key, str)
            and isinstance(port_text, str | int) and not isinstance(port_text, bool)):
        return "", 0
    try:
        raw = base64.b64decode(key, validate=True)
        sig = base64.b64decode(sig_text, validate=True)
        public = bytes.fromhex(node_key)
        port = int(port_text)
    except ValueError:  # binascii.Error is one
        return "", 0
    if len(raw) != 32 or not 1 <= port <= 65535:
        return "", 0
    if node_id_for(public) != node_id or not verify(public, sig, _message(node_id, key, port)):
        log.warning("mesh.wireguard_key_refused", member=node_id, error="bad signature")
        return "", 0
    return key, port


@dataclass(frozen=True)
class WgPeer:
    key: str
    endpoint: str  # host:port
    allowed: ipaddress.IPv4Network


class Interface:
    """One WireGuard interface in the calling process's network namespace."""

    def __init__(self, name: str, port: int, key_file: Path) -> None:
        self.name = name
        self.port = port
        self.key_file = key_file

    def exists(self) -> bool:
        with IPRoute() as ipr:
            return bool(ipr.link_lookup(ifname=self.name))

    def ensure(self) -> None:
        """Make the interface (kernel, else wireguard-go) and bring it up."""
        if not self.exists():
            self._create()
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.name)
            if not idx:
                raise WireGuardError(f"interface {self.name} vanished")
            ipr.link("set", index=idx[0], state="up")

    def _create(self) -> None:
        with IPRoute() as ipr:
            try:
                ipr.link("add", ifname=self.name, kind="wireguard")
                log.info("mesh.wireguard_created", iface=self.name, impl="kernel")
                return
            except NetlinkError as exc:
                if exc.code not in (95, 22, 19):  # EOPNOTSUPP, EINVAL, ENODEV: no kernel module
                    raise WireGuardError(f"cannot create {self.name}: {exc}") from exc
        if shutil.which("wireguard-go") is None:
            raise WireGuardError("the kernel has no WireGuard and wireguard-go is not installed "
                                 "(apt-get install wireguard-go wireguard-tools)")
        # It forks into the background (its child keeps the TUN device and control socket)
        # with its output on /dev/null, and exits when the interface is deleted.
        res = subprocess.run(["wireguard-go", self.name], capture_output=True, text=True, timeout=30, check=False)
        if res.returncode != 0:
            raise WireGuardError(f"wireguard-go {self.name} failed: {res.stderr.strip()[-500:]}")
        deadline = time.monotonic() + START_TIMEOUT
        while not self.exists():
            if time.monotonic() > deadline:
                raise WireGuardError(f"wireguard-go did not make {self.name} within {START_TIMEOUT} s")
            time.sleep(0.02)
        log.info("mesh.wireguard_created", iface=self.name, impl="wireguard-go")

    def peers(self) -> list[str]:
        res = _wg("show", self.name, "peers")
        return res.stdout.split()

    def sync(self, peers: Sequence[WgPeer]) -> None:
        """Set the key and port, and make the peers exactly ``peers`` (``wg syncconf``
        adds, changes and removes only what differs: live sessions stay up)."""
        private = self.key_file.read_text().strip()
        conf = [f"[Interface]\nPrivateKey = {private}\nListenPort = {self.port}\n"]
        conf += [f"[Peer]\nPublicKey = {p.key}\nEndpoint = {p.endpoint}\nAllowedIPs = {p.allowed}\n"
                 f"PersistentKeepalive = {KEEPALIVE}\n" for p in peers]
        before = set(self.peers())
        _wg("syncconf", self.name, "/dev/stdin", stdin="\n".join(conf))
        after = {p.key for p in peers}
        for key in after - before:
            log.info("mesh.wireguard_peer_added", iface=self.name, peer=key)
        for key in before - after:
            log.info("mesh.wireguard_peer_removed", iface=self.name, peer=key)

    def remove(self) -> None:
        with IPRoute() as ipr:
            idx = ipr.link_lookup(ifname=self.name)
            if idx:
                ipr.link("del", index=idx[0])
                log.info("mesh.wireguard_removed", iface=self.name)


def _wg(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    if shutil.which("wg") is None:
        raise WireGuardError("wg is not installed (apt-get install wireguard-tools)")
    res = subprocess.run(["wg", *args], input=stdin, capture_output=True, text=True, timeout=30, check=False)
    if res.returncode != 0:
        raise WireGuardError(f"wg {args[0]} {args[1]}: {res.stderr.strip()}")
    return res
