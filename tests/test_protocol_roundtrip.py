"""Every message the wire can carry comes back unchanged, in any chunking.

encode -> Decoder must be the identity on messages (Error text aside, which is
cut at MAX_ERROR_TEXT), whether the bytes arrive whole, one at a time or in
random pieces, alone or back to back, with tensors inline or split into parts.
"""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from _protocol_strategies import (
    ITEMSIZE,
    SMALL,
    decode_pieces,
    expected_on_wire,
    large_tensors,
    messages,
    messages_with_large_tensors,
    normalize,
    split,
    tensors,
    wire,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocols import (
    DEFAULT_LIMITS,
    DTYPES,
    Cancel,
    Chunk,
    ConfigError,
    Decoder,
    Error,
    ErrorCode,
    Limits,
    Message,
    Priority,
    ProtocolError,
    Request,
    Result,
    Tensor,
    encode,
)
from protocols.codec import MAX_ERROR_TEXT
from protocols.messages import MAX_ID_LEN

FAST = settings(max_examples=150, deadline=None)


def assert_same(got: Message, sent: Message) -> None:
    assert normalize(got) == normalize(expected_on_wire(sent))


# ---------------------------------------------------------------------------
# one message, three ways of feeding it


@FAST
@given(messages)
def test_roundtrip_fed_whole(message: Message) -> None:
    decoder = Decoder(SMALL)
    assert decoder.idle
    decoder.feed(wire(message))
    assert not decoder.idle  # bytes buffered, not yet taken
    got = decoder.next_message()
    assert got is not None
    assert_same(got, message)
    assert decoder.next_message() is None
    assert decoder.idle


@FAST
@given(messages)
def test_roundtrip_byte_at_a_time(message: Message) -> None:
    data = wire(message)
    decoder = Decoder(SMALL)
    got: list[Message] = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        m = decoder.next_message()
        if m is not None:
            got.append(m)
        last = i == len(data) - 1
        # A message appears exactly when its last byte arrives, never before.
        assert len(got) == (1 if last else 0)
        assert decoder.idle is last
    assert_same(got[0], message)
    assert decoder.next_message() is None


@FAST
@given(messages, st.data())
def test_roundtrip_random_chunks(message: Message, data: st.DataObject) -> None:
    raw = wire(message)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=12))
    got = decode_pieces(split(raw, cuts), SMALL)
    assert len(got) == 1
    assert_same(got[0], message)


@FAST
@given(messages)
def test_roundtrip_default_limits(message: Message) -> None:
    decoder = Decoder()
    for frame in encode(message):
        decoder.feed(frame)
    got = list(decoder.messages())
    assert len(got) == 1
    assert_same(got[0], message)


@settings(max_examples=80, deadline=None)
@given(st.lists(messages, min_size=2, max_size=6), st.data())
def test_back_to_back_on_one_decoder(sent: list[Message], data: st.DataObject) -> None:
    raw = b"".join(wire(m) for m in sent)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=20))
    got = decode_pieces(split(raw, cuts), SMALL)
    assert [normalize(m) for m in got] == [normalize(expected_on_wire(m)) for m in sent]


@settings(max_examples=40, deadline=None)
@given(st.lists(messages, min_size=1, max_size=4))
def test_idle_exactly_at_message_boundaries(sent: list[Message]) -> None:
    encoded = [wire(m) for m in sent]
    boundaries = set(np.cumsum([len(e) for e in encoded]).tolist())
    raw = b"".join(encoded)
    decoder = Decoder(SMALL)
    count = 0
    for i in range(len(raw)):
        decoder.feed(raw[i : i + 1])
        count += len(list(decoder.messages()))
        assert decoder.idle is ((i + 1) in boundaries)
    assert count == len(sent)


# ---------------------------------------------------------------------------
# value kinds, one at a time


@pytest.mark.parametrize(
    "value",
    [
        "",
        "text ünïcödé 🐝",
        [],
        ["a", "", "ü"],
        0,
        -1,
        (1 << 64) - 1,
        -(1 << 63),
        0.0,
        -0.0,
        1.5,
        float("inf"),
        float("-inf"),
        float("nan"),
        True,
        False,
    ],
    ids=repr,
)
def test_each_value_kind_roundtrips_with_its_type(value: object) -> None:
    message = Result("r", {"v": value}, meta={})  # type: ignore[dict-item]
    decoder = Decoder(SMALL)
    decoder.feed(wire(message))
    got = decoder.next_message()
    assert isinstance(got, Result)
    v = got.outputs["v"]
    assert type(v) is type(value)
    if isinstance(value, float) and math.isnan(value):
        assert isinstance(v, float) and math.isnan(v)
    else:
        assert v == value
    if isinstance(value, float):  # sign of zero survives
        assert math.copysign(1.0, v) == math.copysign(1.0, value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [None, "s", 7, 2.5, True, float("nan")], ids=repr)
