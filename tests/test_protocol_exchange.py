"""The exchange state machine, from both ends of a stream.

The table is written out again here, independently, from the design (the
diagram in protocols/exchange.py and messages.py); random sequences of messages
from both roles must follow it exactly or raise the right ProtocolError: Local
when we send what we may not, Remote when the peer does.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols import (
    Cancel,
    CapabilityRecord,
    Chunk,
    Error,
    ErrorCode,
    Exchange,
    LocalProtocolError,
    Message,
    ProtocolError,
    RemoteProtocolError,
    Request,
    Result,
    Role,
    State,
)

CALLER, SERVER = Role.CALLER, Role.SERVER


def req(id: str = "a", **kw: object) -> Request:
    kw.setdefault("stream", True)  # most exchanges here carry chunks
    return Request(id, "m", {}, **kw)  # type: ignore[arg-type]


def chunk(seq: int, id: str = "a") -> Chunk:
    return Chunk(id, seq, {"tok": str(seq)})


def result(id: str = "a") -> Result:
    return Result(id, {"y": 1})


def error(id: str = "a", code: ErrorCode = ErrorCode.INTERNAL) -> Error:
    return Error(id, code, "failed")


CAPS = CapabilityRecord("peer", 1, 60, {})


def both_ends() -> tuple[Exchange, Exchange]:
    return Exchange(CALLER), Exchange(SERVER)


def deliver(sender: Exchange, receiver: Exchange, message: Message) -> None:
    sender.send(message)
    receiver.receive(message)
    assert sender.state is receiver.state


def run(sequence: list[tuple[Role, Message]]) -> tuple[Exchange, Exchange]:
    caller, server = both_ends()
    for who, message in sequence:
        if who is CALLER:
            deliver(caller, server, message)
        else:
            deliver(server, caller, message)
    return caller, server


# ---------------------------------------------------------------------------
# happy paths


def test_starts_idle() -> None:
    for role in Role:
        exchange = Exchange(role)
        assert exchange.state is State.IDLE and exchange.role is role


def test_request_then_result() -> None:
    caller, server = both_ends()
    deliver(caller, server, req())
    assert caller.state is State.ACTIVE and caller.request_id == server.request_id == "a"
    deliver(server, caller, result())
    assert caller.state is server.state is State.IDLE


def test_request_then_chunks_then_result() -> None:
    caller, server = run([(CALLER, req(stream=True))])
    for seq in range(4):
        deliver(server, caller, chunk(seq))
        assert caller.state is State.ACTIVE
    assert caller.next_seq == server.next_seq == 4
    deliver(server, caller, result())
    assert caller.state is State.IDLE


def test_request_then_error() -> None:
    caller, _ = run([(CALLER, req()), (SERVER, chunk(0)), (SERVER, error())])
    assert caller.state is State.IDLE


def test_chunks_only_for_a_request_that_streams() -> None:
    caller, server = run([(CALLER, req(stream=False))])
    with pytest.raises(LocalProtocolError):
        server.send(chunk(0))
    with pytest.raises(RemoteProtocolError):
        caller.receive(chunk(0))
    deliver(server, caller, result())
    assert caller.state is server.state is State.IDLE


def test_request_cancel_chunks_error() -> None:
    caller, server = run([(CALLER, req(stream=True)), (SERVER, chunk(0))])
    deliver(caller, server, Cancel("a"))
    assert caller.state is State.CANCELLING
    deliver(server, caller, chunk(1))  # already in flight: still in order
    deliver(server, caller, chunk(2))
    deliver(caller, server, Cancel("a"))  # a second Cancel is harmless
    assert caller.state is State.CANCELLING
    deliver(server, caller, error(code=ErrorCode.CANCELLED))
    assert caller.state is server.state is State.IDLE


def test_cancel_then_result_anyway() -> None:
    caller, _ = run([(CALLER, req()), (CALLER, Cancel("a")), (SERVER, result())])
    assert caller.state is State.IDLE


def test_stream_reuse() -> None:
    caller, server = run(
        [
            (CALLER, req("a")),
            (SERVER, chunk(0, "a")),
            (SERVER, chunk(1, "a")),
            (SERVER, result("a")),
        ]
    )
    deliver(caller, server, req("b"))
    assert caller.request_id == "b" and caller.next_seq == 0
    deliver(server, caller, chunk(0, "b"))  # seq starts again at 0
    with pytest.raises(RemoteProtocolError):
        caller.receive(result("a"))  # the old id is over
    deliver(server, caller, error("b"))
    deliver(caller, server, req("a"))  # an id may come back once its exchange is over
    deliver(server, caller, result("a"))
    assert caller.state is State.IDLE


def test_late_cancel_in_idle_is_ignored() -> None:
    caller, server = run([(CALLER, req()), (SERVER, result())])
    # The Cancel crossed the Result on the wire: a race, not a fault.
    server.receive(Cancel("a"))
    assert server.state is State.IDLE
    caller.send(Cancel("a"))
    assert caller.state is State.IDLE
    server.receive(Cancel("some-other-id"))
    assert server.state is State.IDLE
    deliver(caller, server, req("b"))  # the stream still works
    assert server.state is State.ACTIVE


def test_server_error_in_idle_closes_the_stream() -> None:
    caller, server = both_ends()
    deliver(server, caller, Error("", ErrorCode.UNAUTHORIZED, "not allowed"))
    assert caller.state is server.state is State.CLOSED
    with pytest.raises(LocalProtocolError):
        caller.send(req())
    with pytest.raises(RemoteProtocolError):
        server.receive(req())
    with pytest.raises(LocalProtocolError):
        caller.send(Cancel("a"))
    with pytest.raises(LocalProtocolError):
        server.send(error())


# ---------------------------------------------------------------------------
# violations


def test_ids_must_match() -> None:
    for late in (chunk(0, "b"), result("b"), error("b")):
        caller, server = run([(CALLER, req("a"))])
        with pytest.raises(RemoteProtocolError):
            caller.receive(late)
        with pytest.raises(LocalProtocolError):
            server.send(late)
    caller, server = run([(CALLER, req("a"))])
    with pytest.raises(LocalProtocolError):
        caller.send(Cancel("b"))
    with pytest.raises(RemoteProtocolError):
        server.receive(Cancel("b"))
    caller, server = run([(CALLER, req("a")), (CALLER, Cancel("a"))])
    with pytest.raises(RemoteProtocolError):
        caller.receive(result("b"))
    with pytest.raises(RemoteProtocolError):
        server.receive(Cancel("b"))


@pytest.mark.parametrize(
    "seqs",
    [[1], [0, 0], [0, 2], [0, 1, 1], [0, 1, 3], [5]],
    ids=str,
)
@pytest.mark.parametrize("cancelled", [False, True])
def test_chunk_seq_must_be_in_order(seqs: list[int], cancelled: bool) -> None:
    prefix = [(CALLER, req(stream=True))] + ([(CALLER, Cancel("a"))] if cancelled else [])
    caller, server = run(prefix)
    *good, bad = seqs
    for seq in good:
        deliver(server, caller, chunk(seq))
    with pytest.raises(RemoteProtocolError, match="out of order"):
        caller.receive(chunk(bad))
    with pytest.raises(LocalProtocolError, match="out of order"):
        server.send(chunk(bad))


@pytest.mark.parametrize(
    ("prefix", "who", "message"),
    [
        ([], SERVER, chunk(0)),
        ([], SERVER, result()),
        ([], CALLER, error()),
        ([], CALLER, chunk(0)),
        ([], SERVER, req()),
        ([], SERVER, Cancel("a")),
        ([(CALLER, req())], CALLER, req("b")),
        ([(CALLER, req())], CALLER, req("a")),
        ([(CALLER, req())], CALLER, result()),
        ([(CALLER, req())], CALLER, chunk(0)),
        ([(CALLER, req())], SERVER, Cancel("a")),
        ([(CALLER, req())], SERVER, req("b")),
        ([(CALLER, req()), (CALLER, Cancel("a"))], CALLER, req("b")),
        ([(CALLER, req()), (CALLER, Cancel("a"))], CALLER, error()),
        ([(SERVER, error())], SERVER, error()),
        ([(SERVER, error())], CALLER, req()),
    ],
)
def test_out_of_table_messages(
    prefix: list[tuple[Role, Message]], who: Role, message: Message
) -> None:
    caller, server = run(prefix)
    sender, receiver = (caller, server) if who is CALLER else (server, caller)
    before = sender.state
    with pytest.raises(LocalProtocolError):
        sender.send(message)
    with pytest.raises(RemoteProtocolError):
        receiver.receive(message)
    assert before is receiver.state


@pytest.mark.parametrize(
    "prefix",
    [[], [(CALLER, req())], [(CALLER, req()), (CALLER, Cancel("a"))], [(SERVER, error())]],
    ids=["idle", "active", "cancelling", "closed"],
)
def test_capability_record_never_rides_an_infer_stream(prefix: list[tuple[Role, Message]]) -> None:
    for role in Role:
        caller, server = run(prefix)
        exchange = caller if role is CALLER else server
        with pytest.raises(LocalProtocolError):
            exchange.send(CAPS)
        with pytest.raises(RemoteProtocolError):
            exchange.receive(CAPS)


def test_local_and_remote_are_both_protocol_errors() -> None:
    assert issubclass(LocalProtocolError, ProtocolError)
    assert issubclass(RemoteProtocolError, ProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)
    assert not issubclass(RemoteProtocolError, LocalProtocolError)


# ---------------------------------------------------------------------------
# random sequences against a model of the table


@dataclass
class Model:
    """The transition table as the design states it, written out independently."""

    state: State = State.IDLE
    request_id: str | None = None
    next_seq: int = 0

    def allows(self, sender: Role, m: Message) -> bool:
        s = self.state
        if isinstance(m, CapabilityRecord) or s is State.CLOSED:
            return False
        if s is State.IDLE:
            return (sender is CALLER and isinstance(m, Request | Cancel)) or (
                sender is SERVER and isinstance(m, Error)
            )
        if sender is SERVER and isinstance(m, Error) and not m.id:
            return True  # a stream-level refusal is allowed at any point
        if m.id != self.request_id:
            return False
        if sender is CALLER:
            return isinstance(m, Cancel)
        if isinstance(m, Chunk):
            return m.seq == self.next_seq
        return isinstance(m, Result | Error)

    def apply(self, sender: Role, m: Message) -> None:
        assert self.allows(sender, m)
        if isinstance(m, Request):
            self.state, self.request_id, self.next_seq = State.ACTIVE, m.id, 0
        elif isinstance(m, Chunk):
            self.next_seq += 1
        elif isinstance(m, Cancel):
            if self.state is State.ACTIVE:
                self.state = State.CANCELLING
        elif isinstance(m, Error) and not m.id:
            self.state = State.CLOSED  # a stream-level refusal ends any exchange
        elif isinstance(m, Result | Error):
            self.state = State.CLOSED if self.state is State.IDLE else State.IDLE

    def valid_next(self) -> list[tuple[Role, Message]]:
        rid = self.request_id or "a"
        if self.state is State.CLOSED:
            return []
        if self.state is State.IDLE:
            return [
                (CALLER, req("a")),
                (CALLER, req("b")),
                (CALLER, Cancel(rid)),
                (SERVER, error("")),
            ]
        return [
            (SERVER, chunk(self.next_seq, rid)),
            (SERVER, result(rid)),
            (SERVER, error(rid)),
            (SERVER, error("")),
            (CALLER, Cancel(rid)),
        ]


ids = st.sampled_from(["a", "b", ""])
any_message = st.one_of(
    st.builds(req, ids),
    st.builds(chunk, st.integers(0, 3), ids),
    st.builds(result, ids),
    st.builds(error, ids),
    st.builds(Cancel, ids),
    st.just(CAPS),
)
events = st.tuples(st.sampled_from(Role), any_message)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_random_sequences_follow_the_table_or_raise(data: st.DataObject) -> None:
    model = Model()
    caller, server = both_ends()
    for _ in range(data.draw(st.integers(1, 30))):
        options = model.valid_next()
        if options and data.draw(st.integers(0, 3)) > 0:  # mostly legal, to reach deep states
            who, message = data.draw(st.sampled_from(options))
        else:
            who, message = data.draw(events)
        sender, receiver = (caller, server) if who is CALLER else (server, caller)
        if model.allows(who, message):
            sender.send(message)
            receiver.receive(message)
            model.apply(who, message)
            assert caller.state is server.state is model.state
            if model.state is not State.IDLE or isinstance(message, Request):
                assert caller.request_id == server.request_id == model.request_id
                assert caller.next_seq == server.next_seq == model.next_seq
        else:
            # Sending it is our bug; receiving it is the peer's fault.
            with pytest.raises(LocalProtocolError):
                sender.send(message)
            with pytest.raises(RemoteProtocolError):
                receiver.receive(message)
            return


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(Role), st.lists(events, max_size=12))
def test_any_sequence_on_one_end_only_raises_protocol_errors(
    role: Role, sequence: list[tuple[Role, Message]]
) -> None:
    exchange = Exchange(role)
    model = Model()
    for who, message in sequence:
        ours = who is role
        if model.allows(who, message):
            (exchange.send if ours else exchange.receive)(message)
            model.apply(who, message)
            assert exchange.state is model.state
        else:
            with pytest.raises(LocalProtocolError if ours else RemoteProtocolError):
                (exchange.send if ours else exchange.receive)(message)
            break
