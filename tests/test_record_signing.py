"""Signed capability records: round trips through the real codec, and every forgery refused.

A record is what the router believes about a peer, so each way to lie with one
(another's name, a changed body, an old record, garbage) gets its own test, and
property tests flip bits anywhere in a signed record's frame.
"""

from __future__ import annotations

import enum
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.rsa import create_new_key_pair as create_rsa_key_pair
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair
from libp2p.peer.id import ID

from capabilities.signing import (
    DEFAULT_MAX_SKEW_MS,
    DOMAIN,
    ISSUED_KEY,
    MAX_DEPTH,
    BadSignature,
    MalformedRecord,
    RecordBook,
    RecordExpired,
    RecordFromFuture,
    RecordRejected,
    RecordReplayed,
    UnverifiablePeerId,
    VerifiedRecord,
    canonical,
    sign_record,
    signing_payload,
    verify_record,
)
from protocols import (
    CapabilityRecord,
    Decoder,
    ErrorCode,
    LocalProtocolError,
    ProtocolError,
    SwarmError,
    encode,
)

NOW = 1_700_000_000_000  # wall-clock ms
KEY_A = create_new_key_pair(b"a" * 32)
KEY_B = create_new_key_pair(b"b" * 32)
PEER_A = ID.from_pubkey(KEY_A.public_key).to_base58()
PEER_B = ID.from_pubkey(KEY_B.public_key).to_base58()
BODY: dict[str, Any] = {
    "schema": 1,
    "software": {"name": "swarm-node", "version": "0.1.0"},
    "addrs": [f"/ip4/10.0.0.1/tcp/4001/p2p/{PEER_A}"],
    "hardware": {"cpu": {"model": "Test CPU", "logical_cores": 8}, "ram": {"total": 2**34}},
    "models": [{"name": "all-MiniLM-L6-v2", "task": "embed", "shape": [-1, 384]}],
    "load": {"queue_depth": {"high": 0, "normal": 2}, "in_flight": 1, "ewma_latency_ms": None},
}


def wire(record: CapabilityRecord) -> CapabilityRecord:
    """The record as a peer receives it: encoded, framed, decoded."""
    decoder = Decoder()
    for frame in encode(record):
        decoder.feed(frame)
    received = decoder.next_message()
    assert isinstance(received, CapabilityRecord)
    return received


def signed(key: KeyPair = KEY_A, body: Any = None, *, seq: int = 1, ttl_s: int = 30) -> Any:
    body = BODY if body is None else body
    return sign_record(key, body, seq=seq, ttl_s=ttl_s, issued_ms=NOW)


def forge(key: KeyPair, peer_id: str, body: dict[str, Any], seq: int = 1) -> CapabilityRecord:
    """A record for ``peer_id`` whose signature ``key`` made (the right key or not)."""
    payload = signing_payload(peer_id, seq, 30, body)
    return CapabilityRecord(peer_id, seq, 30, body, key.private_key.sign(payload))


def nested(levels: int) -> Any:
    """A value ``levels`` lists deep, as a body's value (the body map is one level)."""
    value: Any = 1
    for _ in range(levels - 1):
        value = [value]
    return value


def verify(record: CapabilityRecord, now_ms: int = NOW) -> VerifiedRecord:
    return verify_record(record, now_ms=now_ms)


# ---------------------------------------------------------------------------
# round trips


def test_round_trip_through_the_wire() -> None:
    record = wire(signed(seq=7))
    verified = verify(record)
    assert verified.peer_id == PEER_A == record.peer_id
    assert (verified.seq, verified.ttl_s, verified.issued_ms) == (7, 30, NOW)
    assert verified.expires_ms == NOW + 30_000
    assert verified.body == BODY  # issued_ms lives in the record, not the caller's body
    assert record.body[ISSUED_KEY] == NOW
    assert len(record.signature) == 64


class Color(enum.IntEnum):
    RED = 1


EXOTIC: dict[str, Any] = {
    "z": 1,
    "a": {"y": [1, 2.5, -0.0, float("inf"), None, True], "b": b"\x00\xff", "x": {"n": -(2**63)}},
    "big": 2**64 - 1,
    "tuple": (1, ("nested", 2)),
    "enum": Color.RED,
    "float_int": [1, 1.0],
    "unicode": "naïve ☃",
    "empty": {"list": [], "map": {}, "bytes": b"", "str": ""},
}