def test_meta_and_param_scalars_include_none(value: object) -> None:
    request = Request("q", "m", {}, params={"p": value, "l": ["x", "y"]})  # type: ignore[dict-item]
    result = Result("q", {}, meta={"k": value})  # type: ignore[dict-item]
    decoder = Decoder(SMALL)
    decoder.feed(wire(request) + wire(result))
    got_request, got_result = list(decoder.messages())
    assert normalize(got_request) == normalize(request)
    assert normalize(got_result) == normalize(result)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (2, 3), (1, 1, 1, 1, 1, 1, 1, 2)])
def test_tensor_of_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    nbytes = math.prod(shape) * ITEMSIZE[dtype]
    tensor = Tensor(dtype, shape, bytes(i % 251 for i in range(nbytes)))
    assert tensor.nbytes == nbytes
    decoder = Decoder(SMALL)
    decoder.feed(wire(Chunk("c", 0, {"t": tensor})))
    got = decoder.next_message()
    assert isinstance(got, Chunk)
    out = got.outputs["t"]
    assert isinstance(out, Tensor)
    assert out == tensor
    assert out.dtype == dtype and out.shape == shape
    array = out.numpy()
    assert array.shape == shape
    assert array.dtype == np.dtype(dtype)
    assert array.tobytes() == bytes(tensor.data)


def test_error_text_is_cut_at_the_documented_length() -> None:
    long = Error("e", ErrorCode.INTERNAL, "x" * (MAX_ERROR_TEXT + 100))
    decoder = Decoder()
    decoder.feed(wire(long, DEFAULT_LIMITS))
    got = decoder.next_message()
    assert isinstance(got, Error)
    assert got.message == "x" * MAX_ERROR_TEXT


def test_decoded_types_are_the_typed_ones() -> None:
    decoder = Decoder(SMALL)
    decoder.feed(wire(Request("q", "m", {}, priority=Priority.HIGH)))
    decoder.feed(wire(Error("q", ErrorCode.OVERLOADED, "busy", retry_after_ms=5)))
    request, error = list(decoder.messages())
    assert isinstance(request, Request) and type(request.priority) is Priority
    assert request.priority is Priority.HIGH
    assert isinstance(error, Error) and type(error.code) is ErrorCode
    assert error.code is ErrorCode.OVERLOADED and error.retry_after_ms == 5


def _frame(body: dict[str, object]) -> bytes:
    packed = msgpack.packb(body, use_bin_type=True)
    return len(packed).to_bytes(4, "big") + packed


def test_origin_travels_when_set_and_old_peers_requests_still_decode() -> None:
    forwarded = Request("q", "m", {}, hops=1, origin="12D3KooWclient")
    plain = Request("r", "m", {})
    assert "origin" in msgpack.unpackb(wire(forwarded)[4:], raw=False)
    assert "origin" not in msgpack.unpackb(wire(plain)[4:], raw=False)  # only when set
    # A request from a peer that predates the field: no "origin" key at all.
    old = {"t": "request", "id": "o", "model": "m", "inputs": {}, "params": {}, "priority": 1}
    old |= {"deadline_ms": None, "stream": False, "idempotent": True, "hops": 1}
    decoder = Decoder(SMALL)
    for data in (wire(forwarded), wire(plain), _frame(old)):
        decoder.feed(data)
    got = list(decoder.messages())
    assert [m.origin for m in got if isinstance(m, Request)] == ["12D3KooWclient", None, None]
    # An origin is an id: bounded like one, and text.
    for bad in ("x" * (MAX_ID_LEN + 1), 7):
        decoder = Decoder(SMALL)
        decoder.feed(_frame({**old, "origin": bad}))
        with pytest.raises(ProtocolError):
            decoder.next_message()


def _body(message: Message) -> dict[str, object]:
    frames = encode(message, SMALL)
    body: dict[str, object] = msgpack.unpackb(frames[0][4:], raw=False)
    return body


