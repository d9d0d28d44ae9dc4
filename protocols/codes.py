"""Error codes of the wire, and what each tells a caller about retrying.

A caller that gets an error must decide at once whether the same work may be
sent to another peer. The answer depends only on the code, so it lives here as
data: ``ELSEWHERE`` (nothing ran: safe anywhere), ``IF_IDEMPOTENT`` (something
may have run: retry only work that is safe to run twice), ``NEVER`` (the request
itself is at fault, or the caller's time is up).
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    BAD_REQUEST = "BAD_REQUEST"  # wrong inputs, dtypes, shapes or parameters
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"  # this peer does not serve the model
    OVERLOADED = "OVERLOADED"  # admission queue full; comes with retry_after_ms
    NOT_EXECUTED = "NOT_EXECUTED"  # refused or dropped before it ran (e.g. shutting down)
    OUTCOME_UNKNOWN = "OUTCOME_UNKNOWN"  # accepted, then lost: it may or may not have run
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # the request's deadline passed
    UNAUTHORIZED = "UNAUTHORIZED"  # the peer is not allowed to use this node
    CANCELLED = "CANCELLED"  # the caller cancelled the request
    MALFORMED = "MALFORMED"  # the frame or message broke the wire protocol
    TOO_LARGE = "TOO_LARGE"  # a frame, tensor or message over the limits
    INTERNAL = "INTERNAL"  # the runner or node failed while running it


class Retry(enum.Enum):
    ELSEWHERE = "elsewhere"
    IF_IDEMPOTENT = "if-idempotent"
    NEVER = "never"


_POLICY: dict[ErrorCode, Retry] = {
    ErrorCode.BAD_REQUEST: Retry.NEVER,
    ErrorCode.MODEL_NOT_FOUND: Retry.ELSEWHERE,
    ErrorCode.OVERLOADED: Retry.ELSEWHERE,
    ErrorCode.NOT_EXECUTED: Retry.ELSEWHERE,
    ErrorCode.OUTCOME_UNKNOWN: Retry.IF_IDEMPOTENT,
    ErrorCode.DEADLINE_EXCEEDED: Retry.NEVER,
    ErrorCode.UNAUTHORIZED: Retry.ELSEWHERE,
    ErrorCode.CANCELLED: Retry.NEVER,
    ErrorCode.MALFORMED: Retry.NEVER,
    ErrorCode.TOO_LARGE: Retry.NEVER,
    ErrorCode.INTERNAL: Retry.IF_IDEMPOTENT,
}


def retry_policy(code: ErrorCode) -> Retry:
    """Whether work that failed with ``code`` may be sent to another peer."""
    return _POLICY[code]
