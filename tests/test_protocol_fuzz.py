"""Any bytes, in any chunking, give messages or a ProtocolError: nothing else.

The h11 contract for a sans-IO decoder. Random bytes, random framed payloads,
random msgpack maps shaped like our messages, and mutated valid encodings all
go through the same check: the decoder yields well-formed messages or raises a
ProtocolError (then stays poisoned), never another exception and never a loop
without end. Then the cases named in the design, one by one, and the encoder's
own refusals.
"""

from __future__ import annotations

import copy
import tracemalloc
from typing import Any

import msgpack
import pytest
from _protocol_strategies import (
    SMALL,
    drain,
    messages,
    messages_with_large_tensors,
    normalize,
    split,
    wire,
)
from hypothesis import example, given, settings
from hypothesis import strategies as st

from protocols import (
    Cancel,
    CapabilityRecord,
    Chunk,
    Decoder,
    Error,
    ErrorCode,
    FrameTooLarge,
    Limits,
    LocalProtocolError,
    Message,
    MessageTooLarge,
    Priority,
    ProtocolError,
    RemoteProtocolError,
    Request,
    Result,
    Tensor,
    codec,
    encode,
)

FUZZ = settings(max_examples=250, deadline=None)
ALL_TAGS = ["request", "chunk", "result", "error", "cancel", "caps", "part"]


def frame(obj: Any) -> bytes:
    payload = msgpack.packb(obj, use_bin_type=True)
    return len(payload).to_bytes(4, "big") + payload


def check_contract(pieces: list[bytes], limits: Limits = SMALL) -> tuple[list[Message], bool]:
    """Feed ``pieces``; return (messages, whether it ended in a ProtocolError).

    Anything but a ProtocolError escapes and fails the test. After an error the
    decoder must stay poisoned. Every message it yields must encode again and
    decode to itself: it is a message the protocol can carry.
    """
    decoder = Decoder(limits)
    total = sum(len(p) for p in pieces)
    got: list[Message] = []
    failed: type[ProtocolError] | None = None
    for piece in pieces:
        decoder.feed(piece)
        try:
            drain(decoder, got, total)
        except ProtocolError as exc:
            failed = type(exc)
            break
    if failed is None:
        # next_message said None: then no whole frame may be waiting behind it.
        try:
            left: object = decoder.next_message()
        except ProtocolError as exc:
            left = exc
        assert left is None, f"next_message returned None with a whole frame buffered: {left!r}"
    if failed is not None:
        for _ in range(2):  # poisoned: the same error, however much more comes
            decoder.feed(wire(Cancel("ok"), limits))
            with pytest.raises(failed):
                decoder.next_message()
            with pytest.raises(failed):
                list(decoder.messages())
    for message in got:
        again = Decoder(limits)
        for f in encode(message, limits):
            again.feed(f)
        (back,) = list(again.messages())
        assert normalize(back) == normalize(message)
    return got, failed is not None


def decode_one(*frames: bytes, limits: Limits = SMALL) -> Message | None:
    decoder = Decoder(limits)
    for f in frames:
        decoder.feed(f)
    return decoder.next_message()


# ---------------------------------------------------------------------------
# generated input


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=10))
def test_any_bytes_in_any_chunking(data: bytes, cuts: list[int]) -> None:
    check_contract(split(data, cuts))


@FUZZ
@given(
    st.lists(
        st.tuples(st.binary(max_size=120), st.integers(-3, 3) | st.just(0)),
        min_size=1,
        max_size=5,
    ),
    st.lists(st.integers(0, 600), max_size=10),
)
def test_random_payloads_behind_plausible_headers(
    payloads: list[tuple[bytes, int]], cuts: list[int]
) -> None:
    # Lengths near the truth reach msgpack itself instead of stopping at the header.
    raw = b"".join(max(0, len(p) + skew).to_bytes(4, "big") + p for p, skew in payloads)
    check_contract(split(raw, cuts))


