"""Node identity: key file, node id derivation, signatures."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pleaco.identity import KEY_FILE, Identity, node_id_for, verify, write_secret_file


def test_load_or_create_makes_a_private_key_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data" / "nested"  # created on demand
    ident = Identity.load_or_create(data_dir)
    key_file = data_dir / KEY_FILE
    assert key_file.name == "node.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert [p.name for p in data_dir.iterdir()] == ["node.key"]  # no temporary file left behind
    assert len(ident.public_key) == 32


def test_reload_gives_the_same_identity(tmp_path: Path) -> None:
    first = Identity.load_or_create(tmp_path)
    content = (tmp_path / KEY_FILE).read_bytes()
    second = Identity.load_or_create(tmp_path)
    assert second.node_id == first.node_id
    assert second.public_key == first.public_key
    assert (tmp_path / KEY_FILE).read_bytes() == content  # not rewritten
    # The reloaded key signs for the same public key.
    assert verify(first.public_key, second.sign(b"m"), b"m")


def test_different_directories_get_different_identities(tmp_path: Path) -> None:
    a = Identity.load_or_create(tmp_path / "a")
    b = Identity.load_or_create(tmp_path / "b")
    assert a.node_id != b.node_id


def test_node_id_is_first_16_bytes_of_sha256_of_public_key() -> None:
    ident = Identity.generate()
    expected = hashlib.sha256(ident.public_key).hexdigest()[:32]
    assert ident.node_id == expected
    assert node_id_for(ident.public_key) == expected
    assert len(ident.node_id) == 32
    int(ident.node_id, 16)  # hex


def test_node_id_for_known_vector() -> None:
    pub = bytes(range(32))
    assert node_id_for(pub) == hashlib.sha256(pub).digest()[:16].hex()


def test_sign_and_verify() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert len(sig) == 64
    assert verify(ident.public_key, sig, b"hello")


def test_verify_rejects_a_wrong_key() -> None:
    ident, other = Identity.generate(), Identity.generate()
    sig = ident.sign(b"hello")
    assert not verify(other.public_key, sig, b"hello")


def test_verify_rejects_an_altered_message() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"hello")
    assert not verify(ident.public_key, sig, b"hellp")
    assert not verify(ident.public_key, sig, b"hello ")
    assert not verify(ident.public_key, sig, b"")


def test_verify_rejects_an_altered_signature() -> None:
    ident = Identity.generate()
    sig = bytearray(ident.sign(b"hello"))
    sig[10] ^= 0x80
    assert not verify(ident.public_key, bytes(sig), b"hello")


@pytest.mark.parametrize("public_key", [b"", b"\x00" * 31, b"\x01" * 33])
def test_verify_rejects_malformed_public_keys_without_raising(public_key: bytes) -> None:
    sig = Identity.generate().sign(b"m")
    assert verify(public_key, sig, b"m") is False


def test_load_refuses_a_non_ed25519_key(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (tmp_path / KEY_FILE).write_bytes(pem)
    with pytest.raises(ValueError, match="Ed25519"):
        Identity.load_or_create(tmp_path)


def test_write_secret_file_replaces_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "admin.token"
    path.write_text("old")
    path.chmod(0o644)
    write_secret_file(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.token"]
