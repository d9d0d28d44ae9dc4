"""Errors of remote (HTTP) backends, each carrying the wire code a caller is told.

A backend failure must tell the node's caller one thing above all: may the
same work be sent elsewhere? So the tree splits by what is known to have
happened, not by HTTP status:

RunnerError (runners.errors)
└── BackendError            a remote backend failed us: INTERNAL
    ├── BackendUnreachable  connection refused, DNS, connect timeout; nothing ran: NOT_EXECUTED
    ├── CircuitOpen         the breaker is open, the call was not even tried: NOT_EXECUTED
    ├── BackendBusy         HTTP 429 or 503, with ``retry_after_s`` when told: OVERLOADED
    ├── BackendTimeout      the request went out, no whole answer in time: OUTCOME_UNKNOWN
    ├── BackendRejected     HTTP 400/404/413/422: the request is at fault: BAD_REQUEST
    │                       (also a BadInput, so runners may treat it as one)
    ├── BackendModelMissing the backend says it has no such model: MODEL_NOT_FOUND
    ├── BackendAuth         HTTP 401/403: our key is wrong (never echoed): INTERNAL
    ├── BackendFailed       any other 5xx: INTERNAL
    └── BackendGarbage      a 2xx whose body does not parse or lacks fields: INTERNAL

Every message names the endpoint, never a key: the endpoint scrubs its keys
from any text it puts in an error, including bodies the backend sent back.
"""

from __future__ import annotations

from protocols import ErrorCode

from ..errors import BadInput, ModelNotFound, RunnerError


class BackendError(RunnerError):
    """A remote backend failed us. ``status`` is the HTTP status where one came back."""

    code = ErrorCode.INTERNAL

    def __init__(
        self, message: str, *, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


class BackendUnreachable(BackendError):
    code = ErrorCode.NOT_EXECUTED


class CircuitOpen(BackendError):
    code = ErrorCode.NOT_EXECUTED


class BackendBusy(BackendError):
    code = ErrorCode.OVERLOADED


class BackendTimeout(BackendError):
    code = ErrorCode.OUTCOME_UNKNOWN


class BackendRejected(BackendError, BadInput):
    code = ErrorCode.BAD_REQUEST


class BackendModelMissing(BackendError, ModelNotFound):
    code = ErrorCode.MODEL_NOT_FOUND


class BackendAuth(BackendError):
    code = ErrorCode.INTERNAL


class BackendFailed(BackendError):
    code = ErrorCode.INTERNAL


class BackendGarbage(BackendError):
    code = ErrorCode.INTERNAL