def _wire_values() -> st.SearchStrategy[Any]:
    atoms = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(1 << 63), (1 << 64) - 1),
        st.integers(-2, 10),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
        st.sampled_from(["float32", "int8", "bool", "float128", "request", "OVERLOADED"]),
    )
    tensor_like = st.fixed_dictionaries(
        {},
        optional={
            "dtype": st.sampled_from(["float32", "uint8", "int64", "bogus"]) | atoms,
            "shape": st.lists(st.integers(-1, 4) | atoms, max_size=9) | atoms,
            "data": st.binary(max_size=40) | atoms,
            "deferred": st.just(True) | atoms,
        },
    )
    return st.recursive(
        atoms | tensor_like,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text(max_size=4) | st.binary(max_size=2), inner, max_size=3)
        ),
        max_leaves=8,
    )


FIELDS = [
    "id",
    "model",
    "inputs",
    "params",
    "priority",
    "deadline_ms",
    "stream",
    "idempotent",
    "hops",
    "seq",
    "outputs",
    "meta",
    "code",
    "message",
    "retry_after_ms",
    "peer_id",
    "ttl_s",
    "body",
    "signature",
    "data",
]


@st.composite
def message_like_maps(draw: st.DrawFn) -> dict[str, Any]:
    obj: dict[str, Any] = {"t": draw(st.sampled_from([*ALL_TAGS, "nope"]) | _wire_values())}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=8, unique=True)):
        obj[name] = draw(_wire_values())
    return obj


@FUZZ
@given(
    st.lists(message_like_maps() | _wire_values(), min_size=1, max_size=4),
    st.lists(st.integers(0, 2000), max_size=10),
)
# A nil frame once hid the message behind it (next_message said None).
@example([None, {"t": "cancel", "id": "c"}], [])
def test_random_maps_shaped_like_messages(objs: list[Any], cuts: list[int]) -> None:
    raw = b"".join(frame(o) for o in objs)
    check_contract(split(raw, cuts))


@st.composite
def valid_then_broken(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message's wire map with one field swapped for a random value."""
    message = draw(messages)
    (head,) = encode(message, SMALL)[:1]
    obj = msgpack.unpackb(head[4:], raw=False)
    key = draw(st.sampled_from(sorted(obj)))
    if draw(st.booleans()):
        obj[key] = draw(_wire_values())
    else:
        del obj[key]
    return obj


@FUZZ
@given(valid_then_broken())
def test_valid_messages_with_one_field_broken(obj: dict[str, Any]) -> None:
    check_contract([frame(obj)])


MUTATIONS = st.sampled_from(["flip", "set", "truncate", "insert", "delete", "splice", "repeat"])


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    sent = draw(st.lists(messages | messages_with_large_tensors(), min_size=1, max_size=3))
    raw = bytearray(b"".join(wire(m) for m in sent))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(MUTATIONS)
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and raw:
            raw[at] = draw(st.sampled_from([0x00, 0xFF, 0xC0, 0xC1, 0xC4, 0xD9, 0xDE, 0x80]))
        elif op == "truncate":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[at : at + draw(st.integers(1, 8))]
        elif op == "splice":
            other = wire(draw(messages))
            cut = draw(st.integers(0, len(other)))
            raw[at:] = other[cut:]
        elif op == "repeat":
            raw[at:at] = raw[at : at + draw(st.integers(1, 64))]
    return bytes(raw)


@FUZZ
@given(mutated_streams(), st.lists(st.integers(0, 30000), max_size=8))
def test_mutated_valid_encodings(raw: bytes, cuts: list[int]) -> None:
    check_contract(split(raw, cuts))


@settings(max_examples=60, deadline=None)
@given(mutated_streams())
def test_mutated_valid_encodings_byte_at_a_time(raw: bytes) -> None:
    whole, whole_failed = check_contract([raw])
    single, single_failed = check_contract([raw[i : i + 1] for i in range(len(raw))])
    # The chunking never changes the outcome.
    assert [normalize(m) for m in single] == [normalize(m) for m in whole]
    assert single_failed == whole_failed


# ---------------------------------------------------------------------------
# framing


def test_oversized_length_prefix_fails_on_the_header_alone() -> None:
    for length in (SMALL.max_frame + 1, 0xFFFFFFFF):
        decoder = Decoder(SMALL)
        decoder.feed(length.to_bytes(4, "big"))  # not one payload byte yet
        with pytest.raises(FrameTooLarge):
            decoder.next_message()


def test_oversized_length_prefix_fed_byte_by_byte() -> None:
    decoder = Decoder(SMALL)
    header = (SMALL.max_frame + 1).to_bytes(4, "big")
    for b in header[:3]:
        decoder.feed(bytes([b]))
        assert decoder.next_message() is None
    decoder.feed(header[3:])
    with pytest.raises(FrameTooLarge):
        decoder.next_message()


def test_length_prefix_at_the_cap_waits_for_its_payload() -> None:
    decoder = Decoder(SMALL)
    decoder.feed(SMALL.max_frame.to_bytes(4, "big") + b"\x80")
    assert decoder.next_message() is None
    assert not decoder.idle


def test_zero_length_frame() -> None:
    decoder = Decoder(SMALL)
    decoder.feed(b"\x00\x00\x00\x00")
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_message()
    assert not isinstance(info.value, FrameTooLarge)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x81\xa1t",  # map cut short
        msgpack.packb({"t": "cancel", "id": "x"}) + b"\x00",  # trailing bytes in the frame
        b"\xa3\xff\xfe\xfd",  # str that is not UTF-8
        b"\x81\x01\xa1x",  # int map key
        b"\xc7\x01\xff\x00",  # ext type (timestamp, bad length)
        b"\xd4\x05\x00",  # ext type
    ],
    ids=["c1", "short-map", "trailing", "bad-utf8", "int-key", "timestamp", "ext"],
)
def test_undecodable_payloads(payload: bytes) -> None:
    decoder = Decoder(SMALL)
    decoder.feed(len(payload).to_bytes(4, "big") + payload)
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


