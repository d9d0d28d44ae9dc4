"""Continuing an answer from its start: the two params that carry it, and what a runner
announces when it can.

A streamed generation whose producer dies is resumed on another peer (the node
relaying the stream does it: ``node.jobs.resume``) with the same request and two
more params:

- ``continue_from``: the answer's text so far, which the client has already got.
  A chat's runner continues it as the assistant's turn (the chat template
  rendered with the prompt for the answer, then this text, and no new turn
  header); a raw prompt's runner continues the prompt followed by it.
- ``continue_tokens``: how many tokens that text took when it was generated (the
  sum of the ``tokens`` its chunks carried). The runner's budget is what the
  request allows (its ``max_new_tokens`` / ``max_tokens``, or the runner's
  default) less these, so the whole answer stays within the client's limit; a
  budget spent already answers at once with finish reason "length".

A continuing runner reports usage for the *whole* answer: ``prompt_tokens`` of
the prompt without the text, ``completion_tokens`` with ``continue_tokens``
added, so the last chunk the client sees is right whoever produced it.

They are params, not Request fields, on purpose: a runner that does not know
them refuses them as unknown params, a typed BAD_REQUEST, where an unknown
Request field would break the wire codec (MALFORMED, a fault of the peer). A
node resumes only on peers whose record says the model continues (``CONTINUES``
in its model entry: the input names it can continue, space-separated), so an
old peer is never asked; the refusal is the safety net.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from protocols import Param

from .errors import BadInput

CONTINUE_FROM = "continue_from"
CONTINUE_TOKENS = "continue_tokens"
PARAMS = frozenset({CONTINUE_FROM, CONTINUE_TOKENS})
# ModelInfo.extra key: the inputs ("messages", "prompt", "text") whose answers the
# runner continues, space-separated.
CONTINUES = "continues"
MAX_PREFIX_CHARS = 1 << 18  # of continue_from; a runner may hold less
MAX_TOKENS = 1 << 30


@dataclass(frozen=True, slots=True)
class Continuation:
    """An answer's start to continue from: its text and the tokens it took."""

    text: str
    tokens: int


def split(
    model: str, params: Mapping[str, Param], max_chars: int = MAX_PREFIX_CHARS
) -> tuple[Continuation | None, dict[str, Param]]:
    """The continuation ``params`` ask for (None: none) and the other params.

    Raises BadInput for a bad one: ``continue_from`` a string of 1 to ``max_chars``
    characters, ``continue_tokens`` an int from 0 to MAX_TOKENS, never one without
    the other.
    """
    rest = {k: v for k, v in params.items() if k not in PARAMS}
    text, tokens = params.get(CONTINUE_FROM), params.get(CONTINUE_TOKENS)
    if text is None and tokens is None:
        return None, rest
    if not isinstance(text, str) or not 1 <= len(text) <= max_chars:
        raise BadInput(
            f"{model}: param {CONTINUE_FROM!r} must be a string of 1 to {max_chars} characters"
        )
    if type(tokens) is not int or not 0 <= tokens <= MAX_TOKENS:
        raise BadInput(
            f"{model}: param {CONTINUE_TOKENS!r} must be an int from 0 to {MAX_TOKENS}, "
            f"given with {CONTINUE_FROM!r}"
        )
    return Continuation(text, tokens), rest


def continues(entry: Mapping[str, Any] | None, kind: str) -> bool:
    """Whether a model entry (``ModelInfo.describe()``, a record's) continues answers
    to input ``kind``."""
    said = (entry or {}).get(CONTINUES)
    return isinstance(said, str) and kind in said.split()