def test_values_survive_and_re_encode_to_the_same_bytes() -> None:
    record = signed(body=EXOTIC)
    received = wire(record)
    assert signing_payload(PEER_A, 1, 30, received.body) == signing_payload(
        PEER_A, 1, 30, record.body
    )
    body = verify(received).body
    assert body["a"]["b"] == b"\x00\xff" and body["big"] == 2**64 - 1
    assert body["tuple"] == [1, ["nested", 2]] and body["enum"] == 1
    assert [type(v) for v in body["float_int"]] == [int, float]
    assert str(body["a"]["y"][2]) == "-0.0"


def test_key_order_does_not_matter() -> None:
    reordered = dict(reversed(list(BODY.items())))
    assert signing_payload(PEER_A, 1, 30, reordered) == signing_payload(PEER_A, 1, 30, BODY)
    assert list(canonical({"b": 1, "a": {"d": 2, "c": 3}})) == ["a", "b"]


@pytest.mark.parametrize(
    "body",
    [
        {"set": {1, 2}},
        {"obj": object()},
        {1: "int key"},
        {"nested": {b"bytes key": 1}},
        {"huge": 2**64},
        {"small": -(2**63) - 1},
        {ISSUED_KEY: 5},
        {"deep": nested(MAX_DEPTH + 1)},  # one level too deep
    ],
)
def test_unsignable_bodies_are_our_bug(body: dict[Any, Any]) -> None:
    with pytest.raises(LocalProtocolError):
        sign_record(KEY_A, body, seq=1, ttl_s=30, issued_ms=NOW)


@pytest.mark.parametrize("seq, ttl_s", [(-1, 30), (1, 0), (1, 24 * 3600 + 1)])
def test_unsignable_numbers(seq: int, ttl_s: int) -> None:
    with pytest.raises(LocalProtocolError):
        sign_record(KEY_A, BODY, seq=seq, ttl_s=ttl_s, issued_ms=NOW)


def test_depth_limit_is_exact() -> None:
    verify(wire(signed(body={"deep": nested(MAX_DEPTH)})))  # at the limit: fine


def test_signing_uses_the_wall_clock_by_default() -> None:
    record = sign_record(KEY_A, BODY, seq=1, ttl_s=30)
    assert verify_record(record).peer_id == PEER_A


# ---------------------------------------------------------------------------
# forgeries


def test_forged_signature() -> None:
    real = signed()
    other = signed(KEY_B)  # a valid signature, by someone else, over something else
    with pytest.raises(BadSignature):
        verify(wire(CapabilityRecord(PEER_A, 1, 30, real.body, other.signature)))


def test_body_tampered_after_signing() -> None:
    record = signed()
    body = dict(record.body) | {"models": [{"name": "gpt-5", "task": "chat"}]}
    with pytest.raises(BadSignature):
        verify(wire(CapabilityRecord(PEER_A, 1, 30, body, record.signature)))


@pytest.mark.parametrize("field", ["seq", "ttl_s", "issued_ms"])
def test_signed_numbers_tampered(field: str) -> None:
    record = signed(seq=5)
    if field == "issued_ms":
        record = CapabilityRecord(
            PEER_A, 5, 30, dict(record.body) | {ISSUED_KEY: NOW + 1}, record.signature
        )
    else:
        record = CapabilityRecord(**{**_fields(record), field: 6})
    with pytest.raises(BadSignature):
        verify(wire(record))


def _fields(record: CapabilityRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in ("peer_id", "seq", "ttl_s", "body", "signature")}


def test_key_a_claiming_peer_id_b() -> None:
    body = dict(signed().body)
    with pytest.raises(BadSignature, match=PEER_B):
        verify(wire(forge(KEY_A, PEER_B, body)))
    # A's genuine record relabelled as B's:
    record = signed()
    with pytest.raises(BadSignature):
        verify(wire(CapabilityRecord(**{**_fields(record), "peer_id": PEER_B})))
    verify(wire(forge(KEY_B, PEER_B, body)))  # the control: B's own key works


def test_a_signature_over_another_domain_is_useless() -> None:
    record = signed()
    assert DOMAIN == b"swarm/caps/v1"
    raw = KEY_A.private_key.sign(b"swarm/other/v1")  # valid Ed25519, wrong message
    with pytest.raises(BadSignature):
        verify(CapabilityRecord(**{**_fields(record), "signature": raw}))


