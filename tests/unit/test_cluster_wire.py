"""The envelope: seal/open round trip, every drop reason, replay window, and open() never raising but Drop."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given, settings
from hypothesis import strategies as st

from pleaco.cluster import wire
from pleaco.cluster.wire import (
    DROP_REASONS,
    HEADER_LEN,
    MAGIC,
    NONCE_LEN,
    OVERHEAD,
    SIG_LEN,
    TAG_LEN,
    Codec,
    Drop,
    Opened,
    ReplayGuard,
    cluster_tag,
    derive_key,
)
from pleaco.identity import Identity

ALICE = Identity.generate()
BOB = Identity.generate()
MALLORY = Identity.generate()
CLUSTER = "c0ffee" * 5
SECRET = bytes(range(32))
KEYS = {ALICE.node_id: ALICE.public_key, BOB.node_id: BOB.public_key}


def codec(identity: Identity = BOB, cluster: str = CLUSTER, secret: bytes = SECRET,
          key_of: Callable[[str], bytes | None] = KEYS.get, **kw: object) -> Codec:
    return Codec(identity, cluster, secret, key_of, **kw)  # type: ignore[arg-type]


def reason(fn: Callable[[], object]) -> str:
    with pytest.raises(Drop) as info:
        fn()
    assert info.value.reason in DROP_REASONS
    return info.value.reason


def test_round_trip() -> None:
    a, b = codec(ALICE), codec(BOB)
    for payload in (b"", b"hello", os.urandom(1000), b'{"t":"ack"}'):
        sealed = a.seal(payload)
        assert sealed.startswith(MAGIC + cluster_tag(CLUSTER))
        assert len(sealed) == OVERHEAD + len(payload)
        opened = b.open(sealed)
        assert opened == Opened(ALICE.node_id, opened.seq, payload)
    # Both directions.
    assert a.open(b.seal(b"back")).sender == BOB.node_id


def test_ciphertext_hides_the_payload_and_nonces_differ() -> None:
    a = codec(ALICE)
    one, two = a.seal(b"secret payload!!"), a.seal(b"secret payload!!")
    assert b"secret payload" not in one
    assert one[HEADER_LEN - NONCE_LEN:HEADER_LEN] != two[HEADER_LEN - NONCE_LEN:HEADER_LEN]


def test_seqs_strictly_increase_per_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = codec(ALICE), codec(BOB, replay_window=1e9)
    seqs = [b.open(a.seal(b"x")).seq for _ in range(50)]
    assert seqs == sorted(set(seqs))
    # Even with a clock that stands still or goes back, a codec never repeats a seq.
    clock = iter([10**18, 10**18, 10**18, 5, 5, 10**18 - 1])
    monkeypatch.setattr(wire, "time", SimpleNamespace(time_ns=lambda: next(clock)))
    c = codec(ALICE)
    seals = [c.seal(b"y") for _ in range(6)]
    seqs = [b.open(s, now_ns=10**18).seq for s in seals]
    assert seqs == [10**18 + i for i in range(6)]


def test_seal_refuses_oversized_payloads() -> None:
    a = codec(ALICE, max_size=600)
    fits = a.seal(b"x" * (600 - OVERHEAD))
    assert len(fits) == 600
    assert codec(BOB, max_size=600).open(fits).payload == b"x" * (600 - OVERHEAD)
    with pytest.raises(ValueError, match="exceeds 600"):
        a.seal(b"x" * (600 - OVERHEAD + 1))


# -- every drop reason ------------------------------------------------------------------------


def resealed(sealed: bytes, change: Callable[[bytearray], None], secret: bytes = SECRET) -> bytes:
    """Decrypt a sealed packet with the cluster key, change its plaintext, encrypt it again."""
    aead = ChaCha20Poly1305(derive_key(secret, b"gossip v1"))
    header, nonce = sealed[: len(MAGIC) + TAG_LEN], sealed[len(MAGIC) + TAG_LEN: HEADER_LEN]
    plain = bytearray(aead.decrypt(nonce, sealed[HEADER_LEN:], header))
    change(plain)
    return header + nonce + aead.encrypt(nonce, bytes(plain), header)


def flip(i: int) -> Callable[[bytearray], None]:
    def apply(buf: bytearray) -> None:
        buf[i] ^= 0x01

    return apply


def case_too_short() -> str:
    sealed = codec(ALICE).seal(b"")
    assert reason(lambda: codec().open(b"")) == "too_short"
    return reason(lambda: codec().open(sealed[:-1]))


def case_too_large() -> str:
    sealed = codec(ALICE, max_size=4000).seal(b"x" * 2000)
    return reason(lambda: codec(max_size=1400).open(sealed))


def case_bad_magic() -> str:
    sealed = bytearray(codec(ALICE).seal(b"hi"))
    sealed[0] ^= 0x20
    return reason(lambda: codec().open(bytes(sealed)))


def case_wrong_cluster() -> str:
    return reason(lambda: codec(cluster="another").open(codec(ALICE).seal(b"hi")))


def case_decrypt_failed() -> str:
    sealed = codec(ALICE).seal(b"hi")
    tampered = bytearray(sealed)
    tampered[-1] ^= 0x80
    assert reason(lambda: codec().open(bytes(tampered))) == "decrypt_failed"
    # The nonce is authenticated too (it feeds the cipher).
    tampered = bytearray(sealed)
    tampered[HEADER_LEN - 1] ^= 0x01
    assert reason(lambda: codec().open(bytes(tampered))) == "decrypt_failed"
    # The same cluster id with another secret, or the same secret for another purpose.
    assert reason(lambda: codec(secret=b"\x00" * 32).open(sealed)) == "decrypt_failed"
    return reason(lambda: codec(purpose=b"stream v1").open(sealed))


def case_unknown_sender() -> str:
    stranger = codec(MALLORY)  # holds the cluster secret, but no node record admits its key
    return reason(lambda: codec().open(stranger.seal(b"hi")))


def case_bad_signature() -> str:
    sealed = codec(ALICE).seal(b"payload")
    assert codec().open(resealed(sealed, lambda p: None)).payload == b"payload"
    # A signature byte flipped: only the signature check can notice (the AEAD tag is fresh).
    assert reason(lambda: codec().open(resealed(sealed, flip(-SIG_LEN)))) == "bad_signature"
    assert reason(lambda: codec().open(resealed(sealed, flip(-1)))) == "bad_signature"
    # The payload or the seq changed by someone who holds the cluster secret but not Alice's key.
    assert reason(lambda: codec().open(resealed(sealed, flip(30)))) == "bad_signature"
    assert reason(lambda: codec().open(resealed(sealed, flip(16 + 7)))) == "bad_signature"

    # Mallory claims to be Alice: her signature does not verify with Alice's key.
    def claim_alice(plain: bytearray) -> None:
        plain[:16] = bytes.fromhex(ALICE.node_id)
        plain[-SIG_LEN:] = MALLORY.sign(MAGIC + cluster_tag(CLUSTER) + bytes(plain[:-SIG_LEN]))

    assert reason(lambda: codec().open(resealed(codec(MALLORY).seal(b"x"), claim_alice))) == "bad_signature"
    # A key registry that maps Alice's id to the wrong key.
    return reason(lambda: codec(key_of={ALICE.node_id: MALLORY.public_key}.get).open(sealed))


def case_replayed() -> str:
    sealed = codec(ALICE).seal(b"once")
    bob = codec()
    bob.open(sealed)
    return reason(lambda: bob.open(sealed))


def case_own_packet() -> str:
    a = codec(ALICE)
    return reason(lambda: a.open(a.seal(b"echo")))


DROP_CASES = {
    "too_short": case_too_short, "too_large": case_too_large, "bad_magic": case_bad_magic,
    "wrong_cluster": case_wrong_cluster, "decrypt_failed": case_decrypt_failed,
    "unknown_sender": case_unknown_sender, "bad_signature": case_bad_signature, "replayed": case_replayed,
    "own_packet": case_own_packet,
}


@pytest.mark.parametrize("expected", sorted(DROP_CASES))
def test_drop_reason(expected: str) -> None:
    assert DROP_CASES[expected]() == expected


def test_every_reason_open_can_give_is_covered() -> None:
    # "malformed" is counted by the transport for payloads that open but do not decode.
    assert set(DROP_CASES) == set(DROP_REASONS) - {"malformed"}


def test_drop_carries_reason_and_detail() -> None:
    drop = Drop("unknown_sender", "abc")
    assert drop.reason == "unknown_sender"
    assert str(drop) == "unknown_sender: abc"
    assert str(Drop("too_short")) == "too_short"


def test_a_failed_open_does_not_burn_the_seq() -> None:
    sealed = codec(ALICE).seal(b"hi")
    admitted: dict[str, bytes] = {}
    bob = codec(key_of=admitted.get)
    assert reason(lambda: bob.open(sealed)) == "unknown_sender"
    # Once Alice is admitted the same packet opens: the rejected attempt was not recorded as seen.
    admitted.update(KEYS)
    assert bob.open(sealed).payload == b"hi"


# -- the replay window ------------------------------------------------------------------------


def test_seq_outside_the_window_is_replayed() -> None:
    a = codec(ALICE)
    bob = codec(replay_window=60.0)
    window = 60 * 10**9
    early, late, edge_old, edge_new, fine = (a.seal(b"p") for _ in range(5))
    seq_of = [struct.unpack(">Q", resealed_plain(s)[16:24])[0] for s in (early, late, edge_old, edge_new, fine)]
    assert reason(lambda: bob.open(early, now_ns=seq_of[0] + window + 1)) == "replayed"  # too old
    assert reason(lambda: bob.open(late, now_ns=seq_of[1] - window - 1)) == "replayed"  # from the future
    assert bob.open(edge_old, now_ns=seq_of[2] + window).seq == seq_of[2]
    assert bob.open(edge_new, now_ns=seq_of[3] - window).seq == seq_of[3]
    assert bob.open(fine, now_ns=seq_of[4]).seq == seq_of[4]


def resealed_plain(sealed: bytes) -> bytes:
    aead = ChaCha20Poly1305(derive_key(SECRET, b"gossip v1"))
    return aead.decrypt(sealed[len(MAGIC) + TAG_LEN: HEADER_LEN], sealed[HEADER_LEN:], sealed[: len(MAGIC) + TAG_LEN])


def test_replay_guard() -> None:
    g = ReplayGuard(window_s=1.0)
    now = 10**12
    g.check("a", now, now)
    g.check("b", now, now)  # another sender's seqs are separate
    g.check("a", now + 1, now)
    with pytest.raises(Drop, match="seen before"):
        g.check("a", now, now + 5)
    with pytest.raises(Drop, match="outside the replay window"):
        g.check("a", now - 10**9 - 1, now)
    with pytest.raises(Drop, match="outside the replay window"):
        g.check("a", now + 10**9 + 1, now)
    # Far later, the old seqs have left the window: they are refused by the window, not remembered.
    later = now + 5 * 10**9
    g.check("a", later, later)
    with pytest.raises(Drop) as info:
        g.check("a", now, later)
    assert info.value.reason == "replayed"
    assert all(seq >= later - g.window_ns for seq in g._seen["a"])


def test_replay_guard_forgets_only_what_the_window_refuses() -> None:
    g = ReplayGuard(window_s=1.0)
    base = 10**12
    for i in range(100):
        g.check("a", base + i * 10**8, base + i * 10**8)  # ten a second, for ten seconds
    assert len(g._seen["a"]) <= 11
    for i in range(90, 100):  # the last second's seqs are still remembered
        with pytest.raises(Drop, match="seen before"):
            g.check("a", base + i * 10**8, base + 99 * 10**8)


# -- fuzzing: open() raises Drop and nothing else --------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, derandomize=True)
SEALED = codec(ALICE).seal(b'{"t":"gossip","u":[]}')


@FUZZ
@given(st.binary(max_size=1500))
def test_fuzz_random_bytes(data: bytes) -> None:
    with pytest.raises(Drop):
        codec().open(data)


@FUZZ
@given(st.binary(min_size=OVERHEAD - len(MAGIC) - TAG_LEN, max_size=400))
def test_fuzz_random_bytes_behind_a_valid_header(body: bytes) -> None:
    with pytest.raises(Drop) as info:
        codec().open(MAGIC + cluster_tag(CLUSTER) + body)
    assert info.value.reason == "decrypt_failed"


def test_every_single_bit_flip_is_dropped() -> None:
    bob = codec()
    # Sealed here, not at import: the whole suite may take longer than the replay window.
    sealed = codec(ALICE).seal(b'{"t":"gossip","u":[]}')
    for bit in range(len(sealed) * 8):
        data = bytearray(sealed)
        data[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(Drop) as info:
            bob.open(bytes(data))
        assert info.value.reason in ("bad_magic", "wrong_cluster", "decrypt_failed"), bit
    assert bob.open(sealed).payload == b'{"t":"gossip","u":[]}'


@FUZZ
@given(st.integers(0, len(SEALED) - 1), st.binary(max_size=40))
def test_fuzz_truncated_and_extended(cut: int, tail: bytes) -> None:
    with pytest.raises(Drop):
        codec().open(SEALED[:cut] + tail)


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 2**64 - 1))
def test_fuzz_any_plaintext_under_the_cluster_key(plain: bytes, now_ns: int) -> None:
    """Someone who holds the cluster secret but no admitted key can make packets decrypt: still only Drop."""
    aead = ChaCha20Poly1305(derive_key(SECRET, b"gossip v1"))
    header, nonce = MAGIC + cluster_tag(CLUSTER), os.urandom(NONCE_LEN)
    data = header + nonce + aead.encrypt(nonce, plain, header)
    try:
        codec().open(data, now_ns=now_ns)
    except Drop as drop:
        assert drop.reason in ("too_short", "too_large", "own_packet", "unknown_sender", "bad_signature")
    else:
        pytest.fail("a forged packet opened")