def test_verify_travels_only_when_asked() -> None:
    """An old peer (it knows no ``verify``) decodes every request a node sends it
    unless the job asked for verification, and a request from an old peer (no
    ``verify`` key) reads as 0."""
    assert "verify" not in _body(Request("q", "m", {}))
    asked = Request("q", "m", {}, verify=2)
    assert _body(asked)["verify"] == 2
    decoder = Decoder(SMALL)
    decoder.feed(wire(asked))
    got = decoder.next_message()
    assert isinstance(got, Request) and got.verify == 2
    old = {k: v for k, v in _body(Request("q", "m", {})).items()}
    decoder.feed(_framed(old))
    got = decoder.next_message()
    assert isinstance(got, Request) and got.verify == 0


@pytest.mark.parametrize("bad", [-1, 5, True, "1", 1.0])
def test_verify_out_of_range_is_a_protocol_error(bad: object) -> None:
    body = {**_body(Request("q", "m", {})), "verify": bad}
    decoder = Decoder(SMALL)
    decoder.feed(_framed(body))
    with pytest.raises(ProtocolError):
        decoder.next_message()


@pytest.mark.parametrize("bad", [-1, 5, True])
def test_a_request_refuses_a_verify_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError, match="verify"):
        Request("q", "m", {}, verify=bad)


def _framed(body: dict[str, object]) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return len(packed).to_bytes(4, "big") + packed


# ---------------------------------------------------------------------------
# tensors that do not fit one frame


def _parts(frames: list[bytes]) -> list[bytes]:
    out = []
    for frame in frames[1:]:
        body = msgpack.unpackb(frame[4:], raw=False)
        assert set(body) == {"t", "data"} and body["t"] == "part"
        out.append(body["data"])
    return out


@settings(max_examples=60, deadline=None)
@given(messages_with_large_tensors(), st.data())
def test_large_tensors_travel_in_parts(message: Message, data: st.DataObject) -> None:
    frames = encode(message, SMALL)
    big = [
        t
        for t in (message.inputs if isinstance(message, Request) else message.outputs).values()  # type: ignore[union-attr]
        if isinstance(t, Tensor) and t.nbytes > SMALL.part_size
    ]
    assert big
    # Every frame fits the cap; every part but a tensor's last is exactly part_size.
    assert all(len(f) - 4 <= SMALL.max_frame for f in frames)
    parts = _parts(frames)
    assert all(0 < len(p) <= SMALL.part_size for p in parts)
    assert len(parts) >= sum(math.ceil(t.nbytes / SMALL.part_size) for t in big)
    # The parts, in order, are the deferred tensors' bytes back to back.
    joined = b"".join(parts)
    assert all(bytes(t.data) in joined for t in big)

    raw = b"".join(frames)
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=30))
    got = decode_pieces(split(raw, cuts), SMALL)
    assert len(got) == 1
    assert_same(got[0], message)


@settings(max_examples=20, deadline=None)
@given(large_tensors(), large_tensors())
def test_large_tensors_byte_at_a_time_with_a_message_after(a: Tensor, b: Tensor) -> None:
    first = Result("r", {"a": a, "b": b})
    second = Cancel("next")
    raw = wire(first) + wire(second)
    first_len = len(wire(first))
    decoder = Decoder(SMALL)
    got: list[Message] = []
    for i in range(len(raw)):
        decoder.feed(raw[i : i + 1])
        got += list(decoder.messages())
        if i + 1 < first_len:
            assert not got and not decoder.idle
    assert [normalize(m) for m in got] == [normalize(first), normalize(second)]
    assert decoder.idle


def test_tensor_at_exactly_part_size_is_inline_and_one_byte_more_is_split() -> None:
    exact = Tensor("uint8", (SMALL.part_size,), bytes(SMALL.part_size))
    over = Tensor("uint8", (SMALL.part_size + 1,), bytes(SMALL.part_size + 1))
    assert len(encode(Result("r", {"t": exact}), SMALL)) == 1
    frames = encode(Result("r", {"t": over}), SMALL)
    assert [len(p) for p in _parts(frames)] == [SMALL.part_size, 1]


