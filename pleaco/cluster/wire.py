"""The envelope every packet and stream frame travels in: signed, encrypted, replay-checked.

    magic "PLC1" | cluster tag (8) | nonce (12) | ChaCha20-Poly1305 ciphertext
    plaintext = sender node id (16) | seq (8, big-endian) | payload | Ed25519 signature (64)

The AEAD key is derived (HKDF-SHA256) from the cluster secret, so the LAN learns nothing
and a packet from another cluster or a wrong key fails authentication. The signature, by
the sender's node key over header, sender, seq and payload, proves which admitted node sent
it: holding the cluster secret alone is not enough. ``seq`` is a nanosecond clock reading,
unique per sender; a packet outside the replay window or seen before is dropped.

``open`` never raises anything but ``Drop``, whose ``reason`` is counted in /metrics.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pleaco.errors import InvalidInput
from pleaco.identity import Identity, verify

MAGIC = b"PLC1"
TAG_LEN = 8
NONCE_LEN = 12
HEADER_LEN = len(MAGIC) + TAG_LEN + NONCE_LEN
SIG_LEN = 64
AEAD_OVERHEAD = 16
PLAIN_OVERHEAD = 16 + 8 + SIG_LEN
OVERHEAD = HEADER_LEN + AEAD_OVERHEAD + PLAIN_OVERHEAD

DROP_REASONS = (
    "too_short", "too_large", "bad_magic", "wrong_cluster", "decrypt_failed",
    "unknown_sender", "bad_signature", "replayed", "own_packet", "malformed",
)


class Drop(InvalidInput, code="dropped"):
    """A packet that is dropped, and why (one of DROP_REASONS)."""

    def __init__(self, reason: str, detail: str = "", sender: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.sender = sender  # for "unknown_sender": the node id the packet names (unproven)


def derive_key(secret: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pleaco " + purpose).derive(secret)


def cluster_tag(cluster_id: str) -> bytes:
    return hashlib.sha256(cluster_id.encode()).digest()[:TAG_LEN]


@dataclass(frozen=True)
class Opened:
    sender: str
    seq: int
    payload: bytes


class ReplayGuard:
    """Remembers the seqs seen per sender within the window (bounded by the window)."""

    def __init__(self, window_s: float) -> None:
        self.window_ns = int(window_s * 1e9)
        self._seen: dict[str, dict[int, None]] = {}
        self._lock = threading.Lock()

    def check(self, sender: str, seq: int, now_ns: int) -> None:
        if abs(now_ns - seq) > self.window_ns:
            raise Drop("replayed", "outside the replay window")
        with self._lock:
            seen = self._seen.setdefault(sender, {})
            if seq in seen:
                raise Drop("replayed", "seen before")
            seen[seq] = None
            # dicts keep insertion order and seqs arrive roughly in order: prune the front.
            horizon = now_ns - self.window_ns
            while seen:
                first = next(iter(seen))
                if first >= horizon:
                    break
                del seen[first]


class Codec:
    """Seals and opens envelopes for one node of one cluster."""

    def __init__(
        self,
        identity: Identity,
        cluster_id: str,
        secret: bytes,
        key_of: Callable[[str], bytes | None],
        replay_window: float = 60.0,
        max_size: int = 1400,
        purpose: bytes = b"gossip v1",
    ) -> None:
        self.identity = identity
        self.tag = cluster_tag(cluster_id)
        self._aead = ChaCha20Poly1305(derive_key(secret, purpose))
        self._key_of = key_of
        self._replay = ReplayGuard(replay_window)
        self.max_size = max_size
        self._last_seq = 0
        self._lock = threading.Lock()
        self._node_raw = bytes.fromhex(identity.node_id)

    def _next_seq(self) -> int:
        with self._lock:
            self._last_seq = max(self._last_seq + 1, time.time_ns())
            return self._last_seq

    def seal(self, payload: bytes) -> bytes:
        header = MAGIC + self.tag
        body = self._node_raw + struct.pack(">Q", self._next_seq()) + payload
        plain = body + self.identity.sign(header + body)
        nonce = os.urandom(NONCE_LEN)
        sealed = header + nonce + self._aead.encrypt(nonce, plain, header)
        if len(sealed) > self.max_size:
            raise ValueError(f"packet of {len(sealed)} bytes exceeds {self.max_size}")
        return sealed

    def open(self, data: bytes, now_ns: int | None = None) -> Opened:
        if len(data) < OVERHEAD:
            raise Drop("too_short")
        if len(data) > self.max_size:
            raise Drop("too_large")
        header = data[: len(MAGIC) + TAG_LEN]
        if header[: len(MAGIC)] != MAGIC:
            raise Drop("bad_magic")
        if header[len(MAGIC):] != self.tag:
            raise Drop("wrong_cluster")
        nonce = data[len(header): HEADER_LEN]
        try:
            plain = self._aead.decrypt(nonce, data[HEADER_LEN:], header)
        except InvalidTag:
            raise Drop("decrypt_failed") from None
        body, sig = plain[:-SIG_LEN], plain[-SIG_LEN:]
        sender = body[:16].hex()
        if sender == self.identity.node_id:
            raise Drop("own_packet")
        pub = self._key_of(sender)
        if pub is None:
            raise Drop("unknown_sender", sender, sender=sender)
        if not verify(pub, sig, header + body):
            raise Drop("bad_signature", sender)
        (seq,) = struct.unpack(">Q", body[16:24])
        self._replay.check(sender, seq, time.time_ns() if now_ns is None else now_ns)
        return Opened(sender, seq, body[24:])
