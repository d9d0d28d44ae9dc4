"""Run a blocking generator of text in a thread; hand its pieces to trio with backpressure.

Token generation is blocking native work (OpenVINO GenAI, torch) that reports
each piece of text through a callback in its own thread. The trio thread must
never block, and a slow reader must slow the generator down rather than pile
text up in memory, so pieces travel through a *bounded* memory channel: the
callback waits in ``trio.from_thread.run(send.send, ...)`` when the channel is
full, which stalls the generation thread, never trio.

Stopping is cooperative. The worker is handed ``emit(piece) -> bool``: False
means "stop now" (the reader left, or was cancelled), and the worker must then
return soon (GenAI: the streamer returns ``StreamingStatus.CANCEL``; torch: the
token loop breaks). Whoever started the worker waits for it to return before
giving back control, with the wait shielded from cancellation, so when
``pieces`` or ``run_cancellable`` is done the model is free again. An abandoned
``pieces`` generator is finalized by trio (or by ``aclose``) and stops the
worker the same way.

Threads come from trio's thread cache (``trio.lowlevel.start_thread_soon``);
each is joined by its starter, as a nursery would join a task.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import outcome
import trio

R = TypeVar("R")
P = TypeVar("P")  # what the worker emits: a piece of text, or text with its token count
Emit = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class Done(Generic[R]):
    """The worker's return value: the last item ``pieces`` yields."""

    value: R


class _Worker(Generic[R]):
    """One worker thread and the trio-side event that says it has returned."""

    def __init__(self, work: Callable[[], R]) -> None:
        self.cancel = threading.Event()
        self.finished = trio.Event()
        self.result: outcome.Outcome[R] | None = None
        self._token = trio.lowlevel.current_trio_token()
        self._on_finish: Callable[[], None] = lambda: None
        self._work = work

    def start(self, on_finish: Callable[[], None] = lambda: None) -> None:
        self._on_finish = on_finish
        trio.lowlevel.start_thread_soon(self._run, self._deliver)

    def _run(self) -> R:
        return self._work()

    def _deliver(self, result: outcome.Outcome[R]) -> None:
        """In the worker thread, once ``work`` returned or raised."""

        def finish() -> None:
            self.result = result
            self._on_finish()
            self.finished.set()

        with contextlib.suppress(trio.RunFinishedError):  # trio is gone; nobody waits
            self._token.run_sync_soon(finish)

    async def join(self) -> None:
        """Ask the worker to stop and wait for it, even when cancelled."""
        self.cancel.set()
        with trio.CancelScope(shield=True):
            await self.finished.wait()

    def unwrap(self) -> R:
        if self.result is None:
            raise RuntimeError("the worker has not finished")
        return self.result.unwrap()


async def run_cancellable(work: Callable[[threading.Event], R]) -> R:
    """Run ``work(cancel)`` in a thread; on cancellation set ``cancel`` and wait for it.

    ``work`` must poll ``cancel`` often (per token) and return early once it is
    set. Its exceptions are re-raised here.
    """
    worker: _Worker[R]

    def run() -> R:
        return work(worker.cancel)

    worker = _Worker(run)
    worker.start()
    try:
        await worker.finished.wait()
    finally:
        await worker.join()  # a no-op wait unless we were cancelled mid-way
    return worker.unwrap()


async def pieces(
    work: Callable[[Callable[[P], bool]], R], *, buffer: int
) -> AsyncGenerator[P | Done[R], None]:
    """Run ``work(emit)`` in a thread; yield each emitted piece, then ``Done(result)``.

    At most ``buffer`` pieces wait in the channel; a full channel blocks the
    worker inside ``emit``. Exceptions of ``work`` are raised to the reader
    after the pieces emitted before them.
    """
    if buffer < 1:
        raise ValueError("buffer must be at least 1")
    send, recv = trio.open_memory_channel[P](buffer)
    token = trio.lowlevel.current_trio_token()
    worker: _Worker[R]

    def emit(piece: P) -> bool:
        if worker.cancel.is_set():
            return False
        try:
            trio.from_thread.run(send.send, piece, trio_token=token)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.RunFinishedError):
            worker.cancel.set()
            return False
        return not worker.cancel.is_set()

    def run() -> R:
        return work(emit)

    worker = _Worker(run)
    # Closing the send side after the result is stored ends the reader's loop.
    worker.start(on_finish=send.close)
    try:
        async with recv:
            async for piece in recv:
                yield piece
        yield Done(worker.unwrap())
    finally:
        recv.close()  # a send waiting for room fails at once: the worker sees False
        await worker.join()
