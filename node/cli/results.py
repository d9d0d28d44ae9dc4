"""How a job's result reads: one line per output, then who served it and how long it
took (``result_text``), or one JSON document (``result_json``).

Apart from the tables (``render``) so that ``swarm submit`` does not import rich.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from node.json_values import jsonable
from protocols import Result, Tensor, Value


def result_json(result: Result, extra: Mapping[str, Any] | None = None) -> str:
    body = {"id": result.id, "outputs": jsonable(result.outputs), "meta": dict(result.meta)}
    return json.dumps({**body, **(extra or {})})


def value_text(value: Value) -> str:
    if isinstance(value, Tensor):
        array = value.numpy()
        head = np.array2string(array.reshape(-1)[:6], precision=4, separator=", ")
        more = " ..." if array.size > 6 else ""
        return f"{value.dtype}{list(value.shape)} {head}{more}"
    return repr(value)


def result_text(result: Result) -> str:
    """Outputs, then who served the job and how long it took, in lines that fit 80
    columns (a peer id is 52 characters)."""
    lines = [f"{name}: {value_text(value)}" for name, value in result.outputs.items()]
    meta = result.meta
    served = str(meta.get("served_by", "?"))
    lines.append(f"served by {served} ({meta.get('runner', '?')} on {meta.get('device', '?')})")
    route = []
    if meta.get("forwarded_by"):
        route.append(f"forwarded by {meta['forwarded_by']}")
    attempts = meta.get("attempts")
    if isinstance(attempts, int) and attempts > 1:
        route.append(f"after {attempts} attempts")
    if route:
        lines.append(", ".join(route))
    if meta.get("via"):  # no provider is linked here: a peer passed it on (one more hop)
        lines.append(f"through {meta['via']}")
    if meta.get("verify_verdict") is not None:
        lines.append(_verify_line(meta))
    took = f"ran {meta.get('run_ms', '?')} ms, queued {meta.get('queue_ms', '?')} ms"
    if meta.get("took_ms") is not None:
        took += f"; {meta['took_ms']} ms in all"
    lines.append(took)
    return "\n".join(lines)


def _verify_line(meta: Mapping[str, Any]) -> str:
    """How the runs of a ``verify: N`` job compared, and on which nodes."""
    nodes = [n[-8:] for n in str(meta.get("verify_nodes") or "").split(",") if n]
    line = f"verify: {meta['verify_verdict']} ({meta.get('verify_ran')} of "
    line += f"{int(meta.get('verify', 0) or 0) + 1} ran: {' '.join(nodes) or '-'})"
    if meta.get("verify_min_cosine") is not None:
        line += f", lowest cosine {meta['verify_min_cosine']}"
    against = [n[-8:] for n in str(meta.get("verify_against") or "").split(",") if n]
    if against:
        line += f"; against {' '.join(against)}"
    return line
