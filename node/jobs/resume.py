"""A stream that survives its producer: what resuming it needs, as pure decisions.

The node that relays a stream (the one whose dispatcher forwards it) keeps
what the caller has got so far (``Progress``). When the producer fails after
some chunks (it died, the connection broke, the stream ended without a result:
errors after which a job that sent nothing would fail over, ``may_resume``), the
dispatcher asks for a plan of peers that continue the job's input (``Resume``:
their record says so, and those at the producer's numerics come first) and
sends ``continued(request, progress)``: the same request, its params naming the
answer's text so far and the tokens it took (``runners.continuation``), the
same sampling params and seed. The continuation's chunks go on the same
stream, so the caller's chunk numbers run on; its last chunk carries the whole
answer's counts and finish reason (the continuing runner reports them so).
``meta`` says who produced which part.

Tokens: generation chunks carry ``tokens`` (the generated tokens whose text the
chunk completes; ``runners.generation``), summed here. A chunk with text and no
count (the fake, which says one word per chunk; a backend that does not count)
counts as one token. The relaying node need not hold the model or its tokenizer:
counting at the producer is exact where re-tokenizing the text may not be.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from protocols import Request, Retry, Scalar, SwarmError, retry_policy
from runners.continuation import (
    CONTINUE_FROM,
    CONTINUE_TOKENS,
    MAX_PREFIX_CHARS,
    MAX_TOKENS,
)

# The inputs a continuation can go on from, in the order they are looked for.
KINDS = ("messages", "prompt", "text")
# The fields of a model entry that make greedy text the same on two nodes.
NUMERICS = (
    "runner",
    "precision",
    "inference_precision",
    "kv_cache_precision",
    "dynamic_quantization",
)


@dataclass(frozen=True, slots=True)
class Takeover:
    """A producer of part of a stream: from which chunk and token of the whole on."""

    peer_id: str
    chunk: int
    token: int


@dataclass(frozen=True, slots=True)
class Resume:
    """What a plan for the rest of a stream asks of its candidates."""

    kind: str  # the input they must continue
    alike: tuple[tuple[str, Any], ...] = ()  # entry fields to prefer (the producer's)


class Progress:
    """What the caller of one stream has got: chunks, text, tokens, and from whom."""

    def __init__(self) -> None:
        self.chunks = 0
        self.tokens = 0
        self.takeovers: list[Takeover] = []
        self._pieces: list[str] = []
        self._chars = 0

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def chars(self) -> int:
        return self._chars

    def mark(self) -> tuple[int, int]:
        """Where the stream stands now: (chunks, tokens), for ``produced``."""
        return self.chunks, self.tokens

    def produced(self, peer_id: str, since: tuple[int, int]) -> None:
        """``peer_id`` produced the stream from ``since`` (a ``mark``) to here."""
        self.takeovers.append(Takeover(peer_id, *since))

    def relayed(self, outputs: Mapping[str, Any]) -> None:
        """One more chunk reached the caller."""
        self.chunks += 1
        text = outputs.get("text")
        count = outputs.get("tokens")
        if isinstance(text, str) and text:
            self._pieces.append(text)
            self._chars += len(text)
        if type(count) is int and count >= 0:
            self.tokens += count
        elif isinstance(text, str) and text:
            self.tokens += 1  # one word, one token (see the module)

    @property
    def resumes(self) -> int:
        return max(0, len(self.takeovers) - 1)


def kind_of(request: Request) -> str | None:
    """The input a continuation of ``request`` goes on from, or None (no text input)."""
    return next((k for k in KINDS if isinstance(request.inputs.get(k), str)), None)


def may_resume(exc: SwarmError, request: Request) -> bool:
    """Whether a stream that failed with ``exc`` after some chunks may be continued
    elsewhere: the failures after which a job that sent nothing would fail over (the
    producer died, the stream broke or ended unanswered, it was shut down, it
    failed inside), for an idempotent job. Never the request's own fault, a passed
    deadline or a cancel."""
    if not request.stream:
        return False
    policy = retry_policy(exc.code)
    return policy is Retry.ELSEWHERE or (policy is Retry.IF_IDEMPOTENT and request.idempotent)


def resume_of(request: Request, producer: Mapping[str, Any] | None) -> Resume | None:
    """What the rest of ``request``'s stream asks of its next producer, given the
    entry of the one that died (None when unknown); None when it cannot be resumed."""
    kind = kind_of(request)
    if kind is None:
        return None
    entry = producer or {}
    alike = tuple((key, entry[key]) for key in NUMERICS if key in entry)
    return Resume(kind, alike)


def continued(request: Request, progress: Progress) -> Request | None:
    """``request`` continuing from what the caller has got; None when that is too long
    to send (the caller then gets the typed error). A client's own ``continue_from``
    stays the start of the text, its ``continue_tokens`` added."""
    params = dict(request.params)
    before = params.get(CONTINUE_FROM)
    spent = params.get(CONTINUE_TOKENS)
    text = (before if isinstance(before, str) else "") + progress.text
    tokens = (spent if type(spent) is int else 0) + progress.tokens
    if not text or len(text) > MAX_PREFIX_CHARS or tokens > MAX_TOKENS:
        return None
    params[CONTINUE_FROM] = text
    params[CONTINUE_TOKENS] = tokens
    return replace(request, params=params)


def meta(progress: Progress) -> dict[str, Scalar]:
    """What a streamed answer's meta says of its making: its chunks, and when it was
    resumed the producers in order with the chunk and token each took over at."""
    found: dict[str, Scalar] = {"chunks": progress.chunks}
    if progress.resumes:
        found["resumes"] = progress.resumes
        found["producers"] = ",".join(t.peer_id for t in progress.takeovers)
        found["takeover_chunks"] = ",".join(str(t.chunk) for t in progress.takeovers)
        found["takeover_tokens"] = ",".join(str(t.token) for t in progress.takeovers)
    return found
