"""asyncio helpers shared by the services."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from banger import proc

log = logging.getLogger("banger.aio")

# How long a cancelled call waits for its thread to wind down before it stops waiting.
CANCEL_GRACE = 30.0

P = ParamSpec("P")
T = TypeVar("T")


async def in_thread_cancellable(fn: Callable[[threading.Event], T]) -> T:
    """Like in_thread, for work that also checks a cancel Event between its steps (the Event is the one that
    kills its external commands)."""
    cancel = threading.Event()
    return await _run_in_thread(lambda: fn(cancel), cancel, fn)


async def in_thread(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run blocking `fn` in a thread; if cancelled, stop it and wait (boundedly) for the thread to end.

    A thread cannot be interrupted, but the external commands it runs through `banger.proc` are killed at once
    on cancellation, which ends most thread work promptly. The caller's cleanup (removing a staging dir, say)
    should not race with work still writing into it, so the thread is waited for, up to CANCEL_GRACE seconds:
    past that the cancellation goes on and the thread is left to finish alone, logged.
    """
    cancel = threading.Event()
    return await _run_in_thread(lambda: fn(*args, **kwargs), cancel, fn)


async def _run_in_thread(work: Callable[[], T], cancel: threading.Event, fn: Callable[..., object]) -> T:
    def call() -> T:
        with proc.cancel_on(cancel):
            return work()

    fut = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        try:
            await asyncio.wait_for(asyncio.shield(fut), CANCEL_GRACE)
        except TimeoutError:
            log.warning("%s still runs %ss after its call was cancelled; not waiting for it", _name(fn), CANCEL_GRACE)
        except BaseException as exc:  # its own failure after a cancellation is not news, only worth a debug line
            log.debug("%s ended with %r after its call was cancelled", _name(fn), exc)
        raise


def _name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
