"""asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


async def in_thread_cancellable(fn: Callable[[threading.Event], T]) -> T:
    """Like in_thread, for work that checks a cancel Event: on cancellation the Event is set, then awaited."""
    cancel = threading.Event()
    fut = asyncio.ensure_future(asyncio.to_thread(fn, cancel))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(BaseException):
            await fut
        raise


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run blocking `fn` in a thread; if cancelled, wait for the thread to end before propagating.

    A thread cannot be interrupted, and the caller's cleanup (removing a staging dir, say) must not race
    with work still writing into it.
    """
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args, **kwargs))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await fut
        raise