@pytest.mark.parametrize(
    "signature", [b"", b"\x00" * 64, b"\xff" * 64, b"x" * 63, b"x" * 65, b"\x00" * 1000]
)
def test_garbage_signature_bytes(signature: bytes) -> None:
    record = CapabilityRecord(**{**_fields(signed()), "signature": signature})
    with pytest.raises(BadSignature) as caught:
        verify(wire(record))
    assert caught.value.code is ErrorCode.UNAUTHORIZED and caught.value.reason == "bad-signature"


def test_rsa_peer_id_cannot_be_verified() -> None:
    key = create_rsa_key_pair()
    peer_id = ID.from_pubkey(key.public_key).to_base58()
    assert peer_id.startswith("Qm")  # hashed: the key is not in the id
    with pytest.raises(UnverifiablePeerId, match="does not embed its key"):
        verify(wire(forge(key, peer_id, dict(signed().body))))


def test_only_ed25519_keys_sign() -> None:
    with pytest.raises(LocalProtocolError, match="Ed25519"):
        sign_record(create_secp256k1_key_pair(), BODY, seq=1, ttl_s=30)


def test_non_ed25519_key_is_refused() -> None:
    key = create_secp256k1_key_pair()
    peer_id = ID.from_pubkey(key.public_key).to_base58()
    with pytest.raises(UnverifiablePeerId, match="Secp256k1"):
        verify(wire(forge(key, peer_id, dict(signed().body))))


@pytest.mark.parametrize("peer_id", ["", "not base58 0OIl", PEER_A + " ", "12D3KooW", "QmXyz"])
def test_bad_peer_ids(peer_id: str) -> None:
    record = CapabilityRecord(**{**_fields(signed()), "peer_id": peer_id})
    with pytest.raises((MalformedRecord, UnverifiablePeerId)):
        verify(record)


def test_record_without_issue_time_is_malformed() -> None:
    body = {k: v for k, v in signed().body.items() if k != ISSUED_KEY}
    with pytest.raises(MalformedRecord, match=ISSUED_KEY):
        verify(wire(forge(KEY_A, PEER_A, body)))
    with pytest.raises(MalformedRecord):
        verify(wire(forge(KEY_A, PEER_A, body | {ISSUED_KEY: True})))


def test_ttl_out_of_range_is_malformed() -> None:
    record = CapabilityRecord(**{**_fields(signed()), "ttl_s": 0})
    with pytest.raises(MalformedRecord) as caught:
        verify(wire(record))
    assert caught.value.code is ErrorCode.MALFORMED


def test_body_a_peer_cannot_sign_is_malformed() -> None:
    record = CapabilityRecord(**{**_fields(signed()), "body": {"k": {b"bin key": 1}}})
    with pytest.raises(MalformedRecord):
        verify(wire(record))


# ---------------------------------------------------------------------------
# time


def test_expired() -> None:
    record = wire(signed(ttl_s=30))
    verify(record, NOW + 30_000 + DEFAULT_MAX_SKEW_MS)  # last valid ms, skew included
    with pytest.raises(RecordExpired):
        verify(record, NOW + 30_000 + DEFAULT_MAX_SKEW_MS + 1)
    with pytest.raises(RecordExpired):
        verify_record(record, now_ms=NOW + 30_001, max_skew_ms=0)


def test_from_the_future() -> None:
    record = wire(signed())
    verify(record, NOW - DEFAULT_MAX_SKEW_MS)
    with pytest.raises(RecordFromFuture):
        verify(record, NOW - DEFAULT_MAX_SKEW_MS - 1)


# ---------------------------------------------------------------------------
# replays


def test_replayed_older_seq() -> None:
    old, new = verify(wire(signed(seq=1))), verify(wire(signed(seq=2)))
    book = RecordBook().admit(old).admit(new)
    assert book.highest_seq(PEER_A) == 2
    with pytest.raises(RecordReplayed) as caught:
        book.admit(old)
    assert caught.value.code is ErrorCode.UNAUTHORIZED and caught.value.reason == "replayed"


def test_same_seq_other_body_is_a_replay_but_a_refetch_is_not() -> None:
    first = verify(wire(signed(seq=3)))
    book = RecordBook().admit(first)
    assert book.admit(verify(wire(signed(seq=3)))) is book  # the same record, fetched again
    other = verify(wire(signed(body=BODY | {"schema": 2}, seq=3)))
    with pytest.raises(RecordReplayed, match="reuses seq 3"):
        book.admit(other)


