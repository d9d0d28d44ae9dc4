"""The closed set of messages that travel on swarm streams.

Inference (``/swarm/infer/1.0.0``) is one exchange at a time per stream::

    caller                              server
      Request  ------------------------->
               <-------------------------  Chunk*     (only when stream=True)
      Cancel?  ------------------------->
               <-------------------------  Result | Error

after which the stream may carry the next Request (streams are reused: a new
stream per small call costs several times a round trip). ``CapabilityRecord``
travels on ``/swarm/caps/1.0.0``. Values are deliberately few: tensors for
numbers, strings for text, scalars for parameters and metadata.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .codes import ErrorCode
from .tensors import Tensor

INFER_PROTOCOL = "/swarm/infer/1.0.0"
CAPS_PROTOCOL = "/swarm/caps/1.0.0"

Scalar = str | int | float | bool | None
Value = Tensor | str | list[str] | int | float | bool
Param = Scalar | list[str]

MAX_ID_LEN = 128
MAX_NAME_LEN = 256
MAX_HOPS = 4
MAX_STRATEGY_LEN = 32
MAX_VERIFY = 4  # a job asks for at most this many extra runs (5 nodes in all)
MAX_HEDGE_MS = 600_000  # a job's hedge_ms, at most


class Priority(enum.IntEnum):
    """Admission order: lower value runs first."""

    HIGH = 0
    NORMAL = 1
    LOW = 2

    @classmethod
    def parse(cls, text: str) -> Priority:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"priority must be high, normal or low, not {text!r}") from None


@dataclass(frozen=True, slots=True)
class Request:
    id: str
    model: str
    inputs: Mapping[str, Value]
    params: Mapping[str, Param] = field(default_factory=dict)
    priority: Priority = Priority.NORMAL
    # Time left for the caller, relative (peers' clocks disagree); None = no deadline.
    deadline_ms: int | None = None
    stream: bool = False
    # Whether running it twice is harmless (inference is); decides retries after OUTCOME_UNKNOWN.
    idempotent: bool = True
    # How many nodes have forwarded it already; a node refuses to forward past MAX_HOPS.
    hops: int = 0
    # How the first node picks the peer that runs it (node.router's strategies); None:
    # that node's default. Nodes it is forwarded to run it where it lands.
    strategy: str | None = None
    # Whose job it is, as the node forwarding it vouches (the client's peer id, set by
    # the first node, passed on by the others); it divides the forwarder's fair share,
    # never adds to one (node.jobs.fairness). None: the sender's own job.
    origin: str | None = None
    # Run it on this many more distinct nodes and say whether the answers agree
    # (node.jobs.verify); 0: once. Only the first node acts on it: copies go out with 0.
    verify: int = 0
    # Hedge: when no first chunk or answer came in this many ms, the first node sends
    # the job to a second peer too and takes whichever answers first (only for an
    # idempotent job); 0: never; None: that node's default. Copies go out with None.
    hedge_ms: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.verify, bool) or not 0 <= self.verify <= MAX_VERIFY:
            raise ValueError(f"verify must be an integer from 0 to {MAX_VERIFY}")
        hedge = self.hedge_ms
        if hedge is not None and (isinstance(hedge, bool) or not 0 <= hedge <= MAX_HEDGE_MS):
            raise ValueError(f"hedge_ms must be an integer from 0 to {MAX_HEDGE_MS}")


@dataclass(frozen=True, slots=True)
class Chunk:
    id: str
    seq: int
    outputs: Mapping[str, Value]


@dataclass(frozen=True, slots=True)
class Result:
    id: str
    outputs: Mapping[str, Value]
    meta: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Error:
    id: str
    code: ErrorCode
    message: str
    retry_after_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Cancel:
    id: str


@dataclass(frozen=True, slots=True)
class CapabilityRecord:
    """What a node is and serves. ``body`` is plain msgpack data (see capabilities/)."""

    peer_id: str
    seq: int
    ttl_s: int
    body: Mapping[str, Any]
    signature: bytes = b""


Message = Request | Chunk | Result | Error | Cancel | CapabilityRecord
