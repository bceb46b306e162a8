"""Cluster trust: the cluster's identity and secrets, join tokens, admission, revocation.

- ``DATA_DIR/cluster.json`` (0600) holds the cluster id and the cluster secret, from which
  the gossip encryption key is derived. It exists once the node founded (``cluster init``)
  or joined a cluster.
- The join secret is separate and replicated: a ``secret`` record (``cluster/join``)
  encrypted under a key derived from the cluster secret (``secrets_aead``, which also seals
  the apps' secrets, see ``pleaco.builds.secrets``). ``nodes rm`` rotates it, so a
  removed node's old token no longer admits anyone.
- A join token is ``pleaco1-`` + base64url(JSON ``{c: cluster id, j: join secret, s: seeds}``).
- Joining: the new node sends a member its public key, name and addresses with a fresh
  nonce and time, an HMAC under the join secret (it holds the token) and its Ed25519
  signature (it holds the key). The member checks both, writes the signed ``node`` record
  that admits the key, and answers with the cluster id and secret, encrypted under a key
  derived from the join secret and bound to the nonce.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pleaco.cluster.messages import ADDR
from pleaco.cluster.wire import derive_key
from pleaco.errors import InvalidInput
from pleaco.identity import Identity, node_id_for, verify, write_secret_file
from pleaco.store import Store

_HEX = re.compile(r"[0-9a-f]+", re.ASCII)
CLUSTER_FILE = "cluster.json"
TOKEN_PREFIX = "pleaco1-"
JOIN_SECRET_KEY = "cluster/join"
JOIN_CLOCK_SKEW = 300  # seconds a join request's time may differ from ours


class TrustError(InvalidInput, ValueError, code="untrusted"):
    """A token, join request or answer that does not check out; the text says why."""


def b64(data: bytes) -> str:
    """URL-safe base64 without padding: how tokens and sealed values carry bytes."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def unb64(text: object) -> bytes:
    """The bytes of ``b64``'s text; TrustError for anything else."""
    if not isinstance(text, str):
        raise TrustError("not base64 text")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TrustError("not base64") from None


@dataclass(frozen=True)
class ClusterState:
    cluster_id: str
    secret: bytes

    @classmethod
    def create(cls) -> ClusterState:
        return cls(secrets.token_hex(16), secrets.token_bytes(32))

    @classmethod
    def load(cls, data_dir: Path) -> ClusterState | None:
        path = data_dir / CLUSTER_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        return cls(raw["cluster_id"], base64.b64decode(raw["secret"]))

    def save(self, data_dir: Path) -> None:
        body = {"cluster_id": self.cluster_id, "secret": base64.b64encode(self.secret).decode()}
        write_secret_file(data_dir / CLUSTER_FILE, json.dumps(body).encode())


# -- the join secret, kept encrypted in the store ----------------------------------------------


def new_join_secret() -> bytes:
    return secrets.token_bytes(32)


def secrets_aead(state: ClusterState) -> ChaCha20Poly1305:
    """The cipher of ``secret`` records sealed with the cluster key (the join secret here,
    app secrets in ``pleaco.builds.secrets``); the record key is the associated data."""
    return ChaCha20Poly1305(derive_key(state.secret, b"secrets v1"))


def store_join_secret(store: Store, state: ClusterState, join_secret: bytes) -> None:
    nonce = os.urandom(12)
    sealed = secrets_aead(state).encrypt(nonce, join_secret, JOIN_SECRET_KEY.encode())
    store.put("secret", JOIN_SECRET_KEY, {"nonce": b64(nonce), "sealed": b64(sealed)})


def load_join_secret(store: Store, state: ClusterState) -> bytes | None:
    value = store.value("secret", JOIN_SECRET_KEY)
    if value is None:
        return None
    try:
        return secrets_aead(state).decrypt(unb64(value["nonce"]), unb64(value["sealed"]), JOIN_SECRET_KEY.encode())
    except (InvalidTag, KeyError, TypeError, ValueError, TrustError):
        return None


# -- tokens ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinToken:
    cluster_id: str
    join_secret: bytes
    seeds: tuple[str, ...]

    def encode(self) -> str:
        body = {"c": self.cluster_id, "j": b64(self.join_secret), "s": list(self.seeds)}
        return TOKEN_PREFIX + b64(json.dumps(body, separators=(",", ":")).encode())

    @classmethod
    def decode(cls, token: str) -> JoinToken:
        token = token.strip()
        if not token.startswith(TOKEN_PREFIX):
            raise TrustError(f"a join token starts with {TOKEN_PREFIX!r}")
        try:
            body = json.loads(unb64(token[len(TOKEN_PREFIX):]))
            cluster_id, join_secret, seeds = body["c"], unb64(body["j"]), body["s"]
        except (ValueError, KeyError, TypeError, RecursionError):
            raise TrustError("the join token is damaged (copy it again with `pleaco cluster token`)") from None
        if not isinstance(cluster_id, str) or len(join_secret) != 32 or not isinstance(seeds, list) or not all(
            isinstance(s, str) for s in seeds
        ):
            raise TrustError("the join token is damaged (copy it again with `pleaco cluster token`)")
        return cls(cluster_id, join_secret, tuple(seeds))


