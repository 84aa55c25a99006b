"""Run a test's coroutine under a hard time bound, so that a bug cannot hang the suite."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_bounded(coro: Coroutine[Any, Any, T], limit: float = 30.0) -> T:
    """`coro`'s result, in an event loop of its own; TimeoutError after `limit` seconds."""

    async def bounded() -> T:
        async with asyncio.timeout(limit):
            return await coro

    return asyncio.run(bounded())