@pytest.mark.parametrize(
    "obj",
    [[1, 2], 5, "request", b"bin", 1.5, True, {"t": "nope"}, {"t": 5}, {"id": "x"}, {}],
    ids=repr,
)
def test_not_a_message(obj: Any) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_one(frame(obj))


def test_msgpack_item_limits_apply() -> None:
    many = {str(i): i for i in range(SMALL.max_items + 1)}
    with pytest.raises(RemoteProtocolError):
        decode_one(frame({"t": "result", "id": "r", "outputs": {}, "meta": many}))
    long_list = ["x"] * (SMALL.max_items + 1)
    with pytest.raises(RemoteProtocolError):
        decode_one(frame({"t": "result", "id": "r", "outputs": {"l": long_list}}))


# ---------------------------------------------------------------------------
# fields

VALID: dict[str, dict[str, Any]] = {
    "request": {
        "t": "request",
        "id": "q1",
        "model": "m",
        "inputs": {"x": {"dtype": "float32", "shape": [2], "data": b"\x00" * 8}, "s": "hi"},
        "params": {"temperature": 0.5, "stop": ["a"], "n": None},
        "priority": 1,
        "deadline_ms": 100,
        "stream": True,
        "idempotent": False,
        "hops": 1,
    },
    "chunk": {"t": "chunk", "id": "q1", "seq": 3, "outputs": {"tok": "a"}},
    "result": {"t": "result", "id": "q1", "outputs": {"y": 1.5}, "meta": {"ms": 3}},
    "error": {
        "t": "error",
        "id": "q1",
        "code": "OVERLOADED",
        "message": "busy",
        "retry_after_ms": 20,
    },
    "cancel": {"t": "cancel", "id": "q1"},
    "caps": {
        "t": "caps",
        "peer_id": "Qm",
        "seq": 1,
        "ttl_s": 60,
        "body": {"models": [{"name": "m"}]},
        "signature": b"sig",
    },
}

