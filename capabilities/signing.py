"""Signed capability records: a peer may only speak for itself, and only recently.

A record is routed on (which peer serves which model), so a peer must not be able
to publish one in another's name, change one in flight, or replay an old one. The
record is signed with the node's libp2p Ed25519 key, and the key is *inside* the
Ed25519 peer id (an identity multihash), so a verifier needs nothing but the record:
the claimed peer id gives the key that must have made the signature. Peer ids that
only hash their key (RSA) cannot be checked this way and are refused.

What is signed is ``msgpack([DOMAIN, peer_id, seq, ttl_s, body])`` in a canonical
form: every map's keys sorted, recursively, so a body decoded by a peer re-encodes
to the same bytes. A body may hold ``None``, bool, int (-2**63 .. 2**64-1), float
(always float64), str, bytes, lists (tuples become lists) and maps with str keys,
nested at most ``MAX_DEPTH`` deep. The body carries ``issued_ms`` (wall-clock ms,
put there by :func:`sign_record`): a record is valid from ``issued_ms`` until
``issued_ms + ttl_s * 1000``, give or take ``max_skew_ms`` for clocks that disagree.

``seq`` orders one peer's records: a verifier keeps the highest seen per peer
(:class:`RecordBook`) and refuses an older one, or another body under the same
seq. Signers should use a clock-based seq (wall-clock ms) so that a restarted node's
records sort after its old ones.

Errors (all raised by :func:`verify_record` or :meth:`RecordBook.admit`)::

    SwarmError (protocols)
    └── RecordRejected            UNAUTHORIZED unless said otherwise
        ├── MalformedRecord       MALFORMED: body, peer id or ttl unusable
        ├── UnverifiablePeerId    no Ed25519 key can be read from the peer id
        ├── BadSignature          missing, garbled, or not made by the peer id's key
        ├── RecordExpired         issued_ms + ttl (+ skew) is in the past
        ├── RecordFromFuture      issued_ms is beyond now + skew
        └── RecordReplayed        seq below the highest seen, or equal with another body

Each class has a short ``reason`` ("bad-signature", ...) for logs and counters.
Signing what cannot be signed is our bug: ``LocalProtocolError``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
from libp2p.crypto.keys import KeyPair, KeyType, PublicKey
from libp2p.peer.id import ID

from protocols import CapabilityRecord, ErrorCode, LocalProtocolError, SwarmError

DOMAIN = b"swarm/caps/v1"  # a signature over a record is never valid as anything else
ISSUED_KEY = "issued_ms"  # reserved body key, set by sign_record
MAX_TTL_S = 24 * 3600
MAX_DEPTH = 32
DEFAULT_MAX_SKEW_MS = 30_000
SIGNATURE_LEN = 64  # Ed25519


class RecordRejected(SwarmError):
    """A capability record that must not be believed."""

    code = ErrorCode.UNAUTHORIZED
    reason = "rejected"


class MalformedRecord(RecordRejected):
    code = ErrorCode.MALFORMED
    reason = "malformed"


class UnverifiablePeerId(RecordRejected):
    reason = "unverifiable-peer-id"


class BadSignature(RecordRejected):
    reason = "bad-signature"


class RecordExpired(RecordRejected):
    reason = "expired"


class RecordFromFuture(RecordRejected):
    reason = "from-future"


class RecordReplayed(RecordRejected):
    reason = "replayed"


@dataclass(frozen=True, slots=True)
class VerifiedRecord:
    """A record whose signature, peer id and validity window were checked."""

    peer_id: str
    seq: int
    ttl_s: int
    issued_ms: int
    body: Mapping[str, Any]  # canonical, without issued_ms
    digest: bytes  # sha256 of the signed payload: same digest, same record

    @property
    def expires_ms(self) -> int:
        return self.issued_ms + self.ttl_s * 1000


# ---------------------------------------------------------------------------
# canonical form


class _NotCanonical(ValueError):
    pass


def canonical(value: Any, _depth: int = 0) -> Any:
    """``value`` as plain msgpack data with sorted map keys; ValueError if not allowed."""
    if _depth > MAX_DEPTH:
        raise _NotCanonical(f"nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise _NotCanonical(f"int {value} does not fit msgpack")
        return int(value)  # IntEnum and other subclasses: the plain value
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, list | tuple):
        return [canonical(v, _depth + 1) for v in value]
    if isinstance(value, Mapping):
        if not all(type(k) is str for k in value):
            raise _NotCanonical("map keys must be str")
        return {k: canonical(value[k], _depth + 1) for k in sorted(value)}
    raise _NotCanonical(f"{type(value).__name__} is not allowed in a record body")


def signing_payload(peer_id: str, seq: int, ttl_s: int, body: Mapping[str, Any]) -> bytes:
    """The exact bytes signed for a record (``body`` already holds issued_ms).

    Raises ValueError when ``body`` holds something a body may not hold.
    """
    return _pack(peer_id, seq, ttl_s, canonical(body))


def _pack(peer_id: str, seq: int, ttl_s: int, body: Any) -> bytes:
    return bytes(msgpack.packb([DOMAIN, peer_id, seq, ttl_s, body], use_bin_type=True))


# ---------------------------------------------------------------------------
# signing


def sign_record(
    key_pair: KeyPair,
    body: Mapping[str, Any],
    *,
    seq: int,
    ttl_s: int,
    issued_ms: int | None = None,
) -> CapabilityRecord:
    """This node's record, signed; ``issued_ms`` defaults to the wall clock now.

    Raises LocalProtocolError for a key that is not Ed25519, a body that cannot be
    signed (a type not listed in the module docstring, non-str keys, a key named
    ``issued_ms``) or a seq, ttl or issue time out of range.
    """
    if key_pair.public_key.get_type() != KeyType.Ed25519:
        raise LocalProtocolError("only an Ed25519 identity can sign records peers can verify")
    if ISSUED_KEY in body:
        raise LocalProtocolError(f"{ISSUED_KEY!r} is reserved in a record body")
    if issued_ms is None:
        issued_ms = time.time_ns() // 1_000_000
    if not (0 <= seq <= 1 << 62 and 0 < ttl_s <= MAX_TTL_S and 0 <= issued_ms <= 1 << 62):
        raise LocalProtocolError(f"seq {seq}, ttl_s {ttl_s} or issued_ms {issued_ms} out of range")
    peer_id = ID.from_pubkey(key_pair.public_key).to_base58()
    try:
        signed_body = canonical({**body, ISSUED_KEY: issued_ms})
        payload = _pack(peer_id, seq, ttl_s, signed_body)
    except ValueError as exc:
        raise LocalProtocolError(f"cannot sign this record body: {exc}") from exc
    signature = key_pair.private_key.sign(payload)
    return CapabilityRecord(peer_id, seq, ttl_s, signed_body, bytes(signature))


# ---------------------------------------------------------------------------
# verifying


def verify_record(
    record: CapabilityRecord,
    *,
    now_ms: int | None = None,
    max_skew_ms: int = DEFAULT_MAX_SKEW_MS,
) -> VerifiedRecord:
    """Check that ``record`` was signed by the key in its peer id and is valid now.

    ``now_ms`` defaults to the wall clock. Does not check ``seq`` against earlier
    records: that needs memory (:class:`RecordBook`). Raises a RecordRejected.
    """
    if now_ms is None:
        now_ms = time.time_ns() // 1_000_000
    key = _public_key(record.peer_id)
    if not 0 < record.ttl_s <= MAX_TTL_S:
        raise MalformedRecord(f"ttl_s {record.ttl_s} is not within 1..{MAX_TTL_S}")
    if len(record.signature) != SIGNATURE_LEN:
        what = "unsigned" if not record.signature else f"{len(record.signature)}-byte signature"
        raise BadSignature(f"record of {record.peer_id} is {what}, not Ed25519-signed")
    try:
        body = canonical(record.body)
        if not isinstance(body, dict):
            raise _NotCanonical("the body must be a map")
        payload = _pack(record.peer_id, record.seq, record.ttl_s, body)
    except ValueError as exc:
        raise MalformedRecord(f"body of {record.peer_id}'s record: {exc}") from exc
    try:
        good = key.verify(payload, record.signature)
    except Exception as exc:  # nacl raises for keys and signatures it cannot parse
        raise BadSignature(f"signature of {record.peer_id} unusable: {exc}") from exc
    if not good:
        raise BadSignature(f"record not signed by the key of {record.peer_id}")
    issued = body.get(ISSUED_KEY)
    if type(issued) is not int or issued < 0:
        raise MalformedRecord(f"record of {record.peer_id} lacks an int {ISSUED_KEY}")
    verified = VerifiedRecord(
        peer_id=record.peer_id,
        seq=record.seq,
        ttl_s=record.ttl_s,
        issued_ms=issued,
        body={k: v for k, v in body.items() if k != ISSUED_KEY},
        digest=hashlib.sha256(payload).digest(),
    )
    if verified.expires_ms + max_skew_ms < now_ms:
        raise RecordExpired(
            f"record of {record.peer_id} expired {now_ms - verified.expires_ms} ms ago"
        )
    if issued > now_ms + max_skew_ms:
        raise RecordFromFuture(
            f"record of {record.peer_id} issued {issued - now_ms} ms in the future"
        )
    return verified


def _public_key(peer_id: str) -> PublicKey:
    try:
        pid = ID.from_base58(peer_id)
        ok = pid.to_base58() == peer_id and len(peer_id) > 0
    except Exception as exc:  # base58 raises ValueError and others for bad text
        raise MalformedRecord(f"peer id {peer_id!r} is not base58") from exc
    if not ok:
        raise MalformedRecord(f"peer id {peer_id!r} is not in canonical base58")
    key = pid.extract_public_key()
    if key is None:
        raise UnverifiablePeerId(
            f"peer id {peer_id} does not embed its key (an RSA or hashed id): cannot verify"
        )
    if key.get_type() != KeyType.Ed25519:
        raise UnverifiablePeerId(
            f"peer id {peer_id} holds a {key.get_type().name} key, not Ed25519"
        )
    if ID.from_pubkey(key) != pid:  # a non-canonical key encoding inside the id
        raise UnverifiablePeerId(f"peer id {peer_id} does not re-derive from its own key")
    return key


# ---------------------------------------------------------------------------
# replay protection


@dataclass(frozen=True, slots=True)
class _Seen:
    seq: int
    digest: bytes
    expires_ms: int


@dataclass(frozen=True, slots=True)
class RecordBook:
    """The highest seq seen per peer: pure, each call returns a new book.

    ``admit`` refuses a record whose seq is below the highest seen, or equal to
    it with a different payload; the very same record again (a re-fetch) is
    fine. ``prune`` forgets peers whose newest record ``verify_record`` would
    refuse as expired anyway, which bounds the book without opening a replay
    window, as long as a peer's seq grows with its clock (signers: see above).
    """

    seen: Mapping[str, _Seen] = field(default_factory=dict)

    def admit(self, record: VerifiedRecord) -> RecordBook:
        last = self.seen.get(record.peer_id)
        if last is not None:
            if record.seq < last.seq:
                raise RecordReplayed(
                    f"record of {record.peer_id} has seq {record.seq} < {last.seq} seen"
                )
            if record.seq == last.seq:
                if record.digest == last.digest:
                    return self
                raise RecordReplayed(
                    f"record of {record.peer_id} reuses seq {record.seq} for another body"
                )
        entry = _Seen(record.seq, record.digest, record.expires_ms)
        return RecordBook({**self.seen, record.peer_id: entry})

    def prune(self, now_ms: int, max_skew_ms: int = DEFAULT_MAX_SKEW_MS) -> RecordBook:
        kept = {p: s for p, s in self.seen.items() if s.expires_ms + max_skew_ms >= now_ms}
        return self if len(kept) == len(self.seen) else RecordBook(kept)

    def highest_seq(self, peer_id: str) -> int | None:
        last = self.seen.get(peer_id)
        return None if last is None else last.seq
