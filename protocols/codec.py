"""Framing and encoding, without I/O: bytes in, messages out, and back.

A frame is a 4-byte big-endian length and one msgpack map. The length a peer
sends is checked against ``Limits.max_frame`` before anything is buffered for
it, msgpack is told the same caps, and every field is type-checked before a
message object exists. A tensor too large for one frame is sent *deferred*: the
message carries its dtype and shape, and its bytes follow in ``part`` frames
that the decoder reassembles into one buffer (its size checked before it is
allocated). Parts are framing only; callers see whole messages.

Any byte string, in any chunking, gives messages or a ``ProtocolError``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from .codes import ErrorCode
from .errors import (
    ConfigError,
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from .messages import (
    MAX_HEDGE_MS,
    MAX_ID_LEN,
    MAX_NAME_LEN,
    MAX_STRATEGY_LEN,
    MAX_VERIFY,
    Cancel,
    CapabilityRecord,
    Chunk,
    Error,
    Message,
    Param,
    Priority,
    Request,
    Result,
    Scalar,
    Value,
)
from .tensors import Tensor, expected_nbytes

_HEADER = struct.Struct(">I")
_NEED_DATA = object()  # not None: a frame may legitimately decode to msgpack nil
MAX_ERROR_TEXT = 4096


class MessageTooLarge(LocalProtocolError):
    """What we were asked to send does not fit the limits."""

    code = ErrorCode.TOO_LARGE


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard caps on what a peer may make us buffer."""

    max_frame: int = 2 * 1024 * 1024  # payload bytes of one frame
    part_size: int = 1024 * 1024  # tensor bytes per part frame
    max_message: int = 256 * 1024 * 1024  # all tensor bytes of one message
    max_items: int = 4096  # entries of one msgpack array or map

    def __post_init__(self) -> None:
        if not 0 < self.part_size <= self.max_frame - 1024:
            raise ConfigError("part_size must be positive and leave 1 KiB of a frame for framing")
        if self.max_message < self.part_size or self.max_items < 16:
            raise ConfigError("max_message must hold one part and max_items at least 16")


DEFAULT_LIMITS = Limits()


# ---------------------------------------------------------------------------
# encoding


def encode(message: Message, limits: Limits = DEFAULT_LIMITS) -> list[bytes]:
    """Frames (length prefix included) that carry ``message``, in order."""
    deferred: list[memoryview] = []
    budget = [limits.part_size]  # inline tensor bytes left for the first frame

    def value(v: Value) -> Any:
        if isinstance(v, Tensor):
            entry: dict[str, Any] = {"dtype": v.dtype, "shape": list(v.shape)}
            if v.nbytes <= budget[0]:
                budget[0] -= v.nbytes
                entry["data"] = v.data
            else:
                entry["deferred"] = True
                deferred.append(memoryview(v.data).cast("B"))
            return entry
        return v

    def values(m: Mapping[str, Value]) -> dict[str, Any]:
        return {k: value(v) for k, v in m.items()}

    body: dict[str, Any]
    match message:
        case Request():
            body = {
                "t": "request",
                "id": message.id,
                "model": message.model,
                "inputs": values(message.inputs),
                "params": dict(message.params),
                "priority": int(message.priority),
                "deadline_ms": message.deadline_ms,
                "stream": message.stream,
                "idempotent": message.idempotent,
                "hops": message.hops,
            }
            if message.strategy is not None:  # absent unless asked: old peers never see it
                body["strategy"] = message.strategy
            if message.origin is not None:  # set on forwarded jobs (a client never needs to)
                body["origin"] = message.origin
            if message.verify:  # likewise
                body["verify"] = message.verify
            if message.hedge_ms is not None:  # likewise: a client's, for its first node
                body["hedge_ms"] = message.hedge_ms
        case Chunk():
            body = {
                "t": "chunk",
                "id": message.id,
                "seq": message.seq,
                "outputs": values(message.outputs),
            }
        case Result():
            body = {
                "t": "result",
                "id": message.id,
                "outputs": values(message.outputs),
                "meta": dict(message.meta),
            }
        case Error():
            body = {
                "t": "error",
                "id": message.id,
                "code": str(message.code),
                "message": message.message[:MAX_ERROR_TEXT],
                "retry_after_ms": message.retry_after_ms,
            }
        case Cancel():
            body = {"t": "cancel", "id": message.id}
        case CapabilityRecord():
            body = {
                "t": "caps",
                "peer_id": message.peer_id,
                "seq": message.seq,
                "ttl_s": message.ttl_s,
                "body": dict(message.body),
                "signature": message.signature,
            }
        case _:
            raise LocalProtocolError(f"not a message: {message!r}")
    _check_outgoing(body, limits)
    frames = [_frame(body, limits)]
    for data in deferred:
        for start in range(0, len(data), limits.part_size):
            frames.append(
                _frame({"t": "part", "data": data[start : start + limits.part_size]}, limits)
            )
    return frames