def test_inline_budget_is_shared_by_the_tensors_of_a_message() -> None:
    half = Tensor("uint8", (SMALL.part_size // 2 + 1,), b"\x01" * (SMALL.part_size // 2 + 1))
    frames = encode(Result("r", {"a": half, "b": half}), SMALL)
    assert len(frames) == 2  # the second no longer fits inline: one part
    decoder = Decoder(SMALL)
    for frame in frames:
        decoder.feed(frame)
    got = decoder.next_message()
    assert isinstance(got, Result) and got.outputs == {"a": half, "b": half}


def test_deferred_tensor_with_default_limits() -> None:
    array = np.arange(3 * 1024 * 1024 // 4 + 7, dtype=np.float32)
    message = Request("q", "m", {"x": Tensor.from_numpy(array)})
    frames = encode(message)
    assert len(frames) == 1 + math.ceil(array.nbytes / DEFAULT_LIMITS.part_size)
    decoder = Decoder()
    for frame in frames[:-1]:
        decoder.feed(frame)
        assert decoder.next_message() is None
        assert not decoder.idle
    decoder.feed(frames[-1])
    got = decoder.next_message()
    assert isinstance(got, Request)
    x = got.inputs["x"]
    assert isinstance(x, Tensor)
    np.testing.assert_array_equal(x.numpy(), array)


def test_small_custom_limits_are_validated() -> None:
    with pytest.raises(ConfigError):
        Limits(max_frame=2048, part_size=2048)
    with pytest.raises(ConfigError):
        Limits(max_frame=8192, part_size=0)
    with pytest.raises(ConfigError):
        Limits(max_frame=8192, part_size=4096, max_message=100)
    with pytest.raises(ConfigError):
        Limits(max_items=8)


# ---------------------------------------------------------------------------
# numpy in and out

ALL_DTYPES = st.sampled_from(sorted(DTYPES)).map(np.dtype)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(ALL_DTYPES, hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)))
def test_from_numpy_is_zero_copy_for_contiguous_little_endian(array: np.ndarray) -> None:
    assert array.flags.c_contiguous
    tensor = Tensor.from_numpy(array)
    assert tensor.dtype == array.dtype.name
    assert tensor.shape == array.shape
    assert tensor.nbytes == array.nbytes
    assert np.shares_memory(np.frombuffer(tensor.data, dtype=np.uint8), array)
    back = tensor.numpy()
    assert np.shares_memory(back, array)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    # A write through the original shows in the view: it is the same memory.
    array.reshape(-1).view(np.uint8)[0] ^= 0xFF
    assert back.reshape(-1).view(np.uint8)[0] == array.reshape(-1).view(np.uint8)[0]


@settings(max_examples=100, deadline=None)
@given(
    hnp.arrays(ALL_DTYPES, hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)),
    st.data(),
)
def test_numpy_roundtrip_through_the_wire(array: np.ndarray, data: st.DataObject) -> None:
    order = data.draw(st.sampled_from(["<", ">"]))
    layout = data.draw(st.sampled_from(["c", "fortran", "strided", "transposed"]))
    a = array.astype(array.dtype.newbyteorder(order))
    if layout == "fortran":
        a = np.asfortranarray(a)
    elif layout == "strided":
        a = np.repeat(a, 2, axis=0)[::2]
    elif layout == "transposed":
        a = a.T
    tensor = Tensor.from_numpy(a)
    assert tensor.dtype == array.dtype.name
    assert tensor.shape == a.shape
    # The wire form is little-endian C order, whatever came in.
    assert bytes(tensor.data) == np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
    decoder = Decoder(SMALL)
    decoder.feed(wire(Result("r", {"t": tensor})))
    got = decoder.next_message()
    assert isinstance(got, Result)
    out = got.outputs["t"]
    assert isinstance(out, Tensor)
    back = out.numpy()
    assert back.shape == a.shape
    assert back.dtype == np.dtype(array.dtype.name)  # native little-endian
    np.testing.assert_array_equal(back, a)  # values, NaN equal to NaN


