"""The one error root of swarm, and the errors of the wire.

Every exception swarm raises on purpose derives from :class:`SwarmError`, so a
caller can catch one thing. Each error carries the wire :class:`ErrorCode` a
peer would be told, which is how the node turns any failure into a typed
``Error`` message without a lookup table.

    SwarmError
    ├── ProtocolError              the wire's rules were broken
    │   ├── LocalProtocolError     ... by us: a bug in our code, never the peer's fault
    │   └── RemoteProtocolError    ... by the peer: malformed or out-of-order data
    │       └── FrameTooLarge      ... a frame or message over the configured caps
    ├── RemoteError                the peer answered with a typed Error message
    └── ConfigError                a flag, config value, model spec or backend declaration
                                   that does not validate; the message names the field

``ConfigError`` lives here, not in a higher layer, because every layer reads
config (runners their model tables, bootstrap its addresses, node its flags)
and a caller should catch one class for "the configuration is wrong".

Other layers add their own subclasses (runners, node) in their own modules; the
tree above is the part every layer shares. Foreign exceptions (msgpack, OS,
libp2p) are translated at the edge where they enter, with ``raise ... from``.
"""

from __future__ import annotations

from .codes import ErrorCode, Retry, retry_policy


class SwarmError(Exception):
    """Root of every error swarm raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL


class ProtocolError(SwarmError):
    """The wire protocol's rules were broken (see the subclasses for by whom)."""

    code = ErrorCode.MALFORMED


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol forbids: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent malformed, oversized or out-of-order data."""


class FrameTooLarge(RemoteProtocolError):
    """A frame, tensor or message exceeds the configured limits."""

    code = ErrorCode.TOO_LARGE


class RemoteError(SwarmError):
    """A peer answered with a typed ``Error`` message.

    ``retry`` says whether sending the same work elsewhere is safe.
    """

    def __init__(self, code: ErrorCode, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    @property
    def retry(self) -> Retry:
        return retry_policy(self.code)


class ConfigError(SwarmError):
    """A flag, config value, model spec or backend declaration that does not validate."""

    code = ErrorCode.BAD_REQUEST
