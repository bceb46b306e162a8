"""Secrets (webhook secrets, later deploy keys and tokens): the one place they are sealed.

A secret is a ``secret`` record whose value says how it is sealed. Today the scheme is
``plain``: the value is readable by anyone who can read the store (root on a node, which
already holds the node key). The cluster issue brings a cluster key; then ``seal`` writes
``{"scheme": "cluster-v1", ...}`` encrypted with it, ``open`` reads both schemes, and
nothing outside this module changes.
"""

from __future__ import annotations

from typing import Any

from pleaco.store import Store

SCHEME_PLAIN = "plain"


class SecretError(RuntimeError):
    pass


def seal(plaintext: str) -> dict[str, Any]:
    return {"scheme": SCHEME_PLAIN, "data": plaintext}


def unseal(value: dict[str, Any]) -> str:
    if value.get("scheme") == SCHEME_PLAIN and isinstance(value.get("data"), str):
        return str(value["data"])
    raise SecretError(f"secret sealed with unknown scheme {value.get('scheme')!r}")


def put_write(key: str, plaintext: str) -> tuple[str, str, dict[str, Any]]:
    """The store write that keeps a secret (for ``Store.put_many`` with other writes)."""
    return ("secret", key, seal(plaintext))


def get(store: Store, key: str) -> str | None:
    value = store.value("secret", key)
    return None if value is None else unseal(value)
