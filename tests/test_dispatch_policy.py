"""The failover decision alone: which errors send a job to the next candidate; and
what the planner tells the router of a request (its size, its hops, the paths)."""

from __future__ import annotations

import random

import pytest

from bootstrap.table import PeerTable, RecordVerified, apply
from node.errors import ConnectionLost, Overloaded, PeerUnavailable
from node.jobs.dispatch import RouterPlanner, may_fail_over, request_bytes
from node.jobs.router import LocalNode, Router, RouterConfig
from protocols import ErrorCode, RemoteError, Request, Tensor

IDEMPOTENT = Request(id="r", model="m", inputs={})
ONCE_ONLY = Request(id="r", model="m", inputs={}, idempotent=False)


@pytest.mark.parametrize(
    ("error", "idempotent", "once_only"),
    [
        (PeerUnavailable("nothing sent"), True, True),
        (Overloaded("queue full", retry_after_ms=50), True, True),
        (RemoteError(ErrorCode.OVERLOADED, "busy", retry_after_ms=10), True, True),
        (RemoteError(ErrorCode.NOT_EXECUTED, "draining"), True, True),
        (RemoteError(ErrorCode.MODEL_NOT_FOUND, "gone"), True, True),
        (ConnectionLost("broke after sending"), True, False),
        (RemoteError(ErrorCode.OUTCOME_UNKNOWN, "peer died"), True, False),
        (RemoteError(ErrorCode.INTERNAL, "runner crashed"), True, False),
        (RemoteError(ErrorCode.BAD_REQUEST, "wrong shape"), False, False),
        (RemoteError(ErrorCode.DEADLINE_EXCEEDED, "late"), False, False),
        (RemoteError(ErrorCode.CANCELLED, "caller went"), False, False),
        (RemoteError(ErrorCode.TOO_LARGE, "big"), False, False),
    ],
)
def test_what_fails_over(error: Exception, idempotent: bool, once_only: bool) -> None:
    assert may_fail_over(error, IDEMPOTENT) is idempotent  # type: ignore[arg-type]
    assert may_fail_over(error, ONCE_ONLY) is once_only  # type: ignore[arg-type]


def test_the_planner_gives_the_router_the_request_size_paths_and_hops() -> None:
    """A large tensor goes to a direct peer before a relayed one of the same load, and
    a job forwarded to us already is never sent on to an intermediary."""
    table = PeerTable()
    for pid, extra in (("direct", {}), ("relayed", {}), ("i", {"forwards": ["other"]})):
        model = {"name": "m" if pid != "i" else "x", "task": "t", "device": "CPU"}
        body = {"models": [model], "load": {"in_flight": 0}, **extra}
        table = apply(table, RecordVerified(pid, 1, body, at=1.0))
    router = Router("self", RouterConfig(max_attempts=3), rng=random.Random(3), clock=lambda: 1.0)
    planner = RouterPlanner(
        router, lambda: table, lambda: LocalNode([]), dict, lambda: {"relayed": "relayed"}
    )
    big = Tensor("uint8", (2 << 20,), bytes(2 << 20))
    assert request_bytes(Request("r", "m", {"t": big, "s": "héllo", "l": ["ab"]})) == (
        (2 << 20) + 6 + 2
    )
    for _ in range(20):
        plan = planner.plan(Request("r", "m", {"t": big}), frozenset(), False)
        assert [c.peer_id for c in plan] == ["direct", "relayed"]
    assert [c.via for c in planner.plan(Request("r", "other", {}), frozenset(), False)] == [True]
    assert planner.plan(Request("r", "other", {}, hops=1), frozenset(), False) == []
