"""The lifecycle of one exchange on a stream, as a transition table.

Both ends run the same machine. ``send`` checks what we are about to write
(a violation is our bug: LocalProtocolError); ``receive`` checks what the
peer wrote (a violation is theirs: RemoteProtocolError)::

    IDLE --Request--> ACTIVE --Chunk--> ACTIVE --Result|Error--> IDLE
                        |                                         ^
                        +--Cancel--> CANCELLING --Chunk*, Result|Error
    any  --Error with id ""--> CLOSED   (the server refuses the stream itself)

A Cancel that crosses the Result on the wire arrives in IDLE and is ignored:
it is a race, not a fault. Chunks must arrive in sequence, so a duplicated or
lost chunk is caught rather than passed to the caller, and only a request
that asked to stream may get chunks.
"""

from __future__ import annotations

import enum

from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .messages import Cancel, CapabilityRecord, Chunk, Error, Message, Request, Result


class Role(enum.Enum):
    CALLER = "caller"
    SERVER = "server"


class State(enum.Enum):
    IDLE = "idle"
    ACTIVE = "active"
    CANCELLING = "cancelling"
    CLOSED = "closed"


# (state, who sends, message type) -> next state
_TRANSITIONS: dict[tuple[State, Role, type], State] = {
    (State.IDLE, Role.CALLER, Request): State.ACTIVE,
    (State.IDLE, Role.CALLER, Cancel): State.IDLE,
    (State.IDLE, Role.SERVER, Error): State.CLOSED,
    (State.ACTIVE, Role.SERVER, Chunk): State.ACTIVE,
    (State.ACTIVE, Role.SERVER, Result): State.IDLE,
    (State.ACTIVE, Role.SERVER, Error): State.IDLE,
    (State.ACTIVE, Role.CALLER, Cancel): State.CANCELLING,
    (State.CANCELLING, Role.SERVER, Chunk): State.CANCELLING,
    (State.CANCELLING, Role.SERVER, Result): State.IDLE,
    (State.CANCELLING, Role.SERVER, Error): State.IDLE,
    (State.CANCELLING, Role.CALLER, Cancel): State.CANCELLING,
}


class Exchange:
    """Tracks one stream from one side's point of view."""

    def __init__(self, role: Role) -> None:
        self.role = role
        self.state = State.IDLE
        self.request_id: str | None = None
        self.streaming = False
        self.next_seq = 0

    def send(self, message: Message) -> None:
        self._apply(self.role, message, LocalProtocolError)

    def receive(self, message: Message) -> None:
        other = Role.SERVER if self.role is Role.CALLER else Role.CALLER
        self._apply(other, message, RemoteProtocolError)

    def _apply(self, sender: Role, message: Message, error: type[ProtocolError]) -> None:
        key = (self.state, sender, type(message))
        nxt = _TRANSITIONS.get(key)
        if isinstance(message, Error) and not message.id and sender is Role.SERVER:
            if self.state is State.CLOSED:
                raise error("the stream was already refused")
            self.state = State.CLOSED  # a stream-level refusal ends any exchange
            return
        if nxt is None or isinstance(message, CapabilityRecord):
            raise error(
                f"{sender.value} may not send {type(message).__name__} in {self.state.value}"
            )
        if isinstance(message, Request):
            self.request_id, self.streaming, self.next_seq = message.id, message.stream, 0
        elif self.state is not State.IDLE:
            if message.id != self.request_id:
                raise error(
                    f"{type(message).__name__} for {message.id!r}, "
                    f"but the exchange is {self.request_id!r}"
                )
            if isinstance(message, Chunk):
                if not self.streaming:
                    raise error("chunk for a request that did not ask to stream")
                if message.seq != self.next_seq:
                    raise error(f"chunk {message.seq} out of order, expected {self.next_seq}")
                self.next_seq += 1
        self.state = nxt
