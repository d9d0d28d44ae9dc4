"""Swarm errors as HTTP answers: one status per wire code, in the shape each API's clients read.

Every route answers a failure with a status from one table, so a client learns
from it whether to retry: 429 and 503 are worth another try (with Retry-After
when the node knows how long to wait; 429 always has one), 4xx otherwise are
the request's fault, 504 means its time ran out and 500 that something broke
while it ran. The body takes the shape of the API the path belongs to:

- KServe v2 (every path under ``/v2/``): the Open Inference Protocol's
  ``{"error": "<message>"}``. Triton's and KServe's clients read that string
  as the message of the exception they raise, and fail on anything else;
- Ollama (every path under ``/api/``): ``{"error": "<message>"}`` too, which
  the ``ollama`` client raises as ``ResponseError`` with the status;
- Anthropic's Messages API (``/v1/messages``): ``{"type": "error", "error":
  {"type", "message"}}`` with Anthropic's types (``invalid_request_error``,
  ``authentication_error``, ``not_found_error``, ``request_too_large``,
  ``rate_limit_error``, ``api_error``, ``timeout_error``,
  ``overloaded_error``), and 529 where the swarm is overloaded or could run
  nothing now (429 and 503 elsewhere), as Anthropic answers: its SDK raises
  ``OverloadedError`` for it and retries;
- everywhere else: OpenAI's ``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import JSONResponse

from protocols import ErrorCode, SwarmError

STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.MALFORMED: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.OVERLOADED: 429,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
    ErrorCode.OUTCOME_UNKNOWN: 502,
    ErrorCode.NOT_EXECUTED: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
}
TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# Anthropic's error types by status (docs: "Errors"); 529 is its "overloaded".
ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}
ANTHROPIC_OVERLOADED = 529
KSERVE_PREFIX = "/v2/"
OLLAMA_PREFIX = "/api/"
ANTHROPIC_PATH = "/v1/messages"


class HTTPFailure(Exception):
    """A request the gateway refuses before it becomes swarm work."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def is_kserve(path: str) -> bool:
    """Whether ``path`` is one of KServe v2's, whose errors are ``{"error": "<message>"}``."""
    return path.startswith(KSERVE_PREFIX)


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


def error_body(status: int, message: str, code: str, *, path: str = "") -> dict[str, Any]:
    """The error body for a request to ``path`` (see the module)."""
    if is_kserve(path) or path.startswith(OLLAMA_PREFIX):
        return {"error": message}
    if is_anthropic(path):
        fallback = "api_error" if status >= 500 else "invalid_request_error"
        kind = ANTHROPIC_TYPES.get(status, fallback)
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


def error_response(status: int, message: str, code: str, *, path: str = "") -> JSONResponse:
    """The answer to a failed request to ``path``."""
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = error_body(status, message, code, path=path)
    return JSONResponse(body, status_code=status, headers=headers)


def swarm_status(exc: SwarmError, *, path: str = "") -> int:
    """The status a swarm error is answered with on ``path`` (see the module)."""
    status = STATUS.get(exc.code, 500)
    if status in (429, 503) and is_anthropic(path):
        return ANTHROPIC_OVERLOADED
    return status


def swarm_error_response(exc: SwarmError, *, path: str = "") -> JSONResponse:
    """A swarm error as the answer to a request to ``path``, with its retry hint."""
    status = swarm_status(exc, path=path)
    response = error_response(status, str(exc), str(exc.code).lower(), path=path)
    retry_ms = getattr(exc, "retry_after_ms", None)
    if status in (429, 503, ANTHROPIC_OVERLOADED) and isinstance(retry_ms, int):
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_ms / 1000)))
    elif status in (429, ANTHROPIC_OVERLOADED):
        response.headers["Retry-After"] = "1"
    return response