ID_BAD = [1, b"q1", None, "", "x" * 129, ["q1"]]
INT_BAD = [-1, 1.0, True, "1", None, 1 << 63, [1]]
BOOL_BAD = [1, 0, None, "true", []]
MAP_BAD = [[], "x", None, 1, b"map"]
TEXT_BAD = [1, b"m", None, ["m"]]
BAD_FIELDS: dict[str, list[Any]] = {
    "id": ID_BAD,
    "model": [*TEXT_BAD, "m" * 257],
    "inputs": [
        *MAP_BAD,
        {"x": None},
        {"x": b"bin"},
        {"x": [1, "a"]},
        {"x": [["a"]]},
        {"x": {"dtype": "float32"}},
    ],
    "params": [*MAP_BAD, {"p": {"a": 1}}, {"p": b"x"}, {"p": [1]}],
    "priority": [*INT_BAD, 3, 99],
    "deadline_ms": [-1, 1.0, True, "1", [1]],
    "stream": BOOL_BAD,
    "idempotent": BOOL_BAD,
    "hops": INT_BAD,
    "seq": INT_BAD,
    "outputs": [*MAP_BAD, {"y": None}, {"y": b"x"}, {"y": [1]}],
    "meta": [*MAP_BAD, {"k": [1]}, {"k": ["a"]}, {"k": {"a": 1}}, {"k": b"x"}],
    "code": [*TEXT_BAD, "NOPE", "overloaded", ""],
    "message": [*TEXT_BAD, "m" * 4097],
    "retry_after_ms": [-1, 1.5, True, "1", [1]],
    "peer_id": [*TEXT_BAD, "p" * 257],
    "ttl_s": INT_BAD,
    "body": MAP_BAD,
    "signature": ["sig", 1, None, [b"s"]],
}
# An Error may name no request (a refused stream), so its id may be empty.
ERROR_ID_BAD = [v for v in ID_BAD if v != ""]


def _bad_field_cases() -> list[Any]:
    cases = []
    for tag, body in VALID.items():
        for key in body:
            if key == "t":
                continue
            bad = ERROR_ID_BAD if (tag, key) == ("error", "id") else BAD_FIELDS[key]
            for value in bad:
                cases.append(pytest.param(tag, key, value, id=f"{tag}.{key}={value!r:.20}"))
    return cases


@pytest.mark.parametrize("tag", sorted(VALID))
def test_valid_wire_maps_decode(tag: str) -> None:
    message = decode_one(frame(VALID[tag]))
    assert message is not None
    assert (
        type(message)
        is {
            "request": Request,
            "chunk": Chunk,
            "result": Result,
            "error": Error,
            "cancel": Cancel,
            "caps": CapabilityRecord,
        }[tag]
    )


@pytest.mark.parametrize(("tag", "key", "value"), _bad_field_cases())
def test_wrong_field_type_or_value(tag: str, key: str, value: Any) -> None:
    obj = copy.deepcopy(VALID[tag])
    obj[key] = value
    with pytest.raises(RemoteProtocolError):
        decode_one(frame(obj))


REQUIRED = {
    "request": ["id", "model", "inputs"],
    "chunk": ["id", "seq", "outputs"],
    "result": ["id", "outputs"],
    "error": ["id", "code", "message"],
    "cancel": ["id"],
    "caps": ["peer_id", "seq", "ttl_s", "body"],
}


@pytest.mark.parametrize(
    ("tag", "key"), [(t, k) for t, ks in REQUIRED.items() for k in ks], ids="{0[0]}.{0[1]}".format
)
def test_missing_required_field(tag: str, key: str) -> None:
    obj = dict(VALID[tag])
    del obj[key]
    with pytest.raises(RemoteProtocolError):
        decode_one(frame(obj))


OPTIONAL = [
    ("request", "params", {}),
    ("request", "priority", Priority.NORMAL),
    ("request", "deadline_ms", None),
    ("request", "stream", False),
    ("request", "idempotent", True),
    ("request", "hops", 0),
    ("result", "meta", {}),
    ("error", "retry_after_ms", None),
    ("caps", "signature", b""),
]


@pytest.mark.parametrize(("tag", "key", "default"), OPTIONAL, ids=repr)
def test_optional_field_may_be_omitted(tag: str, key: str, default: Any) -> None:
    obj = dict(VALID[tag])
    del obj[key]
    message = decode_one(frame(obj))
    assert message is not None
    assert getattr(message, key) == default


