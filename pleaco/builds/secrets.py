"""Secrets (webhook secrets, HTTPS repository tokens, SSH deploy keys): the one place they
are sealed and opened.

A secret is a ``secret`` record whose value says how it is sealed:

- ``cluster-v1`` ``{"scheme", "nonce", "sealed"}``: ChaCha20-Poly1305 under a key derived
  from the cluster secret (``DATA_DIR/cluster.json``, see ``trust.secrets_aead``, the key
  that also seals the join secret). Every member opens it; a copy of the store alone does not.
- ``local-v1``, same shape, under a node-local key (``DATA_DIR/secrets.key``, 32 random
  bytes, 0600), for a node that is in no cluster yet and so has no cluster secret. When
  the node founds or joins a cluster, ``reseal`` rewrites these as ``cluster-v1``, so the
  other members can read them.
- ``plain`` ``{"scheme", "data"}``: what earlier versions wrote. Still read; the agent
  rewrites them sealed when it starts (``reseal``), and any write seals.

The record's key is the associated data: a sealed value copied under another key does not
open. A secret that does not open (another key, altered) raises ``SecretError`` naming it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from pleaco import logs
from pleaco.cluster.trust import ClusterState, b64, secrets_aead, unb64
from pleaco.cluster.wire import derive_key
from pleaco.errors import PleacoError
from pleaco.identity import write_secret_file
from pleaco.store import Store

log = logs.get("pleaco.secrets")

SCHEME_PLAIN = "plain"
SCHEME_LOCAL = "local-v1"
SCHEME_CLUSTER = "cluster-v1"
LOCAL_KEY_FILE = "secrets.key"

SecretWrite = tuple[str, str, dict[str, Any]]
# The fields of a record value that say how it is sealed; a record may hold others.
_SEALING_FIELDS = frozenset({"scheme", "nonce", "sealed", "data"})


class SecretError(PleacoError, RuntimeError, code="secret_failed"):
    """A secret that cannot be sealed or opened here; the message names it and says why."""


class SecretBox:
    """Seals and opens secrets with this node's keys: the cluster key once the node is in a
    cluster (``cluster_state`` returns its state, read at every call, so founding or
    joining takes effect at once), the node-local key before."""

    def __init__(self, data_dir: Path, cluster_state: Callable[[], ClusterState | None] = lambda: None) -> None:
        self.data_dir = data_dir
        self.local_key_path = data_dir / LOCAL_KEY_FILE
        self._cluster_state = cluster_state
        self._lock = threading.Lock()
        self._local: ChaCha20Poly1305 | None = None
        self._cluster: tuple[ClusterState, ChaCha20Poly1305] | None = None

    # -- keys ----------------------------------------------------------------------------

    def _cluster_aead(self) -> ChaCha20Poly1305 | None:
        state = self._cluster_state()
        if state is None:
            return None
        cached = self._cluster
        if cached is None or cached[0] is not state:
            cached = self._cluster = (state, secrets_aead(state))
        return cached[1]

    def _local_aead(self, create: bool) -> ChaCha20Poly1305 | None:
        """The node-local key; made (0600, written atomically) on first use when ``create``."""
        with self._lock:
            if self._local is None:
                path = self.local_key_path
                try:
                    raw = path.read_bytes()
                except FileNotFoundError:
                    if not create:
                        return None
                    raw = os.urandom(32)
                    try:
                        write_secret_file(path, raw)
                    except OSError as exc:
                        raise SecretError(f"cannot write the local secrets key {path}: {exc}") from None
                except OSError as exc:
                    raise SecretError(f"cannot read the local secrets key {path}: {exc}") from None
                if len(raw) != 32:
                    raise SecretError(f"{path} is damaged: expected 32 bytes, found {len(raw)}")
                self._local = ChaCha20Poly1305(derive_key(raw, b"local secrets v1"))
            return self._local

    # -- sealing -------------------------------------------------------------------------

    def seal(self, key: str, plaintext: str) -> dict[str, Any]:
        """The record value that keeps ``plaintext`` as secret ``key``."""
        try:
            data = plaintext.encode()
        except UnicodeEncodeError:
            raise SecretError(f"secret {key!r}: the text is not valid UTF-8") from None
        aead, scheme = self._cluster_aead(), SCHEME_CLUSTER
        if aead is None:
            aead, scheme = self._local_aead(create=True), SCHEME_LOCAL
        assert aead is not None
        nonce = os.urandom(12)
        return {"scheme": scheme, "nonce": b64(nonce), "sealed": b64(aead.encrypt(nonce, data, key.encode()))}

    def unseal(self, key: str, value: Any) -> str:
        """The plaintext of the record value of secret ``key``; SecretError when it does not open."""
        if not isinstance(value, dict):
            raise SecretError(f"secret {key!r} is malformed (not an object)")
        scheme = value.get("scheme")
        if scheme == SCHEME_PLAIN:
            if isinstance(value.get("data"), str):
                return str(value["data"])
            raise SecretError(f"secret {key!r} is malformed (plain, without data)")
        if scheme == SCHEME_CLUSTER:
            aead = self._cluster_aead()
            if aead is None:
                raise SecretError(f"secret {key!r} is sealed with a cluster key and this node is in no cluster")
            why = ("does not open with this cluster's key: it was sealed under another cluster's key, "
                   "copied from another record, or altered")
        elif scheme == SCHEME_LOCAL:
            aead = self._local_aead(create=False)
            if aead is None:
                raise SecretError(f"secret {key!r} is sealed with a node-local key and this node has none "
                                  f"({self.local_key_path}): it was sealed on another node")
            why = ("does not open with this node's local key: it was sealed on another node before that node "
                   "joined the cluster, copied from another record, or altered")
        else:
            raise SecretError(f"secret {key!r} is sealed with unknown scheme {scheme!r}")
        try:
            return aead.decrypt(unb64(value.get("nonce")), unb64(value.get("sealed")), key.encode()).decode()
        except (InvalidTag, TypeError, ValueError):  # bad base64 (TrustError), bad UTF-8: ValueErrors
            raise SecretError(f"secret {key!r} {why}") from None

    # -- the store -----------------------------------------------------------------------

    def put_write(self, key: str, plaintext: str) -> SecretWrite:
        """The store write that keeps a secret (for ``Store.put_many`` with other writes)."""
        return ("secret", key, self.seal(key, plaintext))

    def get(self, store: Store, key: str) -> str | None:
        """The secret ``key``, None when there is none; SecretError when it does not open."""
        value = store.value("secret", key)
        return None if value is None else self.unseal(key, value)

    def reseal(self, store: Store) -> int:
        """Rewrite the secrets sealed less well than this node now can (``plain``, and
        ``local-v1`` once in a cluster) under its current key; returns how many.

        Call it where nothing else writes secrets meanwhile (the agent's event loop, before
        the API serves, or right after founding or joining). Secrets this node cannot open
        (another node's local key) are left as they are, with a warning."""
        target = SCHEME_LOCAL if self._cluster_state() is None else SCHEME_CLUSTER
        writes: list[tuple[str, str, dict[str, Any] | None]] = []
        for rec in store.records("secret"):
            scheme = (rec.value or {}).get("scheme")
            if scheme not in (SCHEME_PLAIN, SCHEME_LOCAL) or scheme == target:
                continue  # sealed already (or not this module's: the cluster's join secret)
            try:
                # Fields beside the sealed ones (an app secret's mount and stamp) are kept.
                extra = {k: v for k, v in (rec.value or {}).items() if k not in _SEALING_FIELDS}
                writes.append(("secret", rec.key, {**extra, **self.seal(rec.key, self.unseal(rec.key, rec.value))}))
            except SecretError as exc:
                log.warning("secret.not_resealed", key=rec.key, error=str(exc))
        if writes:
            store.put_many(writes)
            log.info("secret.resealed", count=len(writes), scheme=target)
        return len(writes)
