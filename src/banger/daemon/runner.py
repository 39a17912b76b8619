"""Running the daemon's event loop with an exit that is bounded, unlike asyncio.run's.

asyncio.run waits without limit for the tasks it cancels at the end and for every worker thread of the default
executor; one thread stuck in a blocking call would keep a stopped daemon alive forever (and `daemon stop`
waiting on it). Here each of those waits has a bound, and what is still running after it is named in the log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("banger.daemon")

# How long the end of the loop waits for leftover tasks, then for worker threads.
TASK_GRACE = 5.0
THREAD_GRACE = 5.0
THREAD_PREFIX = "bangerd-worker"


def run(main: Coroutine[Any, Any, None]) -> bool:
    """Run `main` to completion; True if everything ended in time, False if threads were left running."""
    loop = asyncio.new_event_loop()
    executor = ThreadPoolExecutor(thread_name_prefix=THREAD_PREFIX)
    loop.set_default_executor(executor)
    try:
        loop.run_until_complete(main)
    finally:
        try:
            _cancel_leftovers(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
            loop.close()
    return _join_workers(THREAD_GRACE)


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    _done, pending = loop.run_until_complete(asyncio.wait(tasks, timeout=TASK_GRACE))
    for task in pending:
        log.error("task %s did not end within %ss of the daemon's stop", task.get_name(), TASK_GRACE)


def _join_workers(grace: float) -> bool:
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if thread.name.startswith(THREAD_PREFIX):
            thread.join(max(deadline - time.monotonic(), 0.0))
    stuck = [t.name for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX) and t.is_alive()]
    if stuck:
        log.error("worker threads still busy %ss after the stop, exiting without them: %s", grace, ", ".join(stuck))
    return not stuck
