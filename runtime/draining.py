"""The end of the shutdown grace period, as every request handler sees it.

On SIGTERM the server stops taking connections and lets in-flight requests run for
``--graceful-shutdown-timeout`` seconds; then ``ShutdownDeadline.expire()`` is called. Handlers
race their work against it (``before_deadline``) and answer for themselves: a plain request gets
503 in JSON, a stream ends with an error event (and ``[DONE]`` on the OpenAI routes), a gRPC
stream gets an error response for each request still running. uvicorn's own deadline comes
``SERVER_MARGIN_S`` later: left to it, requests were cancelled with a plain-text 500 and streams
cut mid-way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")
# Time the handlers have after the deadline to write their last answer before uvicorn and gRPC
# cancel whatever is left.
SERVER_MARGIN_S = 5.0
SHUTDOWN_MESSAGE = ("the server is shutting down and the request did not finish within the grace period "
                    "(--graceful-shutdown-timeout); retry it")


class DeadlinePassed(Exception):
    """The grace period ended before the work did (the work was cancelled)."""


class ShutdownDeadline:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    @property
    def passed(self) -> bool:
        return self._event.is_set()

    def expire(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()

    async def before_deadline(self, work: Awaitable[T]) -> T:
        """``work``'s result; ``DeadlinePassed`` (``work`` cancelled) if the deadline comes first."""
        task = asyncio.ensure_future(work)
        if self.passed:
            task.cancel()
        waiter = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if task.cancelled():
            raise DeadlinePassed
        return task.result()
