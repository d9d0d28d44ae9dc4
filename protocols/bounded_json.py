"""JSON from clients, with a bound on how deeply it nests.

Python's ``json`` follows nesting by recursion: a body of 100,000 ``[`` raises
RecursionError (not a ValueError), and a value nested just under the
interpreter's limit parses, then breaks whatever walks it next by recursion
(``repr`` in a message, an encoder). So every JSON text a client sends (HTTP
bodies, KServe v2 headers, WebSocket frames) is read by ``loads`` here, which
refuses text that is not JSON or that nests more than ``MAX_DEPTH`` arrays and
objects, with one error, ``BadJSON``. The depth is measured after parsing,
level by level without recursion: one look at each value, so it costs less
than the parse did.
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 64  # arrays and objects; v2 tensors and OpenAI tool schemas need far fewer
_CONTAINERS = (list, dict)


class BadJSON(ValueError):
    """Text that is not JSON, or nests deeper than ``MAX_DEPTH``. The message is
    fit for the client: it completes "the body is ..." or "the message is ..."."""


def loads(data: bytes | str) -> Any:
    """``data`` (bytes as ``json.loads`` reads them) as JSON, or BadJSON."""
    try:
        value = json.loads(data)
    except RecursionError:
        raise BadJSON(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise BadJSON(f"not JSON: {exc}") from exc
    if not nests_within(value, MAX_DEPTH):
        raise BadJSON(f"JSON nested deeper than {MAX_DEPTH} levels")
    return value


def nests_within(value: Any, limit: int) -> bool:
    """Whether the lists and dicts of ``value`` nest at most ``limit`` deep."""
    level = [value] if isinstance(value, _CONTAINERS) else []
    for _ in range(limit):
        inner: list[Any] = []
        add = inner.append
        for container in level:
            items = container.values() if isinstance(container, dict) else container
            for item in items:
                if isinstance(item, _CONTAINERS):
                    add(item)
        if not inner:
            return True
        level = inner
    return not level  # what is left lies deeper than limit