def _check_outgoing(body: dict[str, Any], limits: Limits) -> None:
    """Refuse to send what a peer's decoder would refuse: our bug, not the peer's."""
    try:
        _message_from_wire(body, [], limits)
    except FrameTooLarge as exc:
        raise MessageTooLarge(str(exc)) from exc
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"refusing to send a malformed message: {exc}") from exc


def _frame(body: Mapping[str, Any], limits: Limits) -> bytes:
    try:
        payload: bytes = msgpack.packb(body, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {body.get('t')} message: {exc}") from exc
    if len(payload) > limits.max_frame:
        raise MessageTooLarge(
            f"{body.get('t')} message of {len(payload)} bytes exceeds max_frame={limits.max_frame}"
        )
    return _HEADER.pack(len(payload)) + payload


# ---------------------------------------------------------------------------
# decoding


class Decoder:
    """Feed it bytes; take whole messages out. Sans-IO, one per stream direction.

    After a ``ProtocolError`` the decoder is poisoned: every later call raises
    the same error, since the byte stream can no longer be trusted.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._error: ProtocolError | None = None
        # A message waiting for its deferred tensors, and their buffers still to fill. The
        # buffers grow as parts arrive, so a small frame declaring a large tensor costs
        # nothing until the bytes are really sent.
        self._waiting: Message | None = None
        self._targets: list[_Target] = []

    @property
    def idle(self) -> bool:
        """No partial frame or message buffered: a clean place for the stream to end."""
        return not self._buf and self._waiting is None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is None:  # a failed stream is not worth buffering
            self._buf += data

    def next_message(self) -> Message | None:
        """The next whole message, or None until more bytes are fed."""
        if self._error is not None:
            raise self._error
        try:
            while True:
                payload = self._take_frame()
                if payload is _NEED_DATA:
                    return None
                message = self._on_frame(payload)
                if message is not None:
                    return message
        except ProtocolError as exc:
            self._error = exc
            raise

    def messages(self) -> Iterator[Message]:
        while (message := self.next_message()) is not None:
            yield message

    def _take_frame(self) -> Any:
        buf = self._buf
        if len(buf) < _HEADER.size:
            return _NEED_DATA
        (length,) = _HEADER.unpack_from(buf)
        if length > self._limits.max_frame:
            raise FrameTooLarge(
                f"frame of {length} bytes exceeds max_frame={self._limits.max_frame}"
            )
        if length == 0:
            raise RemoteProtocolError("empty frame")
        end = _HEADER.size + length
        if len(buf) < end:
            return _NEED_DATA
        view = memoryview(buf)
        frame = view[_HEADER.size : end]
        try:
            obj = msgpack.unpackb(
                frame,
                raw=False,
                strict_map_key=True,
                max_str_len=self._limits.max_frame,
                max_bin_len=self._limits.max_frame,
                max_array_len=self._limits.max_items,
                max_map_len=self._limits.max_items,
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises many types for bad input; all mean "malformed"
            raise RemoteProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from exc
        finally:
            frame.release()
            view.release()
        del buf[:end]
        return obj

    def _on_frame(self, obj: Any) -> Message | None:
        if not isinstance(obj, dict):
            raise RemoteProtocolError("a frame must hold a msgpack map")
        tag = obj.get("t")
        if tag == "part":
            return self._on_part(obj)
        if self._waiting is not None:
            raise RemoteProtocolError(f"expected a tensor part, got {tag!r}")
        targets: list[_Target] = []
        message = _message_from_wire(obj, targets, self._limits)
        if targets:
            self._waiting, self._targets = message, targets
            return None
        return message

    def _on_part(self, obj: dict[str, Any]) -> Message | None:
        data = obj.get("data")
        if self._waiting is None:
            raise RemoteProtocolError("tensor part with no message waiting for it")
        if not isinstance(data, bytes) or not data or len(obj) != 2:
            raise RemoteProtocolError("a part must be {t: part, data: non-empty bin}")
        target = self._targets[0]
        if len(target.buffer) + len(data) > target.size:
            raise RemoteProtocolError("tensor part overruns its tensor")
        target.buffer.extend(data)
        if len(target.buffer) == target.size:
            self._targets.pop(0)
        if self._targets:
            return None
        message, self._waiting = self._waiting, None
        return message


# ---------------------------------------------------------------------------
# wire map -> message, checking every field


@dataclass(frozen=True, slots=True)
class _Target:
    buffer: bytearray  # the deferred tensor's data, filled by parts
    size: int


def _message_from_wire(obj: dict[str, Any], targets: list[_Target], limits: Limits) -> Message:
    tag = obj.get("t")
    f = _Fields(obj, str(tag))
    match tag:
        case "request":
            budget = [limits.max_message]
            priority = f.integer("priority", int(Priority.NORMAL))
            if priority not in tuple(Priority):
                raise RemoteProtocolError(f"unknown priority {priority}")
            deadline = f.opt_integer("deadline_ms")
            verify = f.integer("verify", 0)
            if verify > MAX_VERIFY:
                raise RemoteProtocolError(f"request.verify must be at most {MAX_VERIFY}")
            hedge_ms = f.opt_integer("hedge_ms")
            if hedge_ms is not None and hedge_ms > MAX_HEDGE_MS:
                raise RemoteProtocolError(f"request.hedge_ms must be at most {MAX_HEDGE_MS}")
            message: Message = Request(
                id=f.ident(),
                model=f.text("model", max_len=MAX_NAME_LEN),
                inputs=_values(f.mapping("inputs"), targets, budget, limits),
                params=_params(f.mapping("params", {}), limits),
                priority=Priority(priority),
                deadline_ms=deadline,
                stream=f.boolean("stream", False),
                idempotent=f.boolean("idempotent", True),
                hops=f.integer("hops", 0),
                strategy=f.opt_text("strategy", max_len=MAX_STRATEGY_LEN),
                origin=f.opt_text("origin", max_len=MAX_ID_LEN),
                verify=verify,
                hedge_ms=hedge_ms,
            )
        case "chunk":
            message = Chunk(
                id=f.ident(),
                seq=f.integer("seq"),
                outputs=_values(f.mapping("outputs"), targets, [limits.max_message], limits),
            )
        case "result":
            message = Result(
                id=f.ident(),
                outputs=_values(f.mapping("outputs"), targets, [limits.max_message], limits),
                meta=_scalars(f.mapping("meta", {}), limits),
            )
        case "error":
            code_text = f.text("code")
            try:
                code = ErrorCode(code_text)
            except ValueError:
                raise RemoteProtocolError(f"unknown error code {code_text!r}") from None
            message = Error(
                id=f.text("id", max_len=MAX_ID_LEN),
                code=code,
                message=f.text("message", max_len=MAX_ERROR_TEXT),
                retry_after_ms=f.opt_integer("retry_after_ms"),
            )
        case "cancel":
            message = Cancel(id=f.ident())
        case "caps":
            message = CapabilityRecord(
                peer_id=f.text("peer_id", max_len=MAX_NAME_LEN),
                seq=f.integer("seq"),
                ttl_s=f.integer("ttl_s"),
                body=f.mapping("body"),
                signature=f.binary("signature", b""),
            )
        case _:
            raise RemoteProtocolError(f"unknown message tag {tag!r}")
    f.check_no_extra()
    return message


_MISSING = object()


class _Fields:
    """Typed reads from a peer-sent map; anything off is a RemoteProtocolError."""

    def __init__(self, obj: dict[str, Any], tag: str) -> None:
        self._obj, self._tag, self._seen = obj, tag, {"t"}

    def _get(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        value = self._obj.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise RemoteProtocolError(f"{self._tag} message lacks {key!r}")
            return default
        return value

    def _bad(self, key: str, want: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"{self._tag}.{key} must be {want}")

    def text(self, key: str, default: Any = _MISSING, *, max_len: int = 1 << 20) -> Any:
        v = self._get(key, default)
        if not isinstance(v, str) or len(v) > max_len:
            raise self._bad(key, f"a string of at most {max_len} characters")
        return v

    def opt_text(self, key: str, *, max_len: int) -> Any:
        return None if self._get(key, None) is None else self.text(key, max_len=max_len)

    def ident(self) -> Any:
        v = self.text("id", max_len=MAX_ID_LEN)
        if not v:
            raise self._bad("id", "a non-empty string")
        return v

    def integer(self, key: str, default: Any = _MISSING) -> Any:
        v = self._get(key, default)
        if type(v) is not int or v < 0 or v > 1 << 62:
            raise self._bad(key, "a non-negative int")
        return v

    def opt_integer(self, key: str) -> Any:
        return None if self._get(key, None) is None else self.integer(key)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self._bad(key, "a bool")
        return v

    def binary(self, key: str, default: Any = _MISSING) -> Any:
        v = self._get(key, default)
        if not isinstance(v, bytes):
            raise self._bad(key, "bin")
        return v

    def mapping(self, key: str, default: Any = _MISSING) -> Any:
        v = self._get(key, default)
        if not isinstance(v, dict):
            raise self._bad(key, "a map")
        return v

    def check_no_extra(self) -> None:
        extra = set(self._obj) - self._seen
        if extra:
            raise RemoteProtocolError(f"{self._tag} message has unknown fields {sorted(extra)}")


def _keys(m: dict[Any, Any], what: str, limits: Limits) -> None:
    # msgpack's strict_map_key admits bin keys too; ours are always text.
    if len(m) > limits.max_items or not all(isinstance(k, str) for k in m):
        raise RemoteProtocolError(f"{what} must be a map of at most {limits.max_items} str keys")


def _values(
    m: dict[str, Any], targets: list[_Target], budget: list[int], limits: Limits
) -> dict[str, Value]:
    _keys(m, "inputs and outputs", limits)
    out: dict[str, Value] = {}
    for key, v in m.items():
        if isinstance(v, dict):
            out[key] = _tensor(key, v, targets, budget)
        elif isinstance(v, list):
            if len(v) > limits.max_items or not all(isinstance(s, str) for s in v):
                raise RemoteProtocolError(f"value {key!r}: a list must hold only strings")
            out[key] = v
        elif isinstance(v, str | int | float | bool):
            out[key] = v
        else:
            raise RemoteProtocolError(f"value {key!r} has unsupported type {type(v).__name__}")
    return out


def _tensor(key: str, v: dict[str, Any], targets: list[_Target], budget: list[int]) -> Tensor:
    extra = set(v) - {"dtype", "shape", "data", "deferred"}
    if extra or "dtype" not in v or "shape" not in v or ("data" in v) == ("deferred" in v):
        raise RemoteProtocolError(f"tensor {key!r} must have dtype, shape and data or deferred")
    shape, nbytes = expected_nbytes(v["dtype"], v["shape"], max_bytes=budget[0])
    budget[0] -= nbytes
    if "deferred" in v:
        if v["deferred"] is not True or nbytes == 0:
            raise RemoteProtocolError(
                f"tensor {key!r}: deferred must be true, for a non-empty tensor"
            )
        target = _Target(bytearray(), nbytes)
        targets.append(target)
        return Tensor(v["dtype"], shape, target.buffer)
    data = v["data"]
    # Peers send bytes; a message we are about to send may hold any buffer.
    if not isinstance(data, bytes | bytearray | memoryview) or memoryview(data).nbytes != nbytes:
        raise RemoteProtocolError(
            f"tensor {key!r}: {v['dtype']}{list(shape)} needs {nbytes} bytes of data"
        )
    return Tensor(v["dtype"], shape, data)


def _scalars(m: dict[str, Any], limits: Limits) -> dict[str, Scalar]:
    _keys(m, "meta", limits)
    for key, v in m.items():
        if v is not None and not isinstance(v, str | int | float | bool):
            raise RemoteProtocolError(f"meta {key!r} must be a scalar")
    return m


def _params(m: dict[str, Any], limits: Limits) -> dict[str, Param]:
    _keys(m, "params", limits)
    for key, v in m.items():
        if isinstance(v, list):
            if len(v) > limits.max_items or not all(isinstance(s, str) for s in v):
                raise RemoteProtocolError(f"param {key!r}: a list must hold only strings")
        elif v is not None and not isinstance(v, str | int | float | bool):
            raise RemoteProtocolError(f"param {key!r} must be a scalar or a list of strings")
    return m
