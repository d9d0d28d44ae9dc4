"""Tensors on the wire: dtype + shape + raw little-endian bytes.

A tensor never travels as a list of numbers: it is a msgpack ``bin`` of its
buffer, so decoding is ``numpy.frombuffer`` (no copy) and encoding hands
msgpack the array's own memory. Everything a peer sends is checked before it
is trusted: the dtype is one of a closed set, the shape is small and
non-negative, and the byte count matches the shape exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import FrameTooLarge, RemoteProtocolError

DTYPES: frozenset[str] = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
    }
)
MAX_NDIM = 8


@dataclass(frozen=True, slots=True, eq=False)
class Tensor:
    """An n-d array as it rides the wire. ``data`` is little-endian, C order."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | bytearray | memoryview

    @property
    def nbytes(self) -> int:
        return memoryview(self.data).nbytes  # len() counts items of a typed view, not bytes

    @classmethod
    def from_numpy(cls, array: np.ndarray[Any, Any]) -> Tensor:
        """Wrap ``array`` without copying when it is already C-contiguous little-endian."""
        name = array.dtype.name
        if name not in DTYPES:
            raise ValueError(f"dtype {name} cannot travel; use one of {sorted(DTYPES)}")
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        if not array.flags.c_contiguous:  # (ascontiguousarray would turn 0-d into 1-d)
            array = array.copy(order="C")
        shape = tuple(int(d) for d in array.shape)
        if array.size == 0:  # memoryview cannot cast a view with a zero in its shape
            return cls(name, shape, b"")
        return cls(name, shape, array.data.cast("B"))

    def numpy(self) -> np.ndarray[Any, Any]:
        """A read-only (when the buffer is) view of the data: no copy."""
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(
            self.shape
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return (
            self.dtype == other.dtype
            and self.shape == other.shape
            and bytes(self.data) == bytes(other.data)
        )

    def __hash__(self) -> int:
        return hash((self.dtype, self.shape, bytes(self.data)))

    def __repr__(self) -> str:
        return f"Tensor({self.dtype}, shape={self.shape}, {self.nbytes} bytes)"


def expected_nbytes(dtype: object, shape: object, *, max_bytes: int) -> tuple[tuple[int, ...], int]:
    """Validate a peer-sent dtype and shape; return the shape and its byte count.

    Raises RemoteProtocolError for a bad dtype or shape and FrameTooLarge when the
    tensor would exceed ``max_bytes`` (checked before anything is allocated).
    """
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise RemoteProtocolError(f"tensor dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM:
        raise RemoteProtocolError(f"tensor shape must be a list of at most {MAX_NDIM} dims")
    dims: list[int] = []
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise RemoteProtocolError(f"tensor dim {dim!r} is not a non-negative int")
        dims.append(dim)
    itemsize = np.dtype(dtype).itemsize
    # Sized as if zero dims were 1: a [0, 2**64] tensor holds no bytes but cannot be viewed.
    if math.prod(d or 1 for d in dims) * itemsize > max_bytes:
        raise FrameTooLarge(f"tensor {dtype}{dims} exceeds the limit of {max_bytes} bytes")
    return tuple(dims), math.prod(dims) * itemsize