@pytest.mark.parametrize("tag", sorted(VALID))
def test_unknown_extra_field(tag: str) -> None:
    with pytest.raises(RemoteProtocolError, match="unknown fields"):
        decode_one(frame({**VALID[tag], "extra": 1}))
    with pytest.raises(RemoteProtocolError, match="unknown fields"):
        decode_one(frame({**VALID[tag], b"id": "bin key"}))


def test_null_where_optional_ints_allow_it() -> None:
    obj = {**VALID["request"], "deadline_ms": None}
    message = decode_one(frame(obj))
    assert isinstance(message, Request) and message.deadline_ms is None


# ---------------------------------------------------------------------------
# tensors


def _result_with(tensor: Any) -> bytes:
    return frame({"t": "result", "id": "r", "outputs": {"x": tensor}})


@pytest.mark.parametrize(
    "tensor",
    [
        {"dtype": "float32", "shape": [2], "data": b"\x00" * 7},
        {"dtype": "float32", "shape": [2], "data": b"\x00" * 9},
        {"dtype": "float32", "shape": [], "data": b""},
        {"dtype": "uint8", "shape": [0], "data": b"\x00"},
        {"dtype": "float32", "shape": [2], "data": "\x00" * 8},
        {"dtype": "float32", "shape": [2], "data": [0, 0]},
        {"dtype": "float128", "shape": [1], "data": b"\x00" * 16},
        {"dtype": "complex64", "shape": [1], "data": b"\x00" * 8},
        {"dtype": "object", "shape": [1], "data": b"\x00" * 8},
        {"dtype": "<f4", "shape": [1], "data": b"\x00" * 4},
        {"dtype": 1, "shape": [1], "data": b"\x00"},
        {"dtype": b"uint8", "shape": [1], "data": b"\x00"},
        {"dtype": "uint8", "shape": [-1], "data": b""},
        {"dtype": "uint8", "shape": [2, -1], "data": b""},
        {"dtype": "uint8", "shape": [-1], "deferred": True},
        {"dtype": "uint8", "shape": [-2, -3], "deferred": True},
        {"dtype": "uint8", "shape": [1.0], "data": b"\x00"},
        {"dtype": "uint8", "shape": [True], "data": b"\x00"},
        {"dtype": "uint8", "shape": ["1"], "data": b"\x00"},
        {"dtype": "uint8", "shape": [1] * 9, "data": b"\x00"},
        {"dtype": "uint8", "shape": 1, "data": b"\x00"},
        {"dtype": "uint8", "shape": {"0": 1}, "data": b"\x00"},
        {"dtype": "uint8", "shape": None, "data": b"\x00"},
        {"shape": [1], "data": b"\x00"},
        {"dtype": "uint8", "data": b"\x00"},
        {"dtype": "uint8", "shape": [1]},
        {"dtype": "uint8", "shape": [1], "data": b"\x00", "deferred": True},
        {"dtype": "uint8", "shape": [1], "data": b"\x00", "order": "C"},
        {"dtype": "uint8", "shape": [1], "deferred": False},
        {"dtype": "uint8", "shape": [1], "deferred": 1},
        {"dtype": "uint8", "shape": [0], "deferred": True},
        {},
    ],
    ids=repr,
)
def test_bad_tensor(tensor: dict[str, Any]) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_one(_result_with(tensor))


def test_tensor_of_eight_dims_is_the_limit() -> None:
    ok = decode_one(_result_with({"dtype": "uint8", "shape": [1] * 8, "data": b"\x07"}))
    assert isinstance(ok, Result)
    x = ok.outputs["x"]
    assert isinstance(x, Tensor) and x.shape == (1,) * 8


def test_inline_tensor_over_max_message_is_too_large() -> None:
    limits = Limits(max_frame=8192, part_size=4096, max_message=4096)
    data = b"\x00" * 5000  # fits a frame, not the message budget
    with pytest.raises(FrameTooLarge):
        decode_one(_result_with({"dtype": "uint8", "shape": [5000], "data": data}), limits=limits)


