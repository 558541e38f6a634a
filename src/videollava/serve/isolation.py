"""What keeps one request from hurting another: a watch on each client, bounded pools of workers, and the
bridge that carries a generation from the engine thread to the event loop.

A client that goes away stops its fetch, its preparation and its generation, and work it left waiting
never starts; each pool says when it is saturated, so /health can tell.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from videollava.errors import RequestCancelled
from videollava.infer.engine import Handle
from videollava.infer.request import Completion, StreamDelta
from videollava.serve.protocol import busy_error

log = logging.getLogger("videollava.serve")
T = TypeVar("T")


def _forget(task: asyncio.Future) -> None:
    """Collect the outcome of work nobody waits for any more, so it is not reported as lost."""
    if not task.cancelled():
        task.exception()


class ClientWatch:
    """Notices the client going away: for the event loop (to stop waiting), for worker threads (a flag
    they poll between stages) and for callbacks (to cancel a generation).

    After the body is read, the only message left for a request is `http.disconnect`: a task waits
    for it, so a departure is seen at once, even while nothing is being sent.
    """

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]]):
        self.stage = "parse"  # where the request is: parse, fetch, read, prepare, generate
        self._gone = threading.Event()
        self._gone_async = asyncio.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._task = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a connection that cannot be read from has no one left at its end
            log.debug("receive failed while watching for a disconnect", exc_info=True)
        self._gone.set()
        self._gone_async.set()
        for callback in self._callbacks:
            callback()

    def cancelled(self) -> bool:
        """True once the client has gone; safe to call from any thread."""
        return self._gone.is_set()

    def on_gone(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)
        if self.cancelled():
            callback()

    async def run(self, work: Awaitable[T]) -> T:
        """The result of `work`, or RequestCancelled (with `work` cancelled) if the client goes first."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(self._gone_async.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            finished = task.done()
            if not finished:
                task.cancel()
                task.add_done_callback(_forget)
        if not finished:
            raise RequestCancelled("the client closed the connection")
        return task.result()

    def close(self) -> None:
        self._task.cancel()


class WorkPool:
    """A thread pool that counts the tasks it holds, so /health can tell when it is saturated.

    Work of a request cancelled before a worker takes it up never runs; work already running stops
    at its own pace (it sees the same cancellation between stages).
    """

    def __init__(self, name: str, workers: int):
        self.name = name
        self.workers = max(1, workers)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"videollava-{name}")
        self._held = 0
        self._lock = threading.Lock()

    async def run(self, cancelled: Callable[[], bool], function: Callable[..., T], *args: Any) -> T:
        def work() -> T:
            if cancelled():
                raise RequestCancelled("the client closed the connection")
            return function(*args)

        with self._lock:
            self._held += 1
        future = self._executor.submit(work)
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def _finished(self, _future) -> None:
        with self._lock:
            self._held -= 1

    @property
    def saturated(self) -> bool:
        """Every worker busy and work waiting for one."""
        return self._held > self.workers

    def state(self) -> dict[str, int]:
        held = self._held
        return {
            "busy": min(held, self.workers),
            "waiting": max(0, held - self.workers),
            "workers": self.workers,
        }

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class FetchSlots:
    """At most `limit` requests fetch remote media at once; a request that finds none free gets 429
    rather than waiting, so slow hosts cost their own requests only. Used on the event loop alone."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.busy = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        if self.busy >= self.limit:
            raise busy_error(
                f"all {self.limit} remote media fetches are in progress; try again later", "remote_fetch_busy"
            )
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1

    @property
    def saturated(self) -> bool:
        return self.busy >= self.limit

    def state(self) -> dict[str, int]:
        return {"busy": self.busy, "limit": self.limit}


class EngineBridge:
    """Carries one Handle's events from the engine thread to the event loop, without blocking the loop."""

    def __init__(
        self, handle: Handle, loop: asyncio.AbstractEventLoop, on_done: Callable[[Completion], None]
    ):
        self.handle = handle
        self.queue: asyncio.Queue[StreamDelta | Completion] = asyncio.Queue()
        self.delivered = False  # the completion reached the reader: the answer ended, nobody left early
        self._loop = loop
        self._on_done = on_done
        threading.Thread(target=self._pump, name="videollava-stream", daemon=True).start()

    def _pump(self) -> None:
        for delta in self.handle:
            self._put(delta)
        completion = self.handle.result()
        self._on_done(completion)
        self._put(completion)

    def _put(self, item: StreamDelta | Completion) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is gone (server shutting down): nobody will read
            self.handle.cancel()

    async def next(self) -> StreamDelta | Completion:
        """The next event on the loop: text as it comes, then the completion."""
        item = await self.queue.get()
        if isinstance(item, Completion):
            self.delivered = True
        return item

    async def completion(self) -> Completion:
        while True:
            item = await self.next()
            if isinstance(item, Completion):
                return item
