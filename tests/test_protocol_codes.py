"""Error codes and their retry policy: what a caller may do after each failure."""

from __future__ import annotations

import pytest

from protocols import (
    ErrorCode,
    FrameTooLarge,
    LocalProtocolError,
    MessageTooLarge,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    Retry,
    SwarmError,
    retry_policy,
)


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_has_a_policy_and_remote_error_agrees(code: ErrorCode) -> None:
    policy = retry_policy(code)
    assert isinstance(policy, Retry)
    error = RemoteError(code, "why", retry_after_ms=10)
    assert error.retry is policy
    assert error.code is code and error.message == "why" and error.retry_after_ms == 10
    assert isinstance(error, SwarmError)
    assert str(code) in str(error)


@pytest.mark.parametrize(
    ("code", "policy"),
    [
        (ErrorCode.OVERLOADED, Retry.ELSEWHERE),
        (ErrorCode.NOT_EXECUTED, Retry.ELSEWHERE),
        (ErrorCode.MODEL_NOT_FOUND, Retry.ELSEWHERE),
        (ErrorCode.OUTCOME_UNKNOWN, Retry.IF_IDEMPOTENT),
        (ErrorCode.BAD_REQUEST, Retry.NEVER),
        (ErrorCode.DEADLINE_EXCEEDED, Retry.NEVER),
        (ErrorCode.CANCELLED, Retry.NEVER),
        (ErrorCode.MALFORMED, Retry.NEVER),
        (ErrorCode.TOO_LARGE, Retry.NEVER),
    ],
)
def test_key_semantics(code: ErrorCode, policy: Retry) -> None:
    assert retry_policy(code) is policy
    assert RemoteError(code, "x").retry is policy


def test_codes_are_their_own_wire_strings() -> None:
    for code in ErrorCode:
        assert str(code) == code.value == code.name
        assert ErrorCode(str(code)) is code


def test_retry_after_defaults_to_none() -> None:
    assert RemoteError(ErrorCode.OVERLOADED, "busy").retry_after_ms is None


def test_errors_carry_the_code_a_peer_would_be_told() -> None:
    assert SwarmError().code is ErrorCode.INTERNAL
    assert ProtocolError().code is ErrorCode.MALFORMED
    assert RemoteProtocolError().code is ErrorCode.MALFORMED
    assert LocalProtocolError().code is ErrorCode.MALFORMED
    assert FrameTooLarge().code is ErrorCode.TOO_LARGE
    assert MessageTooLarge().code is ErrorCode.TOO_LARGE
    assert issubclass(FrameTooLarge, RemoteProtocolError)
    assert issubclass(MessageTooLarge, LocalProtocolError)
    assert issubclass(RemoteError, SwarmError) and not issubclass(RemoteError, ProtocolError)
