"""The failover decision alone: which errors send a job to the next candidate."""

from __future__ import annotations

import pytest

from node.errors import ConnectionLost, Overloaded, PeerUnavailable
from node.jobs.dispatch import may_fail_over
from protocols import ErrorCode, RemoteError, Request

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
