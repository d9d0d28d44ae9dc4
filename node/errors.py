"""Errors of the node layer.

    SwarmError (protocols.errors)
    └── NodeError
        ├── PeerUnavailable    we could not reach the peer; nothing was sent: NOT_EXECUTED
        ├── ConnectionLost     the stream broke under us after the request left: OUTCOME_UNKNOWN
        ├── Overloaded         the admission queue is full: OVERLOADED, with retry_after_ms
        │   └── OverBudget     the peer is over one of its own limits (rate, in flight, queued)
        ├── ShuttingDown       the node is draining and takes no new work: NOT_EXECUTED
        ├── Interrupted        the node shut down while it ran: OUTCOME_UNKNOWN
        ├── DeadlineExceeded   the request's deadline passed: DEADLINE_EXCEEDED
        └── Unauthorized       the peer may not use this node: UNAUTHORIZED

A bad flag or config value is ``protocols.ConfigError``, shared by every layer.

"We closed it" is not an error: a stream we close ourselves ends quietly.
"""

from __future__ import annotations

from protocols import ErrorCode, SwarmError


class NodeError(SwarmError):
    code = ErrorCode.INTERNAL


class PeerUnavailable(NodeError):
    code = ErrorCode.NOT_EXECUTED


class ConnectionLost(NodeError):
    code = ErrorCode.OUTCOME_UNKNOWN


class Overloaded(NodeError):
    code = ErrorCode.OVERLOADED

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class OverBudget(Overloaded):
    """The peer that sent the job is over its own limit here (``reason``: ``rate``,
    ``in_flight`` or ``queued``; see ``node.jobs.fairness``)."""

    def __init__(self, message: str, reason: str, retry_after_ms: int) -> None:
        super().__init__(message, retry_after_ms=retry_after_ms)
        self.reason = reason


class ShuttingDown(NodeError):
    code = ErrorCode.NOT_EXECUTED


class DeadlineExceeded(NodeError):
    code = ErrorCode.DEADLINE_EXCEEDED


class Unauthorized(NodeError):
    code = ErrorCode.UNAUTHORIZED


class Interrupted(NodeError):
    """The node shut down while the work was running: it may or may not have finished."""

    code = ErrorCode.OUTCOME_UNKNOWN


def sole_error(exc: BaseException) -> BaseException:
    """The one error inside nested one-member exception groups, or ``exc`` itself.

    Nurseries (ours and libp2p's) wrap whatever ends them in a group; a caller
    that hit one error should see that error, not layers of wrapping.
    """
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