@pytest.mark.parametrize(
    "shape",
    # 4 MiB is over SMALL.max_message yet allocatable: tracemalloc would see it.
    [[1 << 19], [1 << 40], [1 << 20, 1 << 20], [(1 << 64) - 1, (1 << 64) - 1], [1 << 62] * 8],
    ids=repr,
)
def test_deferred_tensor_over_max_message_fails_without_allocating(shape: list[int]) -> None:
    decoder = Decoder(SMALL)
    decoder.feed(_result_with({"dtype": "float64", "shape": shape, "deferred": True}))
    tracemalloc.start()
    try:
        with pytest.raises(FrameTooLarge):
            decoder.next_message()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_deferred_tensors_share_one_message_budget() -> None:
    half = SMALL.max_message // 2
    tensor = {"dtype": "uint8", "shape": [half], "deferred": True}
    two = frame({"t": "result", "id": "r", "outputs": {"a": tensor, "b": tensor}})
    assert decode_one(two) is None  # exactly max_message: accepted, waits for parts
    one_more = {"dtype": "uint8", "shape": [half + 1], "deferred": True}
    over = frame({"t": "result", "id": "r", "outputs": {"a": tensor, "b": one_more}})
    with pytest.raises(FrameTooLarge):
        decode_one(over)


def _deferred_head(*sizes: int) -> bytes:
    outputs = {
        f"t{i}": {"dtype": "uint8", "shape": [n], "deferred": True} for i, n in enumerate(sizes)
    }
    return frame({"t": "result", "id": "r", "outputs": outputs})


def _part(data: Any, **extra: Any) -> bytes:
    return frame({"t": "part", "data": data, **extra})


def test_parts_fill_deferred_tensors_in_order() -> None:
    decoder = Decoder(SMALL)
    decoder.feed(_deferred_head(3, 2))
    assert decoder.next_message() is None and not decoder.idle
    decoder.feed(_part(b"ab"))
    assert decoder.next_message() is None and not decoder.idle
    decoder.feed(_part(b"c"))
    assert decoder.next_message() is None and not decoder.idle
    decoder.feed(_part(b"de"))
    message = decoder.next_message()
    assert isinstance(message, Result) and decoder.idle
    assert message.outputs == {
        "t0": Tensor("uint8", (3,), b"abc"),
        "t1": Tensor("uint8", (2,), b"de"),
    }


def test_part_with_no_message_waiting() -> None:
    with pytest.raises(RemoteProtocolError, match="no message waiting"):
        decode_one(_part(b"abc"))
    # also right after a message that needed no parts
    decoder = Decoder(SMALL)
    decoder.feed(wire(Cancel("c")) + _part(b"abc"))
    assert decoder.next_message() == Cancel("c")
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


def test_non_part_frame_while_parts_are_pending() -> None:
    decoder = Decoder(SMALL)
    decoder.feed(_deferred_head(4) + _part(b"ab") + wire(Cancel("r")))
    with pytest.raises(RemoteProtocolError, match="expected a tensor part"):
        decoder.next_message()


@pytest.mark.parametrize(
    "parts",
    [
        [b"abcde"],  # overruns a 4-byte tensor
        [b"ab", b"cde"],  # overruns it on the second part
        [b"abcd" + b"xyz!"],  # one part spanning two tensors
    ],
    ids=repr,
)
def test_part_overrunning_its_tensor(parts: list[bytes]) -> None:
    with pytest.raises(RemoteProtocolError, match="overruns"):
        decode_one(_deferred_head(4, 4), *[_part(p) for p in parts])


