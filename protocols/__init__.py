"""The swarm wire protocol, sans-IO: typed messages, tensors, framing, lifecycle.

Knows nothing of trio, libp2p or models: bytes in, typed messages out, and back.
"""

from .codec import DEFAULT_LIMITS, Decoder, Limits, MessageTooLarge, encode
from .codes import ErrorCode, Retry, retry_policy
from .errors import (
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
    MAX_HOPS,
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
    "MAX_HOPS",
    "Cancel",
    "CapabilityRecord",
    "Chunk",
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
