"""Cluster trust: join tokens, the join handshake, the join answer, cluster.json and the stored join secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from pleaco.cluster import trust
from pleaco.cluster.trust import (
    JOIN_CLOCK_SKEW,
    TOKEN_PREFIX,
    ClusterState,
    JoinToken,
    TrustError,
    check_join_request,
    load_join_secret,
    make_join_request,
    new_join_secret,
    open_join_answer,
    refuse_join,
    seal_join_answer,
    store_join_secret,
)
from pleaco.identity import Identity
from pleaco.store import Store

JOINER = Identity.generate()
OTHER = Identity.generate()
JOIN_SECRET = bytes(range(32))
TOKEN = JoinToken("ab" * 16, JOIN_SECRET, ("10.0.0.1:7401", "[fd00::1]:7401"))
DAMAGED = "the join token is damaged"


# -- tokens ------------------------------------------------------------------------------------


def test_token_round_trip() -> None:
    text = TOKEN.encode()
    assert text.startswith(TOKEN_PREFIX)
    assert "=" not in text and "+" not in text and "/" not in text  # URL-safe, unpadded: easy to paste
    assert JoinToken.decode(text) == TOKEN
    assert JoinToken.decode(f"  {text}\n") == TOKEN
    empty = JoinToken("c", new_join_secret(), ())
    assert JoinToken.decode(empty.encode()) == empty


def raw_token(body: Any) -> str:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return TOKEN_PREFIX + base64.urlsafe_b64encode(data).decode().rstrip("=")


def test_token_without_prefix() -> None:
    for text in ("", "pleaco2-abc", TOKEN.encode()[len(TOKEN_PREFIX):], "PLEACO1-" + TOKEN.encode()[8:]):
        with pytest.raises(TrustError, match="a join token starts with 'pleaco1-'"):
            JoinToken.decode(text)


GOOD_J = base64.urlsafe_b64encode(JOIN_SECRET).decode().rstrip("=")


@pytest.mark.parametrize("text", [
    TOKEN_PREFIX,
    TOKEN_PREFIX + "!!!!",
    TOKEN_PREFIX + "é",
    TOKEN_PREFIX + "a",
    TOKEN.encode()[:-5],
    raw_token(b"\xff\xfe not json"),
    raw_token([1, 2]),
    raw_token("string"),
    raw_token(7),
    raw_token(None),
    raw_token({"c": "x", "j": GOOD_J}),
    raw_token({"c": "x", "s": []}),
    raw_token({"j": GOOD_J, "s": []}),
    raw_token({"c": 1, "j": GOOD_J, "s": []}),
    raw_token({"c": None, "j": GOOD_J, "s": []}),
    raw_token({"c": "x", "j": 12, "s": []}),
    raw_token({"c": "x", "j": ["a"], "s": []}),
    raw_token({"c": "x", "j": "é", "s": []}),
    raw_token({"c": "x", "j": GOOD_J[:-4], "s": []}),
    raw_token({"c": "x", "j": base64.urlsafe_b64encode(bytes(33)).decode(), "s": []}),
    raw_token({"c": "x", "j": "", "s": []}),
    raw_token({"c": "x", "j": GOOD_J, "s": "10.0.0.1:7401"}),
    raw_token({"c": "x", "j": GOOD_J, "s": [1]}),
    raw_token({"c": "x", "j": GOOD_J, "s": None}),
])
def test_damaged_token(text: str) -> None:
    with pytest.raises(TrustError) as info:
        JoinToken.decode(text)
    assert DAMAGED in str(info.value)
    assert "pleaco cluster token" in str(info.value)  # tells the user how to get a good one


def test_deeply_nested_token_is_damaged() -> None:
    with pytest.raises(TrustError, match=DAMAGED):
        JoinToken.decode(raw_token(b"[" * 100_000))


# -- the join request --------------------------------------------------------------------------


def request(**changes: Any) -> dict[str, Any]:
    req = make_join_request(JOINER, TOKEN, "node-2", "10.0.0.2:7401", "10.0.0.2:7400")
    req.update(changes)
    return req


def check(req: Any, **kw: Any) -> trust.JoinRequest:
    kw.setdefault("cluster_id", TOKEN.cluster_id)
    kw.setdefault("join_secret", JOIN_SECRET)
    return check_join_request(req, **kw)


def remac(req: dict[str, Any], secret: bytes = JOIN_SECRET) -> dict[str, Any]:
    """Recompute the MAC, as a holder of the token (but not of the joiner's key) could."""
    req["mac"] = hmac.new(secret, b"join v1" + trust._join_fields(req), hashlib.sha256).hexdigest()
    return req


def test_a_valid_request_passes() -> None:
    req = request()
    assert set(req) == {"cluster", "pub", "name", "addr", "api", "nonce", "ts", "mac", "sig"}
    # It survives the trip through JSON, as it travels.
    got = check(json.loads(json.dumps(req)), now=req["ts"] + 1)
    assert got.node_id == JOINER.node_id
    assert got.public_key == JOINER.public_key
    assert (got.name, got.addr, got.api, got.nonce) == ("node-2", "10.0.0.2:7401", "10.0.0.2:7400", req["nonce"])
    assert check(request()).node_id == JOINER.node_id  # with the real clock


def test_nonces_are_fresh() -> None:
    assert request()["nonce"] != request()["nonce"]


@pytest.mark.parametrize(("field", "value"), [("name", "tampered"), ("addr", "10.0.0.9:7401"),
                                               ("api", "10.0.0.9:7400"), ("nonce", "ab" * 16)])
def test_tampered_text_field(field: str, value: str) -> None:
    with pytest.raises(TrustError, match="does not prove the current join token"):
        check(request(**{field: value}))


@pytest.mark.parametrize(("field", "value"), [("addr", "tampered"), ("api", "h:١٢"), ("nonce", "not hex")])
def test_malformed_text_field(field: str, value: str) -> None:
    with pytest.raises(TrustError, match="must be"):
        check(request(**{field: value}))


def test_tampered_pub_ts_mac() -> None:
    req = request()
    with pytest.raises(TrustError, match="does not prove"):
        check(request(pub=OTHER.public_key.hex()))
    with pytest.raises(TrustError, match="does not prove"):
        check({**req, "ts": req["ts"] - 1}, now=req["ts"])
    mac = req["mac"]
    with pytest.raises(TrustError, match="does not prove"):
        check({**req, "mac": mac[:-1] + ("0" if mac[-1] != "0" else "1")})
    with pytest.raises(TrustError, match="must be hex"):
        check({**req, "mac": ""})


def test_signature_is_checked_even_with_a_good_mac() -> None:
    req = request()
    sig = bytearray.fromhex(req["sig"])
    sig[0] ^= 1
    with pytest.raises(TrustError, match="bad signature"):
        check({**req, "sig": sig.hex()})
    with pytest.raises(TrustError, match="bad signature"):
        check({**req, "sig": req["sig"][:-2]})
    # A token holder swaps in another public key and recomputes the MAC: the signature betrays it.
    with pytest.raises(TrustError, match="bad signature"):
        check(remac(request(pub=OTHER.public_key.hex())))
    # ... or a key of the wrong length.
    with pytest.raises(TrustError, match="bad signature"):
        check(remac(request(pub=JOINER.public_key.hex() + "00")))
    with pytest.raises(TrustError, match="must be hex"):
        check({**req, "sig": "zz" * 64})
    with pytest.raises(TrustError, match="must be hex"):
        check(remac(request(pub="xyz")))


def test_request_for_another_cluster() -> None:
    with pytest.raises(TrustError, match="another cluster"):
        check(request(), cluster_id="cd" * 16)
    # Changing the cluster field to ours does not help: the MAC covers it.
    other = make_join_request(JOINER, JoinToken("cd" * 16, JOIN_SECRET, ()), "n", "h:1", "h:2")
    with pytest.raises(TrustError, match="does not prove"):
        check({**other, "cluster": TOKEN.cluster_id})


def test_clock_skew() -> None:
    req = request()
    ts = req["ts"]
    assert check(req, now=ts + JOIN_CLOCK_SKEW).node_id == JOINER.node_id
    assert check(req, now=ts - JOIN_CLOCK_SKEW).node_id == JOINER.node_id
    with pytest.raises(TrustError, match="too old"):
        check(req, now=ts + 301)
    with pytest.raises(TrustError, match="too old"):
        check(req, now=ts - 301)


def test_wrong_join_secret() -> None:
    with pytest.raises(TrustError, match="a new token may be needed"):
        check(request(), join_secret=new_join_secret())


@pytest.mark.parametrize(("changes", "what"), [
    ({"pub": None}, "pub"), ({"name": 1}, "name"), ({"addr": ["h:1"]}, "addr"), ({"api": None}, "api"),
    ({"nonce": 5}, "nonce"), ({"mac": None}, "mac"), ({"sig": 3}, "sig"),
    ({"cluster": None}, "cluster"), ({"name": "n" * 301}, "name"),
    ({"ts": "1700000000"}, "ts"), ({"ts": 1.7e9}, "ts"), ({"ts": None}, "ts"),
])
def test_malformed_request_fields(changes: dict[str, Any], what: str) -> None:
    with pytest.raises(TrustError, match=f"join request: {what} missing or malformed"):
        check(request(**changes))


@pytest.mark.parametrize("field", ["cluster", "pub", "name", "addr", "api", "nonce", "ts", "mac", "sig"])
def test_missing_request_field(field: str) -> None:
    req = request()
    del req[field]
    with pytest.raises(TrustError, match=f"{field} missing or malformed"):
        check(req)


@pytest.mark.parametrize("raw", [None, [], "req", 1, b"{}"])
def test_request_must_be_an_object(raw: Any) -> None:
    with pytest.raises(TrustError, match="expected an object"):
        check(raw)


def test_non_ascii_mac_is_a_trust_error() -> None:
    with pytest.raises(TrustError):
        check(request(mac="é" * 64))


def test_huge_ts_is_a_trust_error() -> None:
    with pytest.raises(TrustError):
        check(json.loads(json.dumps(request(ts=10**400))))


# -- the join answer ---------------------------------------------------------------------------

STATE = ClusterState("ab" * 16, bytes(range(100, 132)))


def test_join_answer_round_trip() -> None:
    records = [{"k": "node", "y": "x", "v": {"public_key": "aa"}}, {"k": "node", "y": "y", "v": None}]
    sealed = seal_join_answer(JOIN_SECRET, "nonce-1", STATE, records)
    assert sealed[:1] == b"K"
    assert STATE.secret not in sealed and b"public_key" not in sealed
    state, got = open_join_answer(JOIN_SECRET, "nonce-1", sealed)
    assert state == STATE
    assert got == records
    assert open_join_answer(JOIN_SECRET, "n", seal_join_answer(JOIN_SECRET, "n", STATE, [])) == (STATE, [])


def test_join_answer_is_bound_to_the_nonce_and_the_secret() -> None:
    sealed = seal_join_answer(JOIN_SECRET, "nonce-1", STATE, [])
    with pytest.raises(TrustError, match="does not decrypt"):
        open_join_answer(JOIN_SECRET, "nonce-2", sealed)
    with pytest.raises(TrustError, match="does not decrypt"):
        open_join_answer(new_join_secret(), "nonce-1", sealed)
    damaged = bytearray(sealed)
    damaged[-1] ^= 1
    with pytest.raises(TrustError, match="does not decrypt"):
        open_join_answer(JOIN_SECRET, "nonce-1", bytes(damaged))


def test_refusal_text_is_shown() -> None:
    with pytest.raises(TrustError, match=r"^refused: node 1234 was removed from the cluster$"):
        open_join_answer(JOIN_SECRET, "n", refuse_join("node 1234 was removed from the cluster"))
    with pytest.raises(TrustError, match="refused: why"):
        open_join_answer(JOIN_SECRET, "n", refuse_join("why"))
    assert len(refuse_join("x" * 2000)) == 501
    assert refuse_join("ünïcode").decode() == "Eünïcode"


@pytest.mark.parametrize("data", [b"", b"K", b"K" + bytes(27), b"X" + bytes(64), b"\x00"])
def test_malformed_join_answer(data: bytes) -> None:
    with pytest.raises(TrustError, match="malformed join answer"):
        open_join_answer(JOIN_SECRET, "n", data)


def test_well_sealed_but_malformed_body() -> None:
    aead = trust._answer_aead(JOIN_SECRET)
    for body in (b'{"cluster_id":"c"}', b'{"cluster_id":"c","secret":"AA","records":{}}', b"not json",
                 b'{"cluster_id":"c","secret":5}'):
        data = b"K" + bytes(12) + aead.encrypt(bytes(12), body, b"n")
        with pytest.raises(TrustError, match="malformed join answer"):
            open_join_answer(JOIN_SECRET, "n", data)


# -- cluster.json and the stored join secret ---------------------------------------------------


def test_cluster_state_save_load(tmp_path: Path) -> None:
    assert ClusterState.load(tmp_path) is None
    state = ClusterState.create()
    assert len(state.secret) == 32 and len(state.cluster_id) == 32
    assert ClusterState.create() != state
    state.save(tmp_path)
    path = tmp_path / trust.CLUSTER_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ClusterState.load(tmp_path) == state
    # Saving again replaces it, still 0600.
    other = ClusterState.create()
    other.save(tmp_path)
    assert ClusterState.load(tmp_path) == other
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_join_secret_in_the_store(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", Identity.generate())
    try:
        state = ClusterState.create()
        assert load_join_secret(store, state) is None
        secret = new_join_secret()
        store_join_secret(store, state, secret)
        assert load_join_secret(store, state) == secret
        # The record holds it encrypted.
        value = store.value("secret", trust.JOIN_SECRET_KEY)
        assert value is not None and set(value) == {"nonce", "sealed"}
        assert secret.hex() not in json.dumps(value)
        assert base64.urlsafe_b64encode(secret).decode().rstrip("=") not in json.dumps(value)
        # Another cluster's key cannot read it.
        assert load_join_secret(store, ClusterState(state.cluster_id, new_join_secret())) is None
        assert load_join_secret(store, ClusterState.create()) is None
        # Rotation replaces it.
        rotated = new_join_secret()
        store_join_secret(store, state, rotated)
        assert load_join_secret(store, state) == rotated
        # A damaged record reads as no secret, not as an error.
        store.put("secret", trust.JOIN_SECRET_KEY, {"nonce": "!!", "sealed": "x"})
        assert load_join_secret(store, state) is None
        store.put("secret", trust.JOIN_SECRET_KEY, {"other": 1})
        assert load_join_secret(store, state) is None
    finally:
        store.close()


def test_join_secret_replicates_to_another_member(tmp_path: Path) -> None:
    a, b = Identity.generate(), Identity.generate()
    sa, sb = Store(tmp_path / "a.db", a), Store(tmp_path / "b.db", b)
    try:
        state = ClusterState.create()
        secret = new_join_secret()
        store_join_secret(sa, state, secret)
        assert sb.apply(sa.put("node", a.node_id, {"public_key": a.public_key.hex()}))
        assert sb.apply(sa.get("secret", trust.JOIN_SECRET_KEY))  # type: ignore[arg-type]
        assert load_join_secret(sb, state) == secret
    finally:
        sa.close()
        sb.close()


def test_join_secret_record_with_a_short_nonce_reads_as_none(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db", Identity.generate())
    try:
        state = ClusterState.create()
        store.put("secret", trust.JOIN_SECRET_KEY, {"nonce": "AAAA", "sealed": "A" * 64})
        assert load_join_secret(store, state) is None
    finally:
        store.close()