@pytest.mark.parametrize(
    "part",
    [
        _part(b""),
        _part("abcd"),
        _part(None),
        _part([1, 2]),
        _part(b"ab", extra=1),
        frame({"t": "part"}),
    ],
    ids=["empty", "str", "nil", "list", "extra-field", "no-data"],
)
def test_malformed_part(part: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_one(_deferred_head(4), part)


def test_unknown_error_code() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown error code"):
        decode_one(frame({**VALID["error"], "code": "TEAPOT"}))


# ---------------------------------------------------------------------------
# poisoning and idleness


@pytest.mark.parametrize(
    ("bad", "kind"),
    [
        (b"\xff\xff\xff\xff", FrameTooLarge),
        (b"\x00\x00\x00\x00", RemoteProtocolError),
        (frame({"t": "nope"}), RemoteProtocolError),
        (_part(b"x"), RemoteProtocolError),
    ],
    ids=["too-large", "empty", "unknown-tag", "stray-part"],
)
def test_decoder_stays_poisoned(bad: bytes, kind: type[ProtocolError]) -> None:
    decoder = Decoder(SMALL)
    decoder.feed(wire(Cancel("before")) + bad + wire(Cancel("after")))
    assert decoder.next_message() == Cancel("before")
    with pytest.raises(kind) as first:
        decoder.next_message()
    for _ in range(3):
        decoder.feed(wire(Cancel("more")))
        with pytest.raises(kind) as again:
            decoder.next_message()
        assert again.value is first.value


def test_idle_only_between_whole_messages() -> None:
    decoder = Decoder(SMALL)
    assert decoder.idle
    raw = wire(Cancel("c"))
    decoder.feed(raw[:2])  # part of a header
    assert decoder.next_message() is None and not decoder.idle
    decoder.feed(raw[2:-1])  # all but the last payload byte
    assert decoder.next_message() is None and not decoder.idle
    decoder.feed(raw[-1:])
    assert not decoder.idle  # whole, but not yet taken
    assert decoder.next_message() == Cancel("c")
    assert decoder.idle
    decoder.feed(_deferred_head(2))
    assert decoder.next_message() is None and not decoder.idle  # waiting for parts
    decoder.feed(_part(b"xy"))
    assert isinstance(decoder.next_message(), Result)
    assert decoder.idle


# ---------------------------------------------------------------------------
# the encoder's side


def test_message_too_large_for_a_frame() -> None:
    with pytest.raises(MessageTooLarge):
        encode(Result("r", {"s": "x" * SMALL.max_frame}), SMALL)
    with pytest.raises(MessageTooLarge):
        encode(Request("q", "m", {}, params={"stop": ["y" * 1000] * 10}), SMALL)
    assert issubclass(MessageTooLarge, LocalProtocolError)


def test_deferred_tensors_over_max_message_refused_by_the_encoder() -> None:
    limits = Limits(max_frame=8192, part_size=4096, max_message=8192)
    big = Tensor("uint8", (8193,), bytes(8193))
    with pytest.raises(MessageTooLarge):
        encode(Result("r", {"t": big}), limits)
    exact = Tensor("uint8", (8192,), bytes(8192))
    assert len(encode(Result("r", {"t": exact}), limits)) == 3


class _Opaque:
    pass


@pytest.mark.parametrize(
    "message",
    [
        Result("r", {"x": _Opaque()}),  # type: ignore[dict-item]
        Result("r", {"x": "\ud800"}),  # a lone surrogate is no UTF-8
        Result("r", {"x": 1 << 64}),
        Result("r", {"x": -(1 << 63) - 1}),
        Request("q", "m", {}, params={"p": {1, 2}}),  # type: ignore[dict-item]
        Result("r", {}, meta={"k": _Opaque()}),  # type: ignore[dict-item]
        CapabilityRecord("p", 1, 60, {"x": _Opaque()}),
    ],
    ids=["object", "surrogate", "int-too-big", "int-too-small", "set", "meta-object", "caps-body"],
)
def test_unencodable_values_raise_local_protocol_error(message: Message) -> None:
    with pytest.raises(LocalProtocolError):
        encode(message, SMALL)


def test_encoding_a_non_message_raises_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode("not a message", SMALL)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# regressions: bugs these tests found, now fixed


def unchecked_frames(
    message: Message, limits: Limits, monkeypatch: pytest.MonkeyPatch
) -> list[bytes]:
    """``message`` framed without the encoder's outgoing check: what a peer that lacks
    the check (another implementation, an older build) would send."""
    with monkeypatch.context() as patched:
        patched.setattr(codec, "_check_outgoing", lambda body, limits: None)
        return encode(message, limits)


def test_fixed_encoder_and_decoder_agree_on_max_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # max_message bounds all tensor bytes of a message, inline and deferred together.
    limits = Limits(max_frame=8192, part_size=4096, max_message=8192)
    over = Result(
        "r",
        {
            "small": Tensor("uint8", (100,), bytes(100)),  # inline
            "big": Tensor("uint8", (8192,), bytes(8192)),  # deferred; 8292 bytes in all
        },
    )
    with pytest.raises(MessageTooLarge):
        encode(over, limits)
    with pytest.raises(FrameTooLarge):
        decode_one(*unchecked_frames(over, limits, monkeypatch), limits=limits)
    exact = Result(
        "r",
        {
            "small": Tensor("uint8", (100,), bytes(100)),
            "big": Tensor("uint8", (8092,), bytes(8092)),
        },
    )
    frames = encode(exact, limits)
    assert len(frames) == 3  # the head and two parts
    assert decode_one(*frames, limits=limits) == exact


@pytest.mark.parametrize(
    "message",
    [
        Cancel(""),
        Cancel("x" * 129),
        Request("q", "m" * 257, {}),
        Request("q", "m", {"x": None}),  # type: ignore[dict-item]
        Request("q", "m", {"x": b"raw"}),  # type: ignore[dict-item]
        Request("q", "m", {}, params={"p": [1, 2]}),  # type: ignore[dict-item]
        Request("q", "m", {}, priority=7),  # type: ignore[arg-type]
        Request("q", "m", {}, hops=-1),
        Request("q", "m", {}, deadline_ms=-5),
        Chunk("c", -1, {}),
        Chunk("c", 0, {"t": Tensor("float32", (2,), b"abc")}),
        Chunk("c", 0, {"t": Tensor("complex64", (1,), bytes(8))}),
        Chunk("c", 0, {"t": Tensor("uint8", (1,) * 9, b"\x00")}),
        Result("r", {}, meta={"k": ["a"]}),  # type: ignore[dict-item]
        Error("e", "NOPE", "m"),  # type: ignore[arg-type]
        Error("e" * 129, ErrorCode.INTERNAL, "m"),
        CapabilityRecord("p", -1, 60, {}),
        Result("r", {str(i): i for i in range(SMALL.max_items + 1)}),
    ],
    ids=[
        "empty-id",
        "long-id",
        "long-model",
        "none-value",
        "bytes-value",
        "int-list-param",
        "bad-priority",
        "negative-hops",
        "negative-deadline",
        "negative-seq",
        "short-tensor-data",
        "bad-dtype",
        "nine-dims",
        "list-meta",
        "bad-code",
        "long-error-id",
        "negative-caps-seq",
        "too-many-items",
    ],
)
def test_fixed_encoder_refuses_what_the_decoder_refuses(
    message: Message, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The encoder runs the decoder's own checks on what it sends (codec._check_outgoing),
    # so it refuses each of these before a byte goes out...
    with pytest.raises(LocalProtocolError):
        encode(message, SMALL)
    # ...and each is one a peer's decoder refuses: the same frames, sent without that check.
    with pytest.raises(RemoteProtocolError):
        decode_one(*unchecked_frames(message, SMALL, monkeypatch))


@pytest.mark.parametrize("shape", [[0, (1 << 64) - 1], [0, 1 << 62, 1 << 62]], ids=repr)
def test_fixed_zero_sized_tensor_with_huge_dims(shape: list[int]) -> None:
    # It holds no bytes, yet numpy cannot view it: the decoder sizes it as if its zero
    # dims were 1 (protocols/tensors.py), far over max_message, and refuses it.
    with pytest.raises(FrameTooLarge):
        decode_one(_result_with({"dtype": "uint8", "shape": shape, "data": b""}))


def test_nil_frame_is_refused() -> None:
    # _take_frame once used None for "need more data", so a nil frame vanished.
    decoder = Decoder(SMALL)
    decoder.feed(frame(None))
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()


def test_nil_frame_does_not_hide_the_next_message() -> None:
    decoder = Decoder(SMALL)
    decoder.feed(frame(None) + wire(Cancel("c")))
    with pytest.raises(RemoteProtocolError):
        decoder.next_message()  # not None: that would leave the caller waiting for bytes
