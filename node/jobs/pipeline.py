"""Pipeline stages on peers: a stage callable that carries each round over /swarm/infer.

A stage served by a peer (``runners.torch_stage``, model kind ``torch-stage``)
is an ordinary model there, named ``smollm2-135m-instruct@layers=A-B``: one
round is one Request with the stage's input as a tensor (token ids or float32
hidden states, never lists) and ``session``/``start``/``want`` as params, and
its Result holds the answer as a tensor. The existing request path carries it:
admission, priorities and fair share apply per stage as to any job. The
strategy is ``local-first``: the node asked holds the session, and must run
the round itself rather than forward it to another holder of the same layers.

``peer_stage(infer, model)`` takes the caller's ``infer`` (``SwarmClient.infer``,
or a node's own call to a chosen peer), so this module imports no client and
no host. What fails comes back as raised: the driver
(``runners.pipeline_driver``) rebuilds a stage whose answer is NOT_EXECUTED
(its cache was evicted) and replaces one that is gone (PeerUnavailable,
ConnectionLost, any other error).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from node.errors import NodeError
from protocols import Result, Tensor
from runners.pipeline_driver import Stage
from runners.torch_stage import StageCall

Infer = Callable[..., Awaitable[Result]]
STRATEGY = "local-first"


class StageAnswerMissing(NodeError):
    """The peer answered a round without the tensor the round asked for."""


def peer_stage(infer: Infer, model: str, *, first: bool, deadline_s: float = 30.0) -> Stage:
    """A stage callable for ``model`` (a stage's name) through ``infer``; ``first``
    when it is the stage that takes token ids."""
    name = "tokens" if first else "hidden"

    async def call(c: StageCall) -> np.ndarray[Any, Any]:
        result = await infer(
            model,
            {name: c.data},
            params={"session": c.session, "start": c.start, "want": c.want},
            deadline_s=deadline_s,
            strategy=STRATEGY,
        )
        value = result.outputs.get(c.want)
        if not isinstance(value, Tensor):
            raise StageAnswerMissing(f"{model} answered no {c.want!r} tensor")
        return value.numpy()

    return call