@pytest.mark.parametrize("dtype", sorted(DTYPES - {"bool", "int8", "uint8"}))
def test_big_endian_array_is_swapped_to_little_endian(dtype: str) -> None:
    big = np.arange(6, dtype=np.dtype(dtype).newbyteorder(">")).reshape(2, 3)
    tensor = Tensor.from_numpy(big)
    assert bytes(tensor.data) == np.arange(6, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    np.testing.assert_array_equal(tensor.numpy(), big)
    assert not np.shares_memory(np.frombuffer(tensor.data, np.uint8), big)


def test_non_contiguous_array_is_copied_in_c_order() -> None:
    base = np.arange(24, dtype=np.int32).reshape(4, 6)
    view = base[::2, 1::2]
    tensor = Tensor.from_numpy(view)
    assert tensor.shape == (2, 3)
    assert bytes(tensor.data) == np.ascontiguousarray(view).tobytes()
    np.testing.assert_array_equal(tensor.numpy(), view)
    assert not np.shares_memory(np.frombuffer(tensor.data, np.uint8), base)


@pytest.mark.parametrize("dtype", ["complex64", "float128", "object", "U3", "datetime64[s]"])
def test_from_numpy_refuses_dtypes_that_cannot_travel(dtype: str) -> None:
    try:
        array = np.zeros(2, dtype=dtype)
    except TypeError:
        pytest.skip(f"{dtype} not on this platform")
    with pytest.raises(ValueError, match="cannot travel"):
        Tensor.from_numpy(array)


def test_numpy_view_is_read_only_over_bytes_and_shares_the_buffer() -> None:
    data = np.array([1.0, 2.0], dtype="<f4").tobytes()
    tensor = Tensor("float32", (2,), data)
    array = tensor.numpy()
    assert not array.flags.writeable
    np.testing.assert_array_equal(array, [1.0, 2.0])
    writable = Tensor("float32", (2,), bytearray(data)).numpy()
    assert writable.flags.writeable


def test_decoded_deferred_tensor_is_a_view_of_the_reassembled_buffer() -> None:
    array = np.arange(2000, dtype=np.float64)  # 16000 bytes: four parts
    decoder = Decoder(SMALL)
    decoder.feed(wire(Result("r", {"t": Tensor.from_numpy(array)})))
    got = decoder.next_message()
    assert isinstance(got, Result)
    t = got.outputs["t"]
    assert isinstance(t, Tensor)
    out = t.numpy()
    np.testing.assert_array_equal(out, array)
    assert np.shares_memory(out, np.frombuffer(t.data, np.uint8))


@settings(max_examples=50, deadline=None)
@given(tensors(), tensors())
def test_tensor_equality_and_hash_follow_the_bytes(a: Tensor, b: Tensor) -> None:
    same = a.dtype == b.dtype and a.shape == b.shape and bytes(a.data) == bytes(b.data)
    assert (a == b) is same
    copy = Tensor(a.dtype, a.shape, bytearray(a.data))
    assert copy == a and hash(copy) == hash(a)
    assert (a == "not a tensor") is False


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2), (2, 0, 0, 1)])
@pytest.mark.parametrize("dtype", ["float32", "bool", "uint64"])
def test_from_numpy_handles_empty_arrays(shape: tuple[int, ...], dtype: str) -> None:
    # memoryview.cast refuses a view with a zero in its shape; this once raised TypeError.
    array = np.zeros(shape, dtype=dtype)
    tensor = Tensor.from_numpy(array)
    assert tensor.shape == shape and tensor.nbytes == 0 and tensor.dtype == dtype
    assert tensor.numpy().shape == shape
    decoder = Decoder(SMALL)
    decoder.feed(wire(Result("r", {"t": tensor})))
    got = decoder.next_message()
    assert isinstance(got, Result) and got.outputs["t"] == tensor


# ---------------------------------------------------------------------------
# regressions: bugs these tests found, now fixed


@pytest.mark.parametrize("dtype", ["float32", "int64", "bool"])
def test_fixed_from_numpy_keeps_a_0d_shape(dtype: str) -> None:
    array = np.array(1, dtype=dtype)
    tensor = Tensor.from_numpy(array)
    assert tensor.shape == ()
    assert tensor.numpy().shape == ()


def test_fixed_tensor_nbytes_counts_bytes_of_a_typed_memoryview() -> None:
    array = np.zeros((2, 3), dtype=np.float32)
    tensor = Tensor("float32", (2, 3), memoryview(array))
    assert tensor.nbytes == 24


@pytest.mark.parametrize(
    "body",
    [
        {"t": "request", "id": "q", "model": "m", "inputs": {b"x": 1}},
        {"t": "request", "id": "q", "model": "m", "inputs": {}, "params": {b"p": 1}},
        {"t": "result", "id": "r", "outputs": {b"x": "s"}},
        {"t": "result", "id": "r", "outputs": {}, "meta": {b"k": None}},
        {"t": "chunk", "id": "c", "seq": 0, "outputs": {b"x": True}},
    ],
    ids=["inputs", "params", "outputs", "meta", "chunk"],
)
def test_fixed_decoded_map_keys_are_strings(body: dict[object, object]) -> None:
    payload = msgpack.packb(body, use_bin_type=True)
    decoder = Decoder(SMALL)
    decoder.feed(len(payload).to_bytes(4, "big") + payload)
    try:
        message = decoder.next_message()
    except ProtocolError:
        return  # refusing it is fine
    assert message is not None
    for name in ("inputs", "outputs", "params", "meta"):
        mapping = getattr(message, name, {})
        assert all(isinstance(k, str) for k in mapping), (name, mapping)
