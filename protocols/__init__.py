"""The bottom layer: the swarm wire protocol, and the pure pieces every layer shares.

The wire, sans-IO: typed messages, tensors, framing, lifecycle. Knows nothing of
trio, libp2p or models: bytes in, typed messages out, and back. Beside it, the
one error root (``errors``), typed config tables (``config.Table``) and the
resilience primitives (``resilience``: circuit breaker, backoff, Retry-After),
pure too: they take the time from their caller. A test keeps this package free
of trio, libp2p and every other layer of swarm.
"""

from .codec import DEFAULT_LIMITS, Decoder, Limits, MessageTooLarge, encode
from .codes import ErrorCode, Retry, retry_policy
from .errors import (
    ConfigError,
    FrameTooLarge,
    LocalProtocolError,
    ProtocolError,
    RemoteError,
    RemoteProtocolError,
    SwarmError,
)
from .exchange import Exchange, Role, State
from .messages import (
    CAPS_PROTOCOL,
    INFER_PROTOCOL,
    MAX_HEDGE_MS,
    MAX_HOPS,
    MAX_VERIFY,
    Cancel,
    CapabilityRecord,
    Chunk,
    Error,
    Message,
    Param,
    Priority,
    Request,
    Result,
    Scalar,
    Value,
)
from .tensors import DTYPES, Tensor

__all__ = [
    "CAPS_PROTOCOL",
    "DEFAULT_LIMITS",
    "DTYPES",
    "INFER_PROTOCOL",
    "MAX_HEDGE_MS",
    "MAX_HOPS",
    "MAX_VERIFY",
    "Cancel",
    "CapabilityRecord",
    "Chunk",
    "ConfigError",
    "Decoder",
    "Error",
    "ErrorCode",
    "Exchange",
    "FrameTooLarge",
    "Limits",
    "LocalProtocolError",
    "Message",
    "MessageTooLarge",
    "Param",
    "Priority",
    "ProtocolError",
    "RemoteError",
    "RemoteProtocolError",
    "Request",
    "Result",
    "Retry",
    "Role",
    "Scalar",
    "State",
    "SwarmError",
    "Tensor",
    "Value",
    "encode",
    "retry_policy",
]
