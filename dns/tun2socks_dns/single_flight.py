"""One opening of a shared connection at a time, however many queries wait for it.

Both the TCP upstream (one stream, pipelined) and the UDP-ASSOCIATE upstream (one
association) open their connection on first use and again after it closed; queries that
arrive meanwhile wait for the same opening instead of starting their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self, open_: Callable[[], Coroutine[Any, Any, T]]) -> None:
        self._open = open_
        self._task: asyncio.Task[T] | None = None

    async def get(self) -> T:
        """The outcome of the opening in progress, or of a new one."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._open())
            # Read its outcome even when every query waiting for it gave up.
            self._task.add_done_callback(_consume_outcome)
        task = self._task
        try:
            # shield: a query that gives up must not abort the opening others wait for
            return await asyncio.shield(task)
        finally:
            if task.done() and self._task is task:
                self._task = None

    async def cancel(self) -> None:
        """Stop the opening in progress, if any, and wait until it has stopped."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


def _consume_outcome(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()
