"""Node identity: an Ed25519 key pair made at first start, and the node id derived from it.

The private key lives in ``DATA_DIR/node.key`` (PEM, mode 0600). The node id is the first
16 bytes of SHA-256 of the raw public key, in hex, so anyone holding the public key can
check that a claimed id belongs to it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

KEY_FILE = "node.key"


def node_id_for(public_key: bytes) -> str:
    """The node id for a raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_key).digest()[:16].hex()


def verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """This node's key pair and id."""

    private_key: Ed25519PrivateKey
    public_key: bytes
    node_id: str

    @classmethod
    def generate(cls) -> Identity:
        key = Ed25519PrivateKey.generate()
        return cls._from_private(key)

    @classmethod
    def _from_private(cls, key: Ed25519PrivateKey) -> Identity:
        pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(private_key=key, public_key=pub, node_id=node_id_for(pub))

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Identity:
        """Load the node key from ``data_dir``, creating it (0600, written atomically) if absent."""
        path = data_dir / KEY_FILE
        if path.exists():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            return cls._from_private(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_secret_file(path, pem)
        return cls._from_private(key)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def write_secret_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, durably and atomically.

    The temporary file is created 0600 from the start, so the secret is never readable by
    others, and it is fsynced and renamed so a crash leaves either no file or a whole one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
