"""Running a compiled OpenVINO model from trio: a pool of infer requests, waited on in threads.

One ``InferQueue`` wraps one ``ov.AsyncInferQueue`` of ``jobs`` requests (the
device's optimal number under the THROUGHPUT hint: each request feeds one CPU
stream, so ``jobs`` requests really run at the same time). A call hands its
inputs to the next idle request with ``start_async`` and waits for that
request in a worker thread, with the GIL released; the trio thread only awaits.

Why a thread waits rather than a completion callback waking trio: measured on
OpenVINO 2026.4, when an inference fails the queue's Python callback is never
called (a waiter keyed on it would hang), and the failed request poisons the
queue: every later ``start_async`` and ``wait_all`` re-raises the old error.
Waiting on the request itself (``queue[handle].wait()``) raises that request's
error in the call that caused it, and after a failure the queue is replaced by
a fresh one, so one bad input costs one error, not the model.

Correctness of sharing: a request goes back to the queue's idle list when its
inference ends, before our thread has copied its outputs. At most ``jobs``
threads hold a request (a ``trio.CapacityLimiter`` of ``jobs``), so no other
call can take that request until the thread that owns it has copied and left.
Submissions are serialised by a lock so that the idle handle we read is the one
``start_async`` takes. Input preparation (decoding, resizing) runs in a thread
of its own limiter before a request is taken, so it overlaps inference.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import openvino as ov
import trio

from protocols.errors import ConfigError

from .errors import RunnerError

Array = np.ndarray[Any, Any]
Feed = Mapping[str, Array]


class InferQueue:
    """``jobs`` parallel infer requests on one compiled model; ``run`` from any trio task."""

    def __init__(self, compiled: ov.CompiledModel, jobs: int, name: str) -> None:
        if jobs < 1:
            raise ConfigError("jobs must be at least 1")
        self.name = name
        self.jobs = jobs
        self._compiled = compiled
        self._queue = ov.AsyncInferQueue(compiled, jobs)
        self._outputs = len(compiled.outputs)
        self._lock = threading.Lock()  # guards _queue swaps, submission and the counters
        self._limiter = trio.CapacityLimiter(jobs)
        self._prepare_limiter = trio.CapacityLimiter(jobs)
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests running at once: overlap, observed
        self.replaced = 0  # queues replaced after a failed inference

    async def run(self, feed: Feed | Callable[[], Feed]) -> list[Array]:
        """Outputs (owned copies, in the model's output order) for ``feed``.

        ``feed`` may be a function that builds the inputs; it runs in a worker
        thread. Raises RunnerError when OpenVINO fails, and whatever ``feed`` raises.
        """
        if callable(feed):
            feed = await trio.to_thread.run_sync(feed, limiter=self._prepare_limiter)
        return await trio.to_thread.run_sync(self._infer, feed, limiter=self._limiter)

    def _infer(self, feed: Feed) -> list[Array]:
        with self._lock:
            queue = self._queue
            try:
                handle = queue.get_idle_request_id()  # at once: we hold one of `jobs` slots
                queue.start_async(dict(feed), None)
            except Exception as exc:
                self._replace(queue)
                raise RunnerError(f"{self.name}: cannot start inference: {exc}") from exc
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        request = queue[handle]
        try:
            request.wait()
            return [np.array(request.get_output_tensor(i).data) for i in range(self._outputs)]
        except Exception as exc:
            with self._lock:
                self._replace(queue)
            raise RunnerError(f"{self.name}: inference failed: {exc}") from exc
        finally:
            with self._lock:
                self.in_flight -= 1

    def _replace(self, broken: Any) -> None:
        """Swap in a fresh queue unless that was done already. Caller holds the lock.

        The old queue lives on in the threads still waiting on its requests.
        """
        if self._queue is broken:
            self._queue = ov.AsyncInferQueue(self._compiled, self.jobs)
            self.replaced += 1
