"""Hypothesis strategies and helpers shared by the protocol tests.

Messages drawn here are exactly what the wire can carry: every one of them must
survive encode -> Decoder unchanged. ``normalize`` turns a message into a plain
tuple that compares types and float bits exactly (NaN equal to NaN, 0.0 and -0.0
apart), since ``==`` on the dataclasses would call NaN != NaN and True == 1.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

from hypothesis import strategies as st

from protocols import (
    DTYPES,
    Cancel,
    CapabilityRecord,
    Chunk,
    Decoder,
    Error,
    ErrorCode,
    Limits,
    Message,
    Priority,
    Request,
    Result,
    Tensor,
    encode,
)
from protocols.messages import MAX_ID_LEN, MAX_NAME_LEN, MAX_VERIFY
from protocols.tensors import MAX_NDIM

# Small frames keep the tests fast and make "bigger than one part" cheap to draw.
SMALL = Limits(max_frame=8192, part_size=4096, max_message=1 << 20, max_items=64)

ITEMSIZE = {
    "bool": 1,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "uint16": 2,
    "float16": 2,
    "int32": 4,
    "uint32": 4,
    "float32": 4,
    "int64": 8,
    "uint64": 8,
    "float64": 8,
}
assert set(ITEMSIZE) == DTYPES

U62 = st.integers(0, 1 << 62)
MSGPACK_INT = st.integers(-(1 << 63), (1 << 64) - 1)
ids = st.text(min_size=1, max_size=MAX_ID_LEN)
names = st.text(max_size=MAX_NAME_LEN)
keys = st.text(max_size=12)
floats = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def shapes(draw: st.DrawFn, max_ndim: int = MAX_NDIM) -> tuple[int, ...]:
    ndim = draw(st.integers(0, max_ndim))
    top = 5 if ndim <= 4 else 2  # at most 5**4 elements: a few KiB
    return tuple(draw(st.lists(st.integers(0, top), min_size=ndim, max_size=ndim)))


@st.composite
def tensors(draw: st.DrawFn, shape: st.SearchStrategy[tuple[int, ...]] | None = None) -> Tensor:
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    dims = draw(shape if shape is not None else shapes())
    nbytes = math.prod(dims) * ITEMSIZE[dtype]
    data = draw(st.binary(min_size=nbytes, max_size=nbytes))
    return Tensor(dtype, dims, data)


@st.composite
def large_tensors(draw: st.DrawFn) -> Tensor:
    """A 1-d tensor bigger than SMALL.part_size: it must travel in parts."""
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    size = ITEMSIZE[dtype]
    count = draw(st.integers(SMALL.part_size // size + 1, 3 * SMALL.part_size // size))
    # A repeated random block: cheap to draw, yet wrong offsets would show.
    block = draw(st.binary(min_size=1, max_size=64))
    data = (block * (count * size // len(block) + 1))[: count * size]
    return Tensor(dtype, (count,), data)


values = st.one_of(
    tensors(),
    st.text(max_size=40),
    st.lists(st.text(max_size=10), max_size=5),
    MSGPACK_INT,
    floats,
    st.booleans(),
)
scalars = st.one_of(st.none(), st.text(max_size=40), MSGPACK_INT, floats, st.booleans())
params = st.one_of(scalars, st.lists(st.text(max_size=10), max_size=5))
value_maps = st.dictionaries(keys, values, max_size=4)

plain_data = st.recursive(
    st.one_of(
        st.none(), st.booleans(), MSGPACK_INT, floats, st.text(max_size=20), st.binary(max_size=20)
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)

requests = st.builds(
    Request,
    id=ids,
    model=names,
    inputs=value_maps,
    params=st.dictionaries(keys, params, max_size=4),
    priority=st.sampled_from(Priority),
    deadline_ms=st.none() | U62,
    stream=st.booleans(),
    idempotent=st.booleans(),
    hops=U62,
    strategy=st.none() | st.text(max_size=32),
    origin=st.none() | st.text(max_size=MAX_ID_LEN),
    verify=st.integers(0, MAX_VERIFY),
)
chunks = st.builds(Chunk, id=ids, seq=U62, outputs=value_maps)
results = st.builds(
    Result, id=ids, outputs=value_maps, meta=st.dictionaries(keys, scalars, max_size=4)
)
errors = st.builds(
    Error,
    id=st.text(max_size=MAX_ID_LEN),  # an Error may have an empty id (refusing a stream)
    code=st.sampled_from(ErrorCode),
    message=st.text(max_size=200),
    retry_after_ms=st.none() | U62,
)
cancels = st.builds(Cancel, id=ids)
capability_records = st.builds(
    CapabilityRecord,
    peer_id=names,
    seq=U62,
    ttl_s=U62,
    body=st.dictionaries(keys, plain_data, max_size=5),
    signature=st.binary(max_size=64),
)
messages = st.one_of(requests, chunks, results, errors, cancels, capability_records)


@st.composite
def messages_with_large_tensors(draw: st.DrawFn) -> Message:
    """A Request, Chunk or Result with at least one tensor that needs parts."""
    big = draw(st.dictionaries(keys, large_tensors(), min_size=1, max_size=2))
    small = draw(value_maps)
    items = [(k, v) for k, v in small.items() if k not in big] + list(big.items())
    merged = dict(draw(st.permutations(items)))
    kind = draw(st.sampled_from(["request", "chunk", "result"]))
    if kind == "request":
        return Request(id=draw(ids), model=draw(names), inputs=merged)
    if kind == "chunk":
        return Chunk(id=draw(ids), seq=draw(U62), outputs=merged)
    meta = draw(st.dictionaries(keys, scalars, max_size=3))
    return Result(id=draw(ids), outputs=merged, meta=meta)


# ---------------------------------------------------------------------------
# comparison

MESSAGE_TYPES = (Request, Chunk, Result, Error, Cancel, CapabilityRecord)


def _float_key(x: float) -> tuple[str, bytes | None]:
    return ("float", None if math.isnan(x) else struct.pack(">d", x))


def normalize(x: Any) -> Any:
    """A comparable form of a message or value: types and float bits kept exact."""
    if isinstance(x, MESSAGE_TYPES):
        fields = tuple((f.name, normalize(getattr(x, f.name))) for f in dataclasses.fields(x))
        return (type(x).__name__, *fields)
    if isinstance(x, Tensor):
        return ("tensor", x.dtype, tuple(x.shape), bytes(x.data))
    if isinstance(x, enum.Enum):
        return ("enum", type(x).__name__, x.value)
    if isinstance(x, bool):
        return ("bool", x)
    if isinstance(x, int):
        return ("int", x)
    if isinstance(x, float):
        return _float_key(x)
    if isinstance(x, str):
        return ("str", x)
    if isinstance(x, bytes | bytearray | memoryview):
        return ("bytes", bytes(x))
    if x is None:
        return None
    if isinstance(x, list | tuple):
        return ("list", tuple(normalize(i) for i in x))
    if isinstance(x, dict):
        return ("map", tuple((normalize(k), normalize(v)) for k, v in x.items()))
    raise AssertionError(f"unexpected value in a message: {x!r}")


def expected_on_wire(message: Message) -> Message:
    """What the peer decodes: Error text is cut at MAX_ERROR_TEXT characters."""
    from protocols.codec import MAX_ERROR_TEXT

    if isinstance(message, Error):
        return dataclasses.replace(message, message=message.message[:MAX_ERROR_TEXT])
    return message


# ---------------------------------------------------------------------------
# feeding


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def drain(decoder: Decoder, out: list[Message], limit: int) -> None:
    """Append every message the decoder has ready to ``out`` (kept if it then raises).

    Fails if more than ``limit`` messages come out: the decoder loop must end.
    """
    start = len(out)
    while (message := decoder.next_message()) is not None:
        out.append(message)
        if len(out) - start > limit:
            raise AssertionError("decoder yields more messages than bytes: it never ends")


def decode_pieces(pieces: Sequence[bytes], limits: Limits) -> list[Message]:
    """Feed ``pieces`` one by one, draining after each; ProtocolError propagates."""
    decoder = Decoder(limits)
    out: list[Message] = []
    total = sum(len(p) for p in pieces)
    for piece in pieces:
        decoder.feed(piece)
        # Every frame has at least 5 bytes (header + one msgpack byte), so a
        # message costs at least 5 bytes: more messages than bytes means a loop.
        drain(decoder, out, total)
    # Nothing whole may be left behind once next_message has said None.
    assert decoder.next_message() is None
    return out


def wire(message: Message, limits: Limits = SMALL) -> bytes:
    return b"".join(encode(message, limits))