# -- the join handshake ------------------------------------------------------------------------


def _join_fields(req: dict[str, Any]) -> bytes:
    keys = ("cluster", "pub", "name", "addr", "api", "nonce", "ts")
    return json.dumps([req.get(k) for k in keys], separators=(",", ":")).encode()


def make_join_request(identity: Identity, token: JoinToken, name: str, addr: str, api: str) -> dict[str, Any]:
    req: dict[str, Any] = {"cluster": token.cluster_id, "pub": identity.public_key.hex(), "name": name,
                           "addr": addr, "api": api, "nonce": secrets.token_hex(16), "ts": int(time.time())}
    fields = _join_fields(req)
    req["mac"] = hmac.new(token.join_secret, b"join v1" + fields, hashlib.sha256).hexdigest()
    req["sig"] = identity.sign(b"join v1" + fields).hex()
    return req


@dataclass(frozen=True)
class JoinRequest:
    node_id: str
    public_key: bytes
    name: str
    addr: str
    api: str
    nonce: str


def check_join_request(raw: Any, cluster_id: str, join_secret: bytes, now: float | None = None) -> JoinRequest:
    """Validate a join request; raises TrustError naming what is wrong."""
    if not isinstance(raw, dict):
        raise TrustError("join request: expected an object")
    for key in ("cluster", "pub", "name", "addr", "api", "nonce", "mac", "sig"):
        if not isinstance(raw.get(key), str) or len(raw[key]) > 300:
            raise TrustError(f"join request: {key} missing or malformed")
    if not isinstance(raw.get("ts"), int) or isinstance(raw["ts"], bool) or not 0 <= raw["ts"] < 2**40:
        raise TrustError("join request: ts missing or malformed")
    if not (_HEX.fullmatch(raw["mac"]) and len(raw["mac"]) == 64 and _HEX.fullmatch(raw["sig"])
            and _HEX.fullmatch(raw["pub"]) and _HEX.fullmatch(raw["nonce"])):
        raise TrustError("join request: mac, sig, pub and nonce must be hex")
    if not (ADDR.match(raw["addr"]) and ADDR.match(raw["api"])):
        raise TrustError("join request: addr and api must be HOST:PORT")
    if raw["cluster"] != cluster_id:
        raise TrustError("join request for another cluster")
    now = time.time() if now is None else now
    if abs(now - raw["ts"]) > JOIN_CLOCK_SKEW:
        raise TrustError("join request too old (or clocks differ by more than 5 minutes)")
    fields = _join_fields(raw)
    expected = hmac.new(join_secret, b"join v1" + fields, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, raw["mac"]):
        raise TrustError("join request does not prove the current join token (a new token may be needed)")
    try:
        pub, sig = bytes.fromhex(raw["pub"]), bytes.fromhex(raw["sig"])
    except ValueError:
        raise TrustError("join request: pub or sig is not hex") from None
    if len(pub) != 32 or not verify(pub, sig, b"join v1" + fields):
        raise TrustError("join request: bad signature")
    return JoinRequest(node_id_for(pub), pub, raw["name"], raw["addr"], raw["api"], raw["nonce"])


def _answer_aead(join_secret: bytes) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(derive_key(join_secret, b"join answer v1"))


def seal_join_answer(join_secret: bytes, nonce: str, state: ClusterState, records: list[Any]) -> bytes:
    """``K`` + nonce + the cluster id and secret, and the members' ``node`` records (so the
    new node can check the members' signatures from its first exchange), sealed and bound
    to the request's nonce."""
    body = json.dumps({"cluster_id": state.cluster_id, "secret": b64(state.secret), "records": records}).encode()
    n = os.urandom(12)
    return b"K" + n + _answer_aead(join_secret).encrypt(n, body, nonce.encode())


def refuse_join(reason: str) -> bytes:
    """``E`` + why the join was refused, for the joiner to show."""
    return b"E" + reason.encode()[:500]


def open_join_answer(join_secret: bytes, nonce: str, data: bytes) -> tuple[ClusterState, list[Any]]:
    if data[:1] == b"E":
        raise TrustError(f"refused: {data[1:].decode(errors='replace')}")
    if data[:1] != b"K" or len(data) < 1 + 12 + 16:
        raise TrustError("malformed join answer")
    try:
        body = _answer_aead(join_secret).decrypt(data[1:13], data[13:], nonce.encode())
        obj = json.loads(body)
        records = obj.get("records", [])
        if not isinstance(records, list):
            raise TypeError
        return ClusterState(str(obj["cluster_id"]), unb64(obj["secret"])), records
    except InvalidTag:
        raise TrustError("join answer does not decrypt (wrong token?)") from None
    except (ValueError, KeyError, TypeError):
        raise TrustError("malformed join answer") from None
