"""The index of a GGUF file: its scalar metadata and where each tensor lies, read cheaply.

A pipeline stage needs a few tensors of a GGUF file and a dozen numbers of
its metadata. ``gguf.GGUFReader`` (and transformers' GGUF config, which builds
one) parses every field into numpy objects, the tokenizer's 49,152 tokens and
48,900 merges one by one: for SmolLM2 that is ~9 s and ~150 MB each time, as
much as a middle stage's weights. This reads the header once, steps over the
arrays without keeping them, and answers each tensor as a read-only memory
map of its bytes, so only the pages of the tensors a stage asks for are ever
read. The layout (GGUF v2 and v3): magic, version, tensor count, KV count, the
KV pairs, the tensor infos, padding to ``general.alignment``, the data.

Raises ``BadGGUF`` (a ``ModelLoadError``) for a file that is not such a GGUF.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .errors import ModelLoadError

_SCALARS = {  # GGUF value type -> struct format
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
MAX_STRING = 1 << 24
MAX_ITEMS = 1 << 24


class BadGGUF(ModelLoadError):
    """The file is not a GGUF this reader understands."""


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: the fastest-varying dimension first
    ggml_type: int
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True, slots=True)
class GGUFIndex:
    path: Path
    metadata: dict[str, Any]  # scalars and strings; arrays are left out
    tensors: dict[str, TensorInfo]

    def raw(self, name: str) -> np.ndarray[Any, Any]:
        """The tensor's bytes as ``gguf.dequantize`` takes them: float32 in numpy order for
        F32, else uint8 rows (one row per outer index). Read-only, mapped."""
        info = self.tensors[name]
        data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=info.nbytes)
        shape = tuple(reversed(info.dims))
        if info.ggml_type == 0:
            return data.view(np.float32).reshape(shape)
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        return data.reshape((*shape[:-1], info.nbytes // max(rows, 1)))


def read_index(path: Path) -> GGUFIndex:
    """Parse ``path``'s header; BadGGUF when it is not one."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise BadGGUF(f"{path.name}: not a GGUF file")
        version = _unpack(f, "<I")
        if version not in (2, 3):
            raise BadGGUF(f"{path.name}: GGUF version {version}, this reads 2 and 3")
        tensor_count, kv_count = _unpack(f, "<Q"), _unpack(f, "<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = _string(f)
            kind = _unpack(f, "<I")
            value = _value(f, kind)
            if value is not None:
                metadata[key] = value
        infos = []
        for _ in range(tensor_count):
            name = _string(f)
            n_dims = _unpack(f, "<I")
            if n_dims > 8:
                raise BadGGUF(f"{path.name}: tensor {name} has {n_dims} dims")
            dims = tuple(_unpack(f, "<Q") for _ in range(n_dims))
            infos.append((name, dims, _unpack(f, "<I"), _unpack(f, "<Q")))
        alignment = int(metadata.get("general.alignment", 32))
        start = -(-f.tell() // alignment) * alignment
    tensors = {}
    for name, dims, ggml_type, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (KeyError, ValueError):
            raise BadGGUF(f"{path.name}: tensor {name} has unknown type {ggml_type}") from None
        nbytes = int(np.prod(dims)) // block * type_size
        at = start + offset
        if at + nbytes > size:
            raise BadGGUF(f"{path.name}: tensor {name} runs past the end of the file")
        tensors[name] = TensorInfo(name, dims, ggml_type, at, nbytes)
    return GGUFIndex(path, metadata, tensors)


def _unpack(f: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise BadGGUF("the GGUF header ends early")
    return struct.unpack(fmt, data)[0]


def _string(f: BinaryIO) -> str:
    length = _unpack(f, "<Q")
    if length > MAX_STRING:
        raise BadGGUF(f"a GGUF string of {length} bytes")
    data = f.read(length)
    if len(data) != length:
        raise BadGGUF("the GGUF header ends early")
    return data.decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int) -> Any:
    """A scalar or string; an array is stepped over (None)."""
    if kind == _STRING:
        return _string(f)
    if kind in _SCALARS:
        return _unpack(f, _SCALARS[kind])
    if kind != _ARRAY:
        raise BadGGUF(f"unknown GGUF value type {kind}")
    item, count = _unpack(f, "<I"), _unpack(f, "<Q")
    if count > MAX_ITEMS:
        raise BadGGUF(f"a GGUF array of {count} items")
    if item == _STRING:
        for _ in range(count):
            f.seek(_unpack(f, "<Q"), 1)
    elif item in _SCALARS:
        f.seek(struct.calcsize(_SCALARS[item]) * count, 1)
    else:
        for _ in range(count):
            _value(f, item)
    return None