def test_books_are_per_peer_and_pure() -> None:
    a5, b1 = verify(wire(signed(seq=5))), verify(wire(signed(KEY_B, seq=1)))
    empty = RecordBook()
    book = empty.admit(a5).admit(b1)
    assert empty.highest_seq(PEER_A) is None  # admit returned a new book
    assert (book.highest_seq(PEER_A), book.highest_seq(PEER_B)) == (5, 1)


def test_prune_forgets_only_what_would_be_refused_as_expired() -> None:
    record = verify(wire(signed(seq=5, ttl_s=30)))
    book = RecordBook().admit(record)
    last_valid = record.expires_ms + DEFAULT_MAX_SKEW_MS
    assert book.prune(last_valid) is book
    assert book.prune(last_valid + 1).highest_seq(PEER_A) is None
    with pytest.raises(RecordExpired):  # so the forgotten record cannot come back
        verify(wire(signed(seq=5, ttl_s=30)), last_valid + 1)


def test_errors_share_one_root() -> None:
    for cls in (MalformedRecord, UnverifiablePeerId, BadSignature, RecordExpired, RecordReplayed):
        assert issubclass(cls, RecordRejected) and issubclass(cls, SwarmError)
    assert len({c.reason for c in RecordRejected.__subclasses__()}) == 6


# ---------------------------------------------------------------------------
# properties

PROPS = settings(max_examples=200, deadline=None)
SIGNED = signed(seq=9)
FRAME = b"".join(encode(SIGNED))


@PROPS
@given(bit=st.integers(0, 64 * 8 - 1))
def test_any_bit_flip_in_the_signature_is_refused(bit: int) -> None:
    signature = bytearray(SIGNED.signature)
    signature[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(BadSignature):
        verify(wire(CapabilityRecord(**{**_fields(SIGNED), "signature": bytes(signature)})))


@PROPS
@given(bit=st.integers(4 * 8, len(FRAME) * 8 - 1))  # any bit after the length prefix
def test_any_bit_flip_in_the_frame_is_refused_or_harmless(bit: int) -> None:
    frame = bytearray(FRAME)
    frame[bit // 8] ^= 1 << (bit % 8)
    decoder = Decoder()
    decoder.feed(frame)
    try:
        received = decoder.next_message()
    except ProtocolError:
        return  # the codec refused it
    if received is None:
        return  # a length changed inside: the decoder waits for bytes that never come
    assert isinstance(received, CapabilityRecord)
    try:
        verified = verify(received)
    except RecordRejected:
        return
    # Accepted: then it must be the very record that was signed.
    assert _fields(received) == _fields(SIGNED)
    assert verified.digest == verify(SIGNED).digest


leaves = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
bodies = st.dictionaries(
    st.text(max_size=10).filter(lambda k: k != ISSUED_KEY),
    st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=20,
    ),
    max_size=6,
)


@PROPS
@given(body=bodies, seq=st.integers(0, 2**62), ttl_s=st.integers(1, 24 * 3600))
def test_any_allowed_body_round_trips_and_verifies(
    body: dict[str, Any], seq: int, ttl_s: int
) -> None:
    record = sign_record(KEY_A, body, seq=seq, ttl_s=ttl_s, issued_ms=NOW)
    verified = verify(wire(record))
    assert verified.body == canonical(body) and verified.seq == seq


def test_every_single_bit_flip_of_the_frame_is_refused() -> None:
    """The exhaustive version of the property above (about 4000 flips, a quarter second)."""
    outcomes: dict[str, int] = {}
    for bit in range(4 * 8, len(FRAME) * 8):
        frame = bytearray(FRAME)
        frame[bit // 8] ^= 1 << (bit % 8)
        decoder = Decoder()
        decoder.feed(frame)
        try:
            received = decoder.next_message()
            assert isinstance(received, CapabilityRecord), "no flip leaves the decoder waiting"
            verify(received)
        except ProtocolError:
            outcomes["codec"] = outcomes.get("codec", 0) + 1
        except RecordRejected as exc:
            outcomes[exc.reason] = outcomes.get(exc.reason, 0) + 1
        else:
            raise AssertionError(f"flipping bit {bit} gave a record that verifies")
    assert sum(outcomes.values()) == (len(FRAME) - 4) * 8
    assert outcomes["bad-signature"] > outcomes["codec"] > 0
